"""Page chrome: per-platform removal of what a scraper keeps besides the author's words.

Scraped pages carry navigation, bylines, sign-up walls, "more from" and "recommended" lists.
Left in, they become chunks that match searches about other articles (a Medium footer lists
the titles of a dozen unrelated posts) and teach a fine-tuned model to write menus. Each
platform registers one stripper; a platform without one keeps its text unchanged.

Strippers are conservative: they cut only at markers that the platform's page layout
produces, and a text without those markers comes back as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Stripper = Callable[[str], str]

_strippers: dict[str, Stripper] = {}


def register_page_chrome(platform: str) -> Callable[[Stripper], Stripper]:
    """Decorator: `@register_page_chrome("medium")` for a `str -> str` stripper."""

    def decorate(stripper: Stripper) -> Stripper:
        key = platform.lower()
        if key in _strippers:
            raise ValueError(f"a page-chrome stripper for {platform!r} is already registered")
        _strippers[key] = stripper
        return stripper

    return decorate


def strip_page_chrome(platform: str, text: str) -> str:
    """The text without the chrome of `platform`'s pages (unchanged for an unknown platform)."""
    stripper = _strippers.get(platform.lower())
    return stripper(text) if stripper is not None else text


# --- Medium ----------------------------------------------------------------------------------

# The header ends with the byline's action bar: "...·16 min read·Mar 16, 2024 1.5K 10 ListenShare".
_MEDIUM_HEADER_END = "ListenShare"
_MEDIUM_HEADER_MAX_CHARS = 1500
# The footer starts at the sign-up wall, or, on pages without one, at the author box or the
# recommendation lists; the first marker found from this list wins.
_MEDIUM_FOOTER_STARTS = (
    re.compile(r"Sign up to discover human stories"),
    re.compile(r"Written by (?:(?!Written by)[^\n]){1,120}?[\d.,]+[KM]? Followers"),
    re.compile(r"Recommended from Medium"),
    re.compile(r"See more recommendations"),
)


@register_page_chrome("medium")
def strip_medium(text: str) -> str:
    header = text.find(_MEDIUM_HEADER_END, 0, _MEDIUM_HEADER_MAX_CHARS)
    start = header + len(_MEDIUM_HEADER_END) if header >= 0 else 0
    end = len(text)
    for marker in _MEDIUM_FOOTER_STARTS:
        # The last occurrence: an article may quote a marker; the page's own footer comes last.
        found = [match.start() for match in marker.finditer(text, start)]
        if found:
            end = found[-1]
            break
    return text[start:end].strip()


# --- LinkedIn --------------------------------------------------------------------------------

# A scraped hashtag is the link text "hashtag", then "#" and the tag on lines of their own.
_LINKEDIN_HASHTAG = re.compile(r"(?:^|\n)hashtag\n#\n(?=\S)")


@register_page_chrome("linkedin")
def strip_linkedin(text: str) -> str:
    return _LINKEDIN_HASHTAG.sub(" #", text).strip()
