"""Warehouse documents as the crawlers store them (the raw state), one model per data type."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RawDocument(BaseModel):
    """Base of every warehouse document; unknown extra fields are tolerated and ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class PostContent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    text: str = ""


class PostDocument(RawDocument):
    platform: str
    content: PostContent
    author_id: str
    image: str | None = None


class ArticleContent(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    title: str = Field(default="", alias="Title")
    subtitle: str | None = Field(default=None, alias="Subtitle")
    content: str = Field(default="", alias="Content")


class ArticleDocument(RawDocument):
    platform: str
    link: str
    content: ArticleContent
    author_id: str


class RepositoryDocument(RawDocument):
    name: str
    link: str
    content: dict[str, str]
    owner_id: str
