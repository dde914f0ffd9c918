"""Post handlers: parse a warehouse post, clean its text, split it into chunks."""

from __future__ import annotations

from typing import Any

from feature_pipeline.domain.documents import PostDocument
from feature_pipeline.domain.features import CleanedPost, PostChunk, content_hash
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.chunking import TokenSplitter
from feature_pipeline.processing.cleaning import clean_text
from feature_pipeline.processing.registry import Step, registry


@registry.register(DataType.POSTS, Step.PARSE)
def parse_post(document: dict[str, Any]) -> PostDocument:
    return PostDocument.model_validate(document)


@registry.register(DataType.POSTS, Step.CLEAN)
def clean_post(raw: PostDocument, entry_id: str) -> CleanedPost:
    return CleanedPost(
        type=DataType.POSTS,
        entry_id=entry_id,
        cleaned_content=clean_text(raw.content.text),
        platform=raw.platform,
        author_id=raw.author_id,
        image=raw.image,
    )


@registry.register(DataType.POSTS, Step.CHUNK)
def chunk_post(cleaned: CleanedPost, splitter: TokenSplitter) -> list[PostChunk]:
    return [
        PostChunk(
            type=DataType.POSTS,
            entry_id=cleaned.entry_id,
            chunk_index=index,
            content=span.text,
            start=span.start,
            end=span.end,
            content_hash=content_hash(span.text),
            platform=cleaned.platform,
            author_id=cleaned.author_id,
        )
        for index, span in enumerate(splitter.split(cleaned.cleaned_content))
    ]
