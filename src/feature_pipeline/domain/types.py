"""The data types the warehouse holds; each has its own collections and handlers."""

from __future__ import annotations

from enum import StrEnum


class DataType(StrEnum):
    POSTS = "posts"
    ARTICLES = "articles"
    REPOSITORIES = "repositories"

    @property
    def cleaned_collection(self) -> str:
        return f"cleaned_{self.value}"

    @property
    def vector_collection(self) -> str:
        return f"vector_{self.value}"
