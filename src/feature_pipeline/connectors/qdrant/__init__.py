"""Qdrant: the feature store's collections and the Bytewax sink that keeps them in sync."""
