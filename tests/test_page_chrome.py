"""Page chrome: Medium's header and footer and LinkedIn's scraped hashtags are removed."""

from __future__ import annotations

import pytest

from feature_pipeline.processing.page_chrome import register_page_chrome, strip_page_chrome

from .conftest import SAMPLES, read_jsonl

MEDIUM_CHROME = (
    "Open in app",
    "ListenShare",
    "Sign up to discover human stories",
    "Written by",
    "More from",
    "Recommended from Medium",
    "See more recommendations",
    "To make Medium work, we log user data",
)


@pytest.mark.parametrize("index", range(5))
def test_sample_medium_articles_lose_header_and_footer_and_keep_the_body(index: int) -> None:
    content = read_jsonl(SAMPLES / "articles.jsonl")[index]["content"]["Content"]
    body = strip_page_chrome("medium", content)
    for chrome in MEDIUM_CHROME:
        assert chrome in content
        assert chrome not in body, chrome
    # The byline's action bar ends the header; the body starts right after it.
    assert content.index("ListenShare") + len("ListenShare") == content.index(body[:200])
    # Everything before the sign-up wall stays, the references included.
    assert content.index(body[-200:]) + 200 == content.index("Sign up to discover human stories")


def test_a_medium_page_without_a_sign_up_wall_ends_at_the_author_box() -> None:
    page = (
        "Title | PubOpen in appSign upSign inWriteAuthor·FollowPublished inPub·3 min read"
        "·Mar 1, 202412ListenShareThe body. Written by hand, not by a model."
        "FollowWritten by Jane Doe2.4K Followers·Editor for PubMore from Jane Doe"
    )
    assert strip_page_chrome("medium", page) == "The body. Written by hand, not by a model.Follow"


def test_a_quoted_marker_in_the_body_is_not_the_footer() -> None:
    page = (
        "Medium says 'See more recommendations' under every post.\nBody goes on."
        "Recommended from MediumSomeone elseAnother title"
    )
    assert strip_page_chrome("medium", page) == (
        "Medium says 'See more recommendations' under every post.\nBody goes on."
    )


def test_text_without_medium_markers_is_unchanged() -> None:
    text = "A plain article body.\n\nIt has two paragraphs."
    assert strip_page_chrome("medium", text) == text
    assert strip_page_chrome("Medium", text) == text


def test_linkedin_hashtags_are_joined_back_into_tags() -> None:
    text = "Read the course:\nhttps://example.com\nhashtag\n#\nmachinelearning\nhashtag\n#\nmlops"
    assert strip_page_chrome("linkedin", text) == (
        "Read the course:\nhttps://example.com #machinelearning #mlops"
    )
    assert strip_page_chrome("linkedin", "hashtag\n#\nllm first") == "#llm first"
    # The word itself, in a sentence, is text.
    assert strip_page_chrome("linkedin", "Use one hashtag\nper post") == "Use one hashtag\nper post"


def test_an_unknown_platform_keeps_its_text() -> None:
    text = "Open in appListenShare body hashtag\n#\nx"
    assert strip_page_chrome("substack", text) == text


def test_a_platform_registers_one_stripper() -> None:
    with pytest.raises(ValueError, match="'medium' is already registered"):
        register_page_chrome("medium")(lambda text: text)
