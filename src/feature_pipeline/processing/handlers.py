"""Importing this module registers the parse/clean/chunk handlers of every data type."""

from feature_pipeline.processing import articles, posts, repositories

__all__ = ["articles", "posts", "repositories"]
