"""Token-aware splitting of text into chunks that fit the embedding model, with exact spans."""

from __future__ import annotations

import json
import re
import unicodedata
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from operator import itemgetter
from pathlib import Path, PurePosixPath
from typing import TypeVar

from tokenizers import Encoding, Tokenizer, models, normalizers, pre_tokenizers

from feature_pipeline.domain.features import Chunk, CleanedDocument, content_hash

#: Cut preferences for prose, best first: paragraph, line, sentence end, word.
PROSE_SEPARATORS: tuple[str, ...] = ("\n\n", "\n", ". ", "! ", "? ", " ")
#: Cut preferences for files of a language langchain has no separators for.
DEFAULT_CODE_SEPARATORS: tuple[str, ...] = ("\n\n", "\n", " ")
#: A longer text is tokenized in pieces of about this many characters, cut at whitespace: a
#: 10 MB article tokenized whole, with Python lists of its offsets, took chunking to a 1.7 GB
#: peak (docs/benchmark.md).
PIECE_CHARS = 100_000
#: Characters of short texts tokenized per `encode_batch` call, so that a 5,000-file repository
#: is not held as 5,000 encodings at once.
BATCH_CHARS = 1_000_000

_first = itemgetter(0)
_second = itemgetter(1)
#: ASCII control characters: BERT's normalizer deletes them (tab, newline and carriage return
#: it keeps as whitespace), which moves every later offset.
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def load_tokenizer(model_path: str) -> Tokenizer:
    """The model's fast tokenizer (`tokenizer.json`), without truncation or padding."""
    tokenizer = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def model_window(model_path: str) -> tuple[int, int] | None:
    """(word pieces the model reads, special tokens among them) from the model folder's files,
    without loading its weights, as sentence-transformers decides it: `max_seq_length` in
    sentence_bert_config.json, else the smaller of config.json's `max_position_embeddings` and
    tokenizer_config.json's `model_max_length`; None when none of them says."""
    folder = Path(model_path)
    max_seq_length = _json_field(folder / "sentence_bert_config.json", "max_seq_length")
    if max_seq_length is None:
        positions = _json_field(folder / "config.json", "max_position_embeddings")
        tokenizer_limit = _json_field(folder / "tokenizer_config.json", "model_max_length")
        if positions is None or tokenizer_limit is None:
            return None
        max_seq_length = min(positions, tokenizer_limit)
    post_processor = load_tokenizer(model_path).post_processor
    special = post_processor.num_special_tokens_to_add(False) if post_processor else 0
    return max_seq_length, special


