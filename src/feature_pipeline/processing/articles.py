"""Article handlers: parse a scraped article, clean title + subtitle + body, split into chunks."""

from __future__ import annotations

from typing import Any

from feature_pipeline.domain.documents import ArticleDocument
from feature_pipeline.domain.features import ArticleChunk, CleanedArticle
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.chunking import TokenSplitter, chunks_from_spans
from feature_pipeline.processing.cleaning import clean_text
from feature_pipeline.processing.page_chrome import strip_page_chrome
from feature_pipeline.processing.registry import Step, registry


@registry.register(DataType.ARTICLES, Step.PARSE)
def parse_article(document: dict[str, Any]) -> ArticleDocument:
    return ArticleDocument.model_validate(document)


@registry.register(DataType.ARTICLES, Step.CLEAN)
def clean_article(raw: ArticleDocument, entry_id: str) -> CleanedArticle:
    body = strip_page_chrome(raw.platform, raw.content.content)
    parts = (raw.content.title, raw.content.subtitle or "", body)
    cleaned_parts = [cleaned for cleaned in map(clean_text, parts) if cleaned]
    return CleanedArticle(
        type=DataType.ARTICLES,
        entry_id=entry_id,
        cleaned_content="\n\n".join(cleaned_parts),
        platform=raw.platform,
        link=raw.link,
        author_id=raw.author_id,
    )


@registry.register(DataType.ARTICLES, Step.CHUNK)
def chunk_article(cleaned: CleanedArticle, splitter: TokenSplitter) -> list[ArticleChunk]:
    return chunks_from_spans(ArticleChunk, cleaned, splitter.split(cleaned.cleaned_content))
