"""Embedding backends on real text: each stays within its stated tolerance of fp32; `auto` is safe."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from feature_pipeline.domain.events import ChangeEvent, Op
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.embedding import (
    AUTO_MIN_COSINE,
    BACKENDS,
    TOLERANCES,
    Embedder,
    ModelNotFound,
    available_cores,
    choose_backend,
    configure_torch_threads,
    get_embedder,
    min_cosine,
)
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import DEFAULT_MODEL, SettingsError, load_settings

from .conftest import SAMPLES, read_jsonl

#: Chunks per data type: enough to cover prose, posts and code, few enough for emulated bf16.
CHUNKS_PER_TYPE = 4


@pytest.fixture(scope="module")
def corpus_chunks() -> list[str]:
    """Chunks the pipeline makes of the sample corpus, evenly spread over each data type."""
    processor = DocumentProcessor(load_settings(_env_file=None))
    chunks: list[str] = []
    for data_type in DataType:
        contents = []
        for document in read_jsonl(SAMPLES / f"{data_type.value}.jsonl"):
            body = {k: v for k, v in document.items() if k != "_id"}
            event = ChangeEvent(
                op=Op.INSERT, type=data_type, entry_id=str(document["_id"]), document=body
            )
            contents += [c.content for c in processor.process_event(event).chunks]
        step = max(1, len(contents) // CHUNKS_PER_TYPE)
        chunks += contents[::step][:CHUNKS_PER_TYPE]
    assert len(chunks) == CHUNKS_PER_TYPE * len(DataType)
    return chunks


@pytest.fixture(scope="module")
def reference(corpus_chunks: list[str]) -> np.ndarray:
    """fp32 vectors, one text at a time (no padding at all)."""
    return get_embedder(DEFAULT_MODEL, "fp32").encode(corpus_chunks, batch_size=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_is_within_its_tolerance_of_fp32(
    backend: str, corpus_chunks: list[str], reference: np.ndarray
) -> None:
    embedder = get_embedder(DEFAULT_MODEL, backend)
    assert embedder.backend == backend
    vectors = embedder.encode(corpus_chunks, batch_size=8)
    assert vectors.shape == reference.shape and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    cosine = min_cosine(vectors, reference)
    print(f"{backend}: min cosine to fp32 on {len(corpus_chunks)} corpus chunks = {cosine:.5f}")
    assert cosine >= TOLERANCES[backend]


def test_auto_picks_a_backend_within_its_bound(
    corpus_chunks: list[str], reference: np.ndarray
) -> None:
    embedder = get_embedder(DEFAULT_MODEL, "auto")
    assert embedder.backend in BACKENDS
    chosen = next(p for p in embedder.probes if p.backend == embedder.backend)
    assert chosen.accepted
    assert {p.backend for p in embedder.probes} == set(BACKENDS)
    cosine = min_cosine(embedder.encode(corpus_chunks), reference)
    print(f"auto chose {embedder.backend}: min cosine to fp32 on corpus chunks = {cosine:.5f}")
    assert cosine >= AUTO_MIN_COSINE
    # The decision is made once per process and model.
    again = choose_backend(embedder.path, None)
    assert again == (embedder.backend, embedder.probes)


def test_a_hub_name_fails_fast_with_a_clear_error() -> None:
    started = time.monotonic()
    with pytest.raises(ModelNotFound, match="not a local sentence-transformers directory"):
        Embedder("sentence-transformers/paraphrase-MiniLM-L3-v2", "fp32")
    assert time.monotonic() - started < 5


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="EMBEDDING_BACKEND"):
        Embedder(DEFAULT_MODEL, "int4")
    with pytest.raises(SettingsError, match="EMBEDDING_BACKEND"):
        load_settings(_env_file=None, embedding_backend="int4")


def test_torch_uses_one_thread_per_available_core() -> None:
    expected = int(os.environ.get("OMP_NUM_THREADS") or available_cores())
    assert configure_torch_threads() == expected