class TextEncoder:
    """A tokenizer's encodings (no special tokens), with a shortcut for plain ASCII text.

    BERT's normalizer (MiniLM's) tracks every character's alignment while it cleans, strips
    accents and lowercases: about a third of tokenizing. On ASCII text without control
    characters its only change is the lowercasing (whitespace it maps to spaces, which the
    pre-tokenizer drops as it does the originals), so such a text is lowercased by Python and
    tokenized without the normalizer: the same ids, offsets and words (tested), and code, most
    of a repository, is all ASCII.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        normalizer = tokenizer.normalizer
        self._plain: Tokenizer | None = None
        self._lowercase = False
        if isinstance(normalizer, normalizers.BertNormalizer):
            self._plain = Tokenizer.from_str(tokenizer.to_str())
            self._plain.normalizer = None
            self._lowercase = bool(normalizer.lowercase)

    def shortcut(self, text: str) -> str | None:
        """What the normalizer-less tokenizer must be given for `text`; None: no shortcut."""
        if self._plain is None or not text.isascii() or _ASCII_CONTROL.search(text):
            return None
        return text.lower() if self._lowercase else text

    def encode(self, text: str) -> Encoding:
        plain = self.shortcut(text)
        if plain is None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        assert self._plain is not None
        return self._plain.encode(plain, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[Encoding]:
        """One call per tokenizer (its Rust threads take the texts in parallel)."""
        shortcuts = [self.shortcut(text) for text in texts]
        plain = [i for i, shortcut in enumerate(shortcuts) if shortcut is not None]
        other = [i for i, shortcut in enumerate(shortcuts) if shortcut is None]
        encodings: list[Encoding | None] = [None] * len(texts)
        for tokenizer, indexes, inputs in (
            (self._plain, plain, [shortcuts[i] for i in plain]),
            (self.tokenizer, other, [texts[i] for i in other]),
        ):
            if tokenizer is not None and indexes:
                made = tokenizer.encode_batch(inputs, add_special_tokens=False)
                for i, encoding in zip(indexes, made, strict=True):
                    encodings[i] = encoding
        return encodings  # type: ignore[return-value]  (every index is plain or other)


def _json_field(path: Path, name: str) -> int | None:
    """An integer field of a JSON file; None when the file or the field is missing."""
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8")).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class SplitRequest:
    """One text to split: cut preferences, where it starts in its document, and whether it is
    code (a chunk that begins a line keeps the line's indentation)."""

    text: str
    separators: tuple[str, ...] = PROSE_SEPARATORS
    offset: int = 0
    keep_indentation: bool = False


@dataclass(frozen=True)
class TextSpan:
    """A chunk: `text` is exactly the original text between `start` and `end`; `ids` are the
    word pieces the tokenizer makes of `text` alone, without special tokens (None: not known)."""

    start: int
    end: int
    text: str
    ids: tuple[int, ...] | None = field(default=None, compare=False, repr=False)


ChunkModel = TypeVar("ChunkModel", bound=Chunk)


def chunks_from_spans(
    model: type[ChunkModel], cleaned: CleanedDocument, spans: Iterable[TextSpan]
) -> list[ChunkModel]:
    """Chunk models for the spans of a cleaned document, numbered in order, each carrying the
    document metadata its model declares (the fields it adds to `Chunk`: platform, link...)."""
    metadata = {
        name: getattr(cleaned, name)
        for name in model.model_fields
        if name not in Chunk.model_fields
    }
    return [
        model(
            type=cleaned.type,
            entry_id=cleaned.entry_id,
            chunk_index=index,
            content=span.text,
            start=span.start,
            end=span.end,
            content_hash=content_hash(span.text),
            token_ids=span.ids,
            **metadata,
        )
        for index, span in enumerate(spans)
    ]


@dataclass(frozen=True)
class _Separator:
    """A separator string read as: leading whitespace, a core, trailing whitespace.

    Where the cut goes: "\\n\\n" and " " cut inside the whitespace; ". " cuts after its core
    (the period ends the chunk); "\\nclass " and "<div" cut before their core (it opens the
    next chunk).
    """

    text: str
    lead: int
    core: int

    @classmethod
    def parse(cls, text: str) -> _Separator:
        rest = text.lstrip()
        core = rest.rstrip()
        return cls(text=text, lead=len(text) - len(rest), core=len(core))

    @property
    def is_whitespace(self) -> bool:
        return self.core == 0

    @property
    def cuts_after_core(self) -> bool:
        return self.lead == 0 and self.core < len(self.text)


class _Tokens:
    """One tokenization of a text: token offsets and pre-tokenizer word of each token."""

    def __init__(
        self, text: str, starts: Sequence[int], ends: Sequence[int], words: Sequence[int]
    ) -> None:
        self.text = text
        self.starts = starts
        self.ends = ends
        self.words = words
        self.count = len(starts)

    def boundary_for(self, separator: _Separator, position: int) -> int | None:
        """The token boundary j (cut between tokens j-1 and j) of a separator found at position."""
        if separator.is_whitespace:
            j = bisect_left(self.starts, position + len(separator.text))
            if 0 < j < self.count and self.ends[j - 1] <= position:
                return j
            return None
        if separator.cuts_after_core:
            cut = position + separator.core
            i = bisect_left(self.ends, cut)
            if i + 1 < self.count and self.ends[i] == cut:
                return i + 1
            return None
        cut = position + separator.lead
        j = bisect_left(self.starts, cut)
        if 0 < j < self.count and self.starts[j] == cut:
            return j
        return None

    def is_word_boundary(self, j: int) -> bool:
        return j <= 0 or j >= self.count or self.words[j] != self.words[j - 1]


class TokenSplitter:
    """Split text into chunks of at most `max_tokens` word pieces (special tokens excluded)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_tokens: int,
        overlap_tokens: int,
        encoder: TextEncoder | None = None,
    ) -> None:
        """`encoder`: a `TextEncoder` of this very tokenizer, shared by several splitters (its
        copy of the tokenizer takes ~20 ms to make); by default the splitter makes its own."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if not 0 <= overlap_tokens < max_tokens:
            raise ValueError(
                f"overlap_tokens must be in [0, max_tokens), got {overlap_tokens} "
                f"for max_tokens={max_tokens}"
            )
        if tokenizer.truncation is not None or tokenizer.padding is not None:
            # A truncated encoding would silently drop the end of the text; work on a copy.
            tokenizer = Tokenizer.from_str(tokenizer.to_str())
            tokenizer.no_truncation()
            tokenizer.no_padding()
            encoder = None
        if encoder is not None and encoder.tokenizer is not tokenizer:
            raise ValueError("the encoder was made for another tokenizer")
        self.tokenizer = tokenizer
        self._encoder = encoder or TextEncoder(tokenizer)
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        # Below half a chunk, a cut at a good separator is not worth a tiny chunk.
        self._min_fill = max(1, max_tokens // 2)
        self._word_local = _is_word_local(tokenizer)
        # One int object per vocabulary id, shared by every chunk's ids: a fresh 28-byte int
        # per id was ~7 KB of each chunk (a 10 MB article makes ~13,000 chunks).
        self._ints = tuple(range(tokenizer.get_vocab_size(with_added_tokens=True)))

    def _interned(self, ids: Sequence[int]) -> tuple[int, ...]:
        try:  # map over a bound method: ~3x faster than a generator with a range check
            return tuple(map(self._ints.__getitem__, ids))
        except IndexError:  # an id beyond the vocabulary: keep it as it is
            ints, known = self._ints, len(self._ints)
            return tuple(ints[i] if 0 <= i < known else i for i in ids)

    def count_tokens(self, text: str) -> int:
        return len(self._ids(text))

    def _ids(self, text: str) -> tuple[int, ...]:
        return tuple(self._encoder.encode(text).ids)

    def split(
        self,
        text: str,
        separators: Sequence[str] = PROSE_SEPARATORS,
        offset: int = 0,
        *,
        keep_indentation: bool = False,
    ) -> list[TextSpan]:
        """Chunks covering every non-whitespace character of `text`, spans shifted by `offset`.

        Chunks are stripped of surrounding whitespace; with `keep_indentation` (for code) a chunk
        that begins a line keeps that line's leading indentation.
        """
        return self.split_many([SplitRequest(text, tuple(separators), offset, keep_indentation)])[0]

    def split_many(self, requests: Sequence[SplitRequest]) -> list[list[TextSpan]]:
        """`split` of each request; the texts are tokenized in batches, on every core (the
        tokenizer's Rust threads, without the GIL): tokenizing is most of the chunker's time.
        Batches hold about BATCH_CHARS characters, and a text longer than PIECE_CHARS is
        tokenized on its own, piece by piece, so memory stays bounded for any input."""
        results: list[list[TextSpan]] = [[] for _ in requests]
        batch: list[int] = []
        batch_chars = 0
        for index, request in enumerate(requests):
            if not request.text.strip():
                continue
            if len(request.text) > PIECE_CHARS and self._word_local:
                results[index] = self._split_long(request)
                continue
            batch.append(index)
            batch_chars += len(request.text)
            if batch_chars >= BATCH_CHARS:
                self._split_batch(requests, batch, results)
                batch, batch_chars = [], 0
        self._split_batch(requests, batch, results)
        return results

    def _split_batch(
        self, requests: Sequence[SplitRequest], batch: list[int], results: list[list[TextSpan]]
    ) -> None:
        texts = [requests[i].text for i in batch]
        encodings = self._encoder.encode_batch(texts)
        for index, encoding in zip(batch, encodings, strict=True):
            results[index] = self._split_encoded(requests[index], encoding)

    def _split_long(self, request: SplitRequest) -> list[TextSpan]:
        """`split` of a long text, tokenized in whitespace-bounded pieces into compact arrays.
        Only for a word-local tokenizer: cut at whitespace, the pieces tokenize exactly as the
        whole text does, so the chunks are the same."""
        text = request.text
        # 4-byte ints (16 bytes a token, not ~100 in lists of tuples): texts stay under 2**31
        # characters (MAX_DOCUMENT_BYTES is capped there).
        starts, ends, words, ids = array("i"), array("i"), array("i"), array("i")
        word_base = 0
        pieces = _pieces(text, PIECE_CHARS)
        # A few pieces per call keep the tokenizer's threads busy without holding them all.
        for first in range(0, len(pieces), 8):
            group = pieces[first : first + 8]
            encodings = self._encoder.encode_batch([text[a:b] for a, b in group])
            for (piece_start, _), encoding in zip(group, encodings, strict=True):
                word_ids = [-1 if w is None else w for w in encoding.word_ids]
                for start, end in encoding.offsets:
                    starts.append(start + piece_start)
                    ends.append(end + piece_start)
                words.extend(w + word_base if w >= 0 else -1 for w in word_ids)
                ids.extend(encoding.ids)
                word_base += max(word_ids, default=-1) + 1
        if not starts:
            return self._split_encoded(request, self._encoder.encode(text))
        return self._split_tokens(request, _Tokens(text, starts, ends, words), ids)

    def _split_encoded(self, request: SplitRequest, encoding: Encoding) -> list[TextSpan]:
        text = request.text
        offsets = encoding.offsets
        if not offsets:
            # Only characters the tokenizer ignores (control characters): zero tokens, one chunk.
            start, end = _trim(text, 0, len(text), request.keep_indentation)
            return [TextSpan(start + request.offset, end + request.offset, text[start:end], ())]
        # Two plain lists, without zip(*offsets): unpacking a text's every offset as arguments
        # made the largest single cost of the chunker, with the garbage collector's passes.
        starts = list(map(_first, offsets))
        ends = list(map(_second, offsets))
        # Only special tokens have no word, and they are not added here.
        words = encoding.word_ids
        if None in words:
            words = [-1 if word is None else word for word in words]
        tokens = _Tokens(text, starts=starts, ends=ends, words=words)
        return self._split_tokens(request, tokens, encoding.ids)

    def _split_tokens(
        self, request: SplitRequest, tokens: _Tokens, ids: Sequence[int]
    ) -> list[TextSpan]:
        text, offset = request.text, request.offset
        # "" (langchain's "cut anywhere") is what the token-boundary fallback already does.
        parsed = [_Separator.parse(s) for s in request.separators if s]
        packed = self._pack(tokens, parsed, request.keep_indentation, ids)
        # The few chunks whose ids the whole-text tokenization cannot give: one batch call.
        unknown = [i for i, (_, _, chunk_ids) in enumerate(packed) if chunk_ids is None]
        if unknown:
            texts = [text[packed[i][0] : packed[i][1]] for i in unknown]
            encodings = self._encoder.encode_batch(texts)
            for i, made in zip(unknown, encodings, strict=True):
                packed[i] = (packed[i][0], packed[i][1], self._interned(made.ids))
        return [
            TextSpan(start + offset, end + offset, text[start:end], chunk_ids)
            for start, end, chunk_ids in packed
        ]

    def _pack(
        self,
        tokens: _Tokens,
        separators: list[_Separator],
        keep_indentation: bool,
        ids: Sequence[int],
    ) -> list[tuple[int, int, tuple[int, ...] | None]]:
        """Greedy packing over token indexes; returns trimmed character ranges and, where the
        whole text's tokenization gives them exactly, the chunk's ids (else None)."""
        ranges: list[tuple[int, int, tuple[int, ...] | None]] = []
        first, previous_last = 0, 0
        while True:
            last = self._choose_end(tokens, separators, first, previous_last)
            start, end = _char_range(tokens, first, last, keep_indentation)
            excess = 0
            chunk_ids: tuple[int, ...] | None = None
            if self._needs_check(tokens, first, last):
                while True:
                    # Cutting inside a word can re-tokenize into more pieces than the slice had.
                    recounted = self._ids(tokens.text[start:end])
                    excess = len(recounted) - self.max_tokens
                    if excess <= 0 or last - first == 1:
                        chunk_ids = self._interned(recounted)
                        break
                    last = max(first + 1, last - excess)
                    start, end = _char_range(tokens, first, last, keep_indentation)
            elif _only_whitespace_around(tokens, first, last, start, end):
                # Between words of a word-local tokenizer: the text alone makes the same pieces.
                chunk_ids = self._interned(ids[first:last])
            if excess > 0:
                # A lone word piece that re-tokenizes past a tiny limit: cut it by characters.
                ranges.extend(
                    (a, b, None) for a, b in self._split_characters(tokens.text, start, end)
                )
            else:
                ranges.append((start, end, chunk_ids))
            if last >= tokens.count:
                return ranges
            if excess > 0:
                first = previous_last = last
                continue
            first, previous_last = self._choose_next_start(tokens, separators, first, last), last

    def _split_characters(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        ranges = []
        while start < end:
            cut = start + 1
            while cut < end and self.count_tokens(text[start : cut + 1]) <= self.max_tokens:
                cut += 1
            piece = _trim(text, start, cut, keep_indentation=False)
            if piece[0] < piece[1]:
                ranges.append(piece)
            start = cut
        return ranges

    def _choose_end(
        self, tokens: _Tokens, separators: list[_Separator], first: int, previous_last: int
    ) -> int:
        """Exclusive end token of the chunk that starts at token `first`."""
        hi = first + self.max_tokens
        if hi >= tokens.count:
            return tokens.count
        # Each chunk must reach past the previous one, or it would only repeat the overlap.
        lo = min(hi, max(first + self._min_fill, previous_last + 1))
        return _best_boundary(tokens, separators, lo, hi, target=hi)

    def _choose_next_start(
        self, tokens: _Tokens, separators: list[_Separator], first: int, last: int
    ) -> int:
        if self.overlap_tokens == 0 or last - first <= 1:
            return last
        target = max(first + 1, last - self.overlap_tokens)
        slack = max(1, self.overlap_tokens // 2)
        lo = max(first + 1, target - slack)
        hi = min(last - 1, target + slack)
        return _best_boundary(tokens, separators, lo, hi, target=target)

    def _needs_check(self, tokens: _Tokens, first: int, last: int) -> bool:
        # With a word-local tokenizer, a slice that starts and ends between words tokenizes
        # exactly as it did inside the whole text, so only cuts inside a word are re-counted.
        if not self._word_local:
            return True
        return not (tokens.is_word_boundary(first) and tokens.is_word_boundary(last))


def _char_range(tokens: _Tokens, first: int, last: int, keep_indentation: bool) -> tuple[int, int]:
    """Trimmed character range of tokens [first, last)."""
    # The range runs from the previous token's end to the next token's start, so characters
    # that make no token (control characters, stripped accents) still land in a chunk.
    start = 0 if first == 0 else min(tokens.ends[first - 1], tokens.starts[first])
    end = len(tokens.text) if last >= tokens.count else tokens.starts[last]
    end = max(end, tokens.ends[last - 1])
    return _trim(tokens.text, start, end, keep_indentation)


def _only_whitespace_around(tokens: _Tokens, first: int, last: int, start: int, end: int) -> bool:
    """Whether the range [start, end) holds tokens [first, last) and only whitespace besides at
    its edges; characters that made no token there (a control character, a lone accent) could
    tokenize differently alone, so such a chunk is tokenized again."""
    text = tokens.text
    before = text[start : tokens.starts[first]]
    after = text[tokens.ends[last - 1] : end]
    return (not before or before.isspace()) and (not after or after.isspace())


def _best_boundary(
    tokens: _Tokens, separators: list[_Separator], lo: int, hi: int, target: int
) -> int:
    """The boundary in [lo, hi] at the best separator, nearest `target`; else a word/token cut."""
    text = tokens.text
    for separator in separators:
        size = len(separator.text)
        begin = max(0, tokens.ends[lo - 1] - size)
        stop = min(len(text), tokens.starts[hi] + size)
        best: int | None = None
        position = text.rfind(separator.text, begin, stop)
        while position >= 0:
            j = tokens.boundary_for(separator, position)
            if j is not None and lo <= j <= hi:
                if best is None or abs(j - target) < abs(best - target):
                    best = j
                elif abs(j - target) > abs(best - target):
                    break
            elif j is not None and j < lo:
                break
            position = text.rfind(separator.text, begin, position + size - 1)
        if best is not None:
            return best
    words = [j for j in range(lo, hi + 1) if tokens.is_word_boundary(j)]
    if words:
        return min(words, key=lambda j: (abs(j - target), -j))
    return target


def _pieces(text: str, size: int) -> list[tuple[int, int]]:
    """Consecutive ranges covering `text`, each about `size` characters, each cut just after a
    whitespace character and before one that is neither whitespace nor a combining mark (a mark
    there would join the previous word), so no word is cut; a piece grows until such a place."""
    pieces = []
    start = 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not _is_piece_cut(text, cut):
            cut += 1
        if cut >= len(text):
            break
        pieces.append((start, cut))
        start = cut
    pieces.append((start, len(text)))
    return pieces


def _is_piece_cut(text: str, position: int) -> bool:
    # Only the whitespace BERT's normalizer keeps as a separator: Python's isspace() also takes
    # control characters (\x1c, \x85) that the normalizer deletes, joining the words around them.
    after = text[position]
    return (
        text[position - 1] in " \t\n\r"
        and after not in " \t\n\r"
        and not unicodedata.category(after).startswith(("M", "C", "Z"))
    )


def _trim(text: str, start: int, end: int, keep_indentation: bool) -> tuple[int, int]:
    """Move start/end past surrounding whitespace (but not the first line's indentation)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if not keep_indentation:
        return start, end
    line_start = text.rfind("\n", 0, start) + 1
    if line_start < start and text[line_start:start].isspace():
        start = line_start
    return start, end


def _is_word_local(tokenizer: Tokenizer) -> bool:
    """Whether tokenization never crosses a pre-tokenizer word (BERT WordPiece, as MiniLM's)."""
    return (
        isinstance(tokenizer.model, models.WordPiece)
        and isinstance(tokenizer.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
        and isinstance(tokenizer.normalizer, normalizers.BertNormalizer | None)
    )


# File extension -> name of the langchain_text_splitters.Language member.
_LANGUAGE_BY_SUFFIX: dict[str, str] = {
    ".py": "PYTHON",
    ".pyi": "PYTHON",
    ".js": "JS",
    ".jsx": "JS",
    ".mjs": "JS",
    ".cjs": "JS",
    ".ts": "TS",
    ".tsx": "TS",
    ".go": "GO",
    ".java": "JAVA",
    ".kt": "KOTLIN",
    ".kts": "KOTLIN",
    ".c": "C",
    ".h": "C",
    ".cc": "CPP",
    ".cpp": "CPP",
    ".cxx": "CPP",
    ".hpp": "CPP",
    ".hh": "CPP",
    ".cs": "CSHARP",
    ".php": "PHP",
    ".proto": "PROTO",
    ".rst": "RST",
    ".rb": "RUBY",
    ".rs": "RUST",
    ".scala": "SCALA",
    ".swift": "SWIFT",
    ".md": "MARKDOWN",
    ".markdown": "MARKDOWN",
    ".tex": "LATEX",
    ".html": "HTML",
    ".htm": "HTML",
    ".sol": "SOL",
    ".lua": "LUA",
    ".r": "R",
    ".hs": "HASKELL",
    ".ex": "ELIXIR",
    ".exs": "ELIXIR",
    ".ps1": "POWERSHELL",
    ".cob": "COBOL",
    ".cbl": "COBOL",
}


def code_separators_for(path: str) -> list[str]:
    """Cut preferences for a source file, from langchain's per-language separators."""
    language = _LANGUAGE_BY_SUFFIX.get(PurePosixPath(path).suffix.lower())
    if language is None:
        return list(DEFAULT_CODE_SEPARATORS)
    return list(_language_separators(language))


@cache
def _language_separators(language_name: str) -> tuple[str, ...]:
    from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

    language = getattr(Language, language_name, None)
    if language is None:
        return DEFAULT_CODE_SEPARATORS
    try:
        patterns = RecursiveCharacterTextSplitter.get_separators_for_language(language)
    except ValueError:  # a Language member without separators in this langchain version
        return DEFAULT_CODE_SEPARATORS
    separators: list[str] = []
    for pattern in patterns:
        for literal in regex_to_literals(pattern):
            if literal and literal not in separators:
                separators.append(literal)
    separators.extend(s for s in DEFAULT_CODE_SEPARATORS if s not in separators)
    return tuple(separators)


def regex_to_literals(pattern: str) -> list[str]:
    """Plain strings for one of langchain's separator regexes (it splits with is_separator_regex).

    Only the forms langchain uses are understood: `\\x` escapes, `{m,n}` repeats (expanded, fewest
    first) and `+`/`*` (the literal stops at the repeated atom: "\\n---+\\n" -> "\\n---"). Other
    characters, including an unescaped ".", are taken literally, which is what the patterns mean.
    """
    literals = [""]
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            atom, index = pattern[index + 1], index + 2
        else:
            atom, index = char, index + 1
        following = pattern[index] if index < len(pattern) else ""
        if following == "{" and "}" in pattern[index:]:
            close = pattern.index("}", index)
            low, _, high = pattern[index + 1 : close].partition(",")
            counts = range(int(low), int(high or low) + 1)
            literals = [literal + atom * count for count in counts for literal in literals]
            index = close + 1
        elif following == "+":
            return [literal + atom for literal in literals]
        elif following == "*":
            return literals
        else:
            literals = [literal + atom for literal in literals]
    return literals
