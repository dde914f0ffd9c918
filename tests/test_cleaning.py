"""Cleaning keeps the words (any script) and drops ornaments; code files are kept byte-exact."""

import unicodedata

import pytest

from feature_pipeline.processing.cleaning import (
    URL_PLACEHOLDER,
    clean_code,
    clean_text,
    looks_binary,
    should_index_file,
)

from .conftest import SAMPLES, read_jsonl

POSTS = [document["content"]["text"] for document in read_jsonl(SAMPLES / "posts.jsonl")]


def math_letters(word: str, small_a: int) -> str:
    """A word in Unicode "mathematical" letters, as social posts fake bold and italic."""
    return "".join(chr(small_a + ord(char) - ord("a")) for char in word)


def test_bold_and_italic_math_letters_become_plain() -> None:
    bold, italic = 0x1D5EE, 0x1D44E  # sans-serif bold / italic small "a"
    text = f"{math_letters('learn', bold)} to {math_letters('build', bold)} {math_letters('fast', italic)}"
    assert clean_text(text) == "learn to build fast"
    assert clean_text(POSTS[0]).startswith("Do you want to learn to build production LLM systems")


def test_emojis_arrows_and_dingbats_are_removed() -> None:
    text = "Ship it 🚀🔥 → now ⭐️ ✅ done ↳ next ➡️ 👨‍👩‍👧 family 1️⃣ step"
    assert clean_text(text) == "Ship it now done next family step"


def test_decorations_do_not_glue_words() -> None:
    assert clean_text("data→model🔥pipeline") == "data model pipeline"


def test_urls_become_placeholders_and_keep_sentence_punctuation() -> None:
    text = "Read https://lnkd.in/dzat6PB6. Code: (www.github.com/decodingml) or http://x.io/a?b=1"
    expected = f"Read {URL_PLACEHOLDER}. Code: ({URL_PLACEHOLDER}) or {URL_PLACEHOLDER}"
    assert clean_text(text) == expected


def test_accented_and_non_latin_letters_punctuation_and_currency_are_kept() -> None:
    text = "Café naïve Straße Ünïcødé — Москва 東京 日本語 ¿Qué? 5 € / $3 / £2 · 20°C (a, b); ok!"
    assert clean_text(text) == text


def test_mojibake_and_curly_quotes_are_fixed() -> None:
    assert clean_text("cafÃ© â€œquotedâ€\x9d donâ€™t") == 'café "quoted" don\'t'
    curly = "\u201cdouble\u201d \u2018single\u2019 don\u2019t"
    assert clean_text(curly) == "\"double\" 'single' don't"


def test_whitespace_is_collapsed_lines_stripped_blank_lines_limited() -> None:
    text = "  first \t\t line   here \r\n   second\u00a0line \n\n\n\n\n third  \n\n"
    assert clean_text(text) == "first line here\nsecond line\n\nthird"


def test_zero_width_and_variation_selectors_are_removed() -> None:
    assert clean_text("zero\u200bwidth joi\u200dner ❤\ufe0f love") == "zero width joi ner love"


def test_empty_and_symbol_only_text_clean_to_empty() -> None:
    assert clean_text("") == ""
    assert clean_text("  \n\t ") == ""
    assert clean_text("🔥 → ⭐") == ""


@pytest.mark.parametrize("text", POSTS[:40])
def test_sample_posts_clean_to_plain_text(text: str) -> None:
    cleaned = clean_text(text)
    assert clean_text(cleaned) == cleaned  # idempotent: nothing left to clean
    assert "http" not in cleaned
    for char in cleaned:
        assert unicodedata.category(char) != "So", repr(char)
        assert not 0x1D400 <= ord(char) <= 0x1D7FF, repr(char)  # mathematical alphanumerics
        assert not 0x2190 <= ord(char) <= 0x21FF, repr(char)  # arrows
    assert "  " not in cleaned
    assert "\n\n\n" not in cleaned


def test_cleaning_the_whole_sample_is_deterministic() -> None:
    assert [clean_text(text) for text in POSTS] == [clean_text(text) for text in POSTS]


def test_code_is_kept_byte_exact_except_windows_line_endings() -> None:
    code = 'class A:\n    def f(self):\t# Tabs, CASE and  spaces\n        return "→ \U0001d5ef"  \n\n\n'
    assert clean_code(code) == code
    assert clean_code(code.replace("\n", "\r\n")) == code


@pytest.mark.parametrize(
    "path",
    [
        "src/app/main.py",
        "README.md",
        "Makefile",
        "lib/builder.py",  # a file named like a skipped directory is fine
        "docs/build.md",
        "pyproject.toml",
    ],
)
def test_ordinary_source_files_are_indexed(path: str) -> None:
    assert should_index_file(path, "print('hello')\n", max_bytes=1000)


@pytest.mark.parametrize(
    "path",
    [
        "node_modules/react/index.js",
        "web/node_modules/x/y.js",
        "vendor/github.com/pkg/errors/errors.go",
        "third_party/lib.c",
        ".venv/lib/python3.11/site-packages/pkg/mod.py",
        ".git/config",
        "dist/app.js",
        "build/lib/pkg/mod.py",
        "pkg/__pycache__/mod.cpython-311.pyc",
        "pkg.egg-info/PKG-INFO",
        "package-lock.json",
        "frontend/yarn.lock",
        "poetry.lock",
        "Pipfile.lock",
        "Cargo.lock",
        "uv.lock",
        "pnpm-lock.yaml",
        "flake.lock",
        "go.sum",
        "static/app.min.js",
        "static\\vendor\\jquery.js",
    ],
)
def test_vendored_lock_and_minified_files_are_skipped(path: str) -> None:
    assert not should_index_file(path, "x = 1\n", max_bytes=1000)


def test_binary_files_are_skipped() -> None:
    assert not should_index_file("logo.png", "\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 1000)
    assert not should_index_file("blob.dat", "\x01\x02\x03\x04\x05abc\x06\x07\x08", 1000)
    assert should_index_file("notes.txt", "Grüße, 東京!\n\tindented\n", 1000)


@pytest.mark.parametrize(
    ("controls", "binary"),
    [(0, False), (10, False), (11, True), (50, True)],
)
def test_looks_binary_counts_non_printable_characters_past_a_tenth(
    controls: int, binary: bool
) -> None:
    # 100 characters: `controls` of them non-printable (a form feed, a bell, a zero-width
    # joiner, ...); the whitespace a text file has anyway never counts.
    others = "\x07\x1b\u200d\x0b\x7f"
    text = "".join(others[i % len(others)] for i in range(controls))
    text += "\n\r\t\fab" + "x" * (94 - controls)
    assert len(text) == 100
    assert looks_binary(text) is binary


def test_oversized_files_are_skipped_by_utf8_length() -> None:
    assert should_index_file("a.py", "x" * 100, max_bytes=100)
    assert not should_index_file("a.py", "x" * 101, max_bytes=100)
    assert not should_index_file("a.py", "é" * 51, max_bytes=100)  # 102 bytes in UTF-8
