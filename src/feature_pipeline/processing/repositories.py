"""Repository handlers: parse a crawled repository, keep its indexable files, chunk file by file."""

from __future__ import annotations

from typing import Any

from feature_pipeline.domain.documents import RepositoryDocument
from feature_pipeline.domain.features import CleanedRepository, FileSpan, RepositoryChunk
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.chunking import (
    SplitRequest,
    TokenSplitter,
    chunks_from_spans,
    code_separators_for,
)
from feature_pipeline.processing.cleaning import clean_code, should_index_file
from feature_pipeline.processing.registry import Step, registry
from feature_pipeline.settings import get_settings

FILE_SEPARATOR = "\n\n"


def file_section(path: str, text: str) -> str:
    return f"# {path}\n{text}"


@registry.register(DataType.REPOSITORIES, Step.PARSE)
def parse_repository(document: dict[str, Any]) -> RepositoryDocument:
    return RepositoryDocument.model_validate(document)


@registry.register(DataType.REPOSITORIES, Step.CLEAN)
def clean_repository(
    raw: RepositoryDocument, entry_id: str, *, max_file_bytes: int | None = None
) -> CleanedRepository:
    """Every indexable file, in path order, as "# {path}\\n{text}"; code text is kept exactly."""
    if max_file_bytes is None:
        max_file_bytes = get_settings().max_repository_file_bytes
    sections: list[str] = []
    files: list[FileSpan] = []
    position = 0
    for path in sorted(raw.content):
        text = clean_code(raw.content[path])
        if not should_index_file(path, text, max_file_bytes):
            continue
        if sections:
            position += len(FILE_SEPARATOR)
        section = file_section(path, text)
        sections.append(section)
        files.append(FileSpan(path=path, start=position, end=position + len(section)))
        position += len(section)
    return CleanedRepository(
        type=DataType.REPOSITORIES,
        entry_id=entry_id,
        cleaned_content=FILE_SEPARATOR.join(sections),
        files=tuple(files),
        name=raw.name,
        link=raw.link,
        owner_id=raw.owner_id,
    )


@registry.register(DataType.REPOSITORIES, Step.CHUNK)
def chunk_repository(cleaned: CleanedRepository, splitter: TokenSplitter) -> list[RepositoryChunk]:
    """Chunks of each file on its own, cut along its language's structure: no chunk mixes two
    files, and each file's first chunk starts with its path."""
    text = cleaned.cleaned_content
    requests = [
        SplitRequest(
            text[file.start : file.end],
            tuple(code_separators_for(file.path)),
            offset=file.start,
            keep_indentation=True,
        )
        for file in cleaned.files
    ]
    # All files in one call: the tokenizer encodes them in parallel.
    spans = [span for spans in splitter.split_many(requests) for span in spans]
    return chunks_from_spans(RepositoryChunk, cleaned, spans)
