"""Text cleaning: normalise post/article text for embedding; pick the repository files to index."""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath

import emoji
import ftfy

URL_PLACEHOLDER = "[URL]"

_URL = re.compile(r"(?:https?://|ftp://|www\.)[^\s<>\"']+", re.IGNORECASE)
# Sentence punctuation right after a URL almost always ends the sentence, not the URL.
_URL_TRAILING = ".,;:!?)]}'\""

# Blocks of pictographs, arrows and ornaments; several of their characters are category Sm
# (e.g. "→"), so the So category alone would miss them.
_DECORATIVE_RANGES: tuple[tuple[int, int], ...] = (
    (0x20D0, 0x20FF),  # combining marks for symbols (arrow/keycap overlays)
    (0x2190, 0x21FF),  # arrows
    (0x2300, 0x23FF),  # miscellaneous technical (⌚, ⏩, ...)
    (0x2500, 0x25FF),  # box drawing, block elements, geometric shapes
    (0x2600, 0x27BF),  # miscellaneous symbols, dingbats
    (0x27F0, 0x27FF),  # supplemental arrows-A
    (0x2900, 0x297F),  # supplemental arrows-B
    (0x2B00, 0x2BFF),  # miscellaneous symbols and arrows
    (0xFE00, 0xFE0F),  # variation selectors
    (0x1F000, 0x1FAFF),  # emoji, pictographs, playing cards, ...
    (0xE0000, 0xE007F),  # tag characters (flag sequences)
    (0xE0100, 0xE01EF),  # variation selectors supplement
)
# Invisible joiners that are left dangling once the emoji they glued together are gone.
_INVISIBLE = frozenset("\u00ad\u200b\u200d\u2060\ufeff")
# Symbols of category So that carry meaning in ordinary text.
_KEPT_SYMBOLS = frozenset("°")

_NON_ASCII = re.compile(r"[0-9#*]?[^\x00-\x7f]+")
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def _is_decorative(char: str) -> bool:
    if char in _INVISIBLE:
        return True
    if char in _KEPT_SYMBOLS:
        return False
    code = ord(char)
    if any(low <= code <= high for low, high in _DECORATIVE_RANGES):
        return True
    return unicodedata.category(char) == "So"


def _strip_decorative_run(match: re.Match[str]) -> str:
    run = emoji.replace_emoji(match.group(0), replace=" ")
    return "".join(" " if _is_decorative(char) else char for char in run)


def _replace_url(match: re.Match[str]) -> str:
    url = match.group(0)
    stripped = url.rstrip(_URL_TRAILING)
    return URL_PLACEHOLDER + url[len(stripped) :]


def remove_decorations(text: str) -> str:
    """Drop emojis and decorative symbols, leaving a space so the words around them stay apart."""
    # Emojis and ornaments are all non-ASCII (a keycap also takes the digit before it), so only
    # those runs are looked at: the emoji package scans text slowly, character by character.
    return _NON_ASCII.sub(_strip_decorative_run, text)


def normalize_whitespace(text: str) -> str:
    """One space between words, no trailing spaces on lines, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _HORIZONTAL_SPACE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def clean_text(text: str) -> str:
    """Clean post/article text: fixed Unicode, plain letters, no emojis or ornaments, [URL]s."""
    # NFKC turns the "bold"/"italic" mathematical letters of social posts into plain letters.
    text = ftfy.fix_text(text, normalization="NFKC")
    text = _URL.sub(_replace_url, text)
    text = remove_decorations(text)
    return normalize_whitespace(text)


def clean_code(text: str) -> str:
    """Source code is kept exactly as written; only Windows line endings become '\\n'."""
    return text.replace("\r\n", "\n")


# Directories whose content is generated, vendored or tool state, never the project's own code.
SKIPPED_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".tox",
        ".nox",
        ".venv",
        "venv",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        "__pycache__",
        "node_modules",
        "bower_components",
        "vendor",
        "third_party",
        "site-packages",
        "dist",
        "build",
        ".eggs",
    }
)
LOCK_FILES = frozenset(
    {
        "package-lock.json",
        "npm-shrinkwrap.json",
        "yarn.lock",
        "pnpm-lock.yaml",
        "poetry.lock",
        "pipfile.lock",
        "cargo.lock",
        "uv.lock",
        "composer.lock",
        "gemfile.lock",
        "go.sum",
    }
)
MINIFIED_SUFFIXES = (".min.js", ".min.css", ".min.mjs")
# Share of non-printable characters above which a decoded file is taken for binary data.
_MAX_NON_PRINTABLE_SHARE = 0.1
_BINARY_SNIFF_CHARS = 8192
#: The non-printable characters a text file has anyway, deleted before the quick check.
_ALLOWED_CONTROLS = str.maketrans("", "", "\n\r\t\f")


def looks_binary(text: str) -> bool:
    """NUL bytes or mostly non-printable characters in the first few KB."""
    sample = text[:_BINARY_SNIFF_CHARS]
    if "\x00" in sample:
        return True
    if not sample:
        return False
    # Nearly every file is all printable but for its whitespace: one C-level check says so
    # without looking at each character in Python.
    if sample.translate(_ALLOWED_CONTROLS).isprintable():
        return False
    non_printable = sum(1 for char in sample if not char.isprintable() and char not in "\n\r\t\f")
    return non_printable / len(sample) > _MAX_NON_PRINTABLE_SHARE


def should_index_file(path: str, text: str, max_bytes: int) -> bool:
    """Whether a repository file is worth embedding: not vendored, lock, minified, binary, huge."""
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if not parts:
        return False
    directories, name = parts[:-1], parts[-1].lower()
    if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in directories):
        return False
    if name in LOCK_FILES or name.endswith(".lock"):
        return False
    if name.endswith(MINIFIED_SUFFIXES):
        return False
    if len(text.encode("utf-8")) > max_bytes:
        return False
    return not looks_binary(text)
