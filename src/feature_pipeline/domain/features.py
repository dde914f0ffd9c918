"""Features written to the store: cleaned documents and (embedded) chunks, per data type.

Field names are the payload names the course's downstream pipelines already read.
"""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field

from feature_pipeline.domain.types import DataType


def content_hash(text: str) -> str:
    """Short stable fingerprint of a chunk's text: the first 32 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Metadata carried by both the cleaned snapshot and every chunk of a document.
class PostFields(_Frozen):
    platform: str
    author_id: str


class ArticleFields(_Frozen):
    platform: str
    link: str
    author_id: str


class RepositoryFields(_Frozen):
    name: str
    link: str
    owner_id: str


class CleanedDocument(_Frozen):
    """The cleaned snapshot of one warehouse document (training pipeline input)."""

    type: DataType
    entry_id: str
    cleaned_content: str


class CleanedPost(CleanedDocument, PostFields):
    image: str | None = None


class CleanedArticle(CleanedDocument, ArticleFields):
    pass


class FileSpan(_Frozen):
    """Where one file's section (its "# path" line, then its text) lies in `cleaned_content`."""

    path: str
    start: int = Field(ge=0)
    end: int = Field(ge=0)


class CleanedRepository(CleanedDocument, RepositoryFields):
    files: tuple[FileSpan, ...] = ()


class Chunk(_Frozen):
    """A piece of a cleaned document that fits the embedding model, with its place in the text.

    `start`/`end` are character offsets into `cleaned_content`, so
    `cleaned_content[start:end] == content`. `token_ids` are the word pieces the model's tokenizer
    makes of `content` alone (no special tokens), from the chunker, so the model does not
    tokenize it again; never serialised (not in the store's payload), None when not known.
    """

    type: DataType
    entry_id: str
    chunk_index: int = Field(ge=0)
    content: str = Field(min_length=1)
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    content_hash: str
    token_ids: tuple[int, ...] | None = Field(default=None, exclude=True, repr=False)


class PostChunk(Chunk, PostFields):
    pass


class ArticleChunk(Chunk, ArticleFields):
    pass


class RepositoryChunk(Chunk, RepositoryFields):
    pass


class EmbeddedChunk(_Frozen):
    """A chunk with its vector and the model that made it (RAG inference input)."""

    chunk: Chunk
    model: str
    embedding: list[float]

    def payload(self) -> dict[str, object]:
        return {**self.chunk.model_dump(mode="json"), "model": self.model}
