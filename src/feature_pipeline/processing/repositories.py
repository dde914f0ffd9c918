"""Repository handlers: parse a crawled repository, keep its indexable files, chunk file by file."""

from __future__ import annotations

import re
from typing import Any

from feature_pipeline.domain.documents import RepositoryDocument
from feature_pipeline.domain.features import CleanedRepository, RepositoryChunk
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.chunking import (
    TextSpan,
    TokenSplitter,
    chunks_from_spans,
    code_separators_for,
)
from feature_pipeline.processing.cleaning import clean_code, should_index_file
from feature_pipeline.processing.registry import Step, registry
from feature_pipeline.settings import get_settings

FILE_SEPARATOR = "\n\n"
# Each file of the cleaned text starts with a "# {path}" line, after a blank line.
_HEADER = re.compile(r"^# (.*)$", re.MULTILINE)


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
    sections = []
    for path in sorted(raw.content):
        text = clean_code(raw.content[path])
        if should_index_file(path, text, max_file_bytes):
            sections.append(file_section(path, text))
    return CleanedRepository(
        type=DataType.REPOSITORIES,
        entry_id=entry_id,
        cleaned_content=FILE_SEPARATOR.join(sections),
        name=raw.name,
        link=raw.link,
        owner_id=raw.owner_id,
    )


@registry.register(DataType.REPOSITORIES, Step.CHUNK)
def chunk_repository(cleaned: CleanedRepository, splitter: TokenSplitter) -> list[RepositoryChunk]:
    """Chunks of each file section on its own, so that no chunk mixes two files."""
    text = cleaned.cleaned_content
    spans: list[TextSpan] = []
    for start, end, separators in _sections(text):
        section = text[start:end]
        spans.extend(splitter.split(section, separators, offset=start, keep_indentation=True))
    return chunks_from_spans(RepositoryChunk, cleaned, spans)


def _sections(text: str) -> list[tuple[int, int, list[str]]]:
    """(start, end, separators) of each file section of a cleaned repository text.

    A "# comment" line right after a blank line inside a file reads like a file header too.
    Taking it for one only adds a cut there (never a chunk across two files); such a pseudo
    header keeps the separators of the file it sits in.
    """
    starts: list[tuple[int, list[str]]] = []
    separators: list[str] | None = None
    for match in _HEADER.finditer(text):
        position = match.start()
        if position != 0 and text[position - 2 : position] != FILE_SEPARATOR:
            continue
        header = match.group(1)
        if separators is None or _looks_like_path(header):
            separators = code_separators_for(header)
        starts.append((position, separators))
    if not starts or starts[0][0] != 0:
        # Not produced by clean_repository; still chunk all of it.
        starts.insert(0, (0, code_separators_for("")))
    ends = [position for position, _ in starts[1:]] + [len(text)]
    return [(start, end, seps) for (start, seps), end in zip(starts, ends, strict=True)]


def _looks_like_path(header: str) -> bool:
    return (
        bool(header)
        and not any(char.isspace() for char in header)
        and ("." in header or "/" in header)
    )
