"""Real-time streaming feature pipeline: warehouse change events -> cleaned docs and embedded chunks."""

__version__ = "0.1.0"
