"""Post handlers: parse a warehouse post, clean its text, split it into chunks."""

from __future__ import annotations

from typing import Any

from feature_pipeline.domain.documents import PostDocument
from feature_pipeline.domain.features import CleanedPost, PostChunk
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.chunking import TokenSplitter, chunks_from_spans
from feature_pipeline.processing.cleaning import clean_text
from feature_pipeline.processing.page_chrome import strip_page_chrome
from feature_pipeline.processing.registry import Step, registry


@registry.register(DataType.POSTS, Step.PARSE)
def parse_post(document: dict[str, Any]) -> PostDocument:
    return PostDocument.model_validate(document)


@registry.register(DataType.POSTS, Step.CLEAN)
def clean_post(raw: PostDocument, entry_id: str) -> CleanedPost:
    return CleanedPost(
        type=DataType.POSTS,
        entry_id=entry_id,
        cleaned_content=clean_text(strip_page_chrome(raw.platform, raw.content.text)),
        platform=raw.platform,
        author_id=raw.author_id,
        image=raw.image,
    )


@registry.register(DataType.POSTS, Step.CHUNK)
def chunk_post(cleaned: CleanedPost, splitter: TokenSplitter) -> list[PostChunk]:
    return chunks_from_spans(PostChunk, cleaned, splitter.split(cleaned.cleaned_content))
