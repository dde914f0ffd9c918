"""`python -m bytewax.run feature_pipeline.flow:flow`: the `run` dataflow, set up at import.

For the LLM Twin course's habit of starting the pipeline with Bytewax's own runner. Importing this
module does what `feature-pipeline run` does before consuming: it reads the settings from the
environment (and `.env`), runs the same start-up checks (one `error:` line and exit 2 on a bad
setting), installs the same SIGTERM/Ctrl-C handling, starts the status page and query service,
and loads the models. Bytewax's runner then runs `flow`; its `-w` sets the workers, its `-s` the
epoch length (default 10 s: messages are acknowledged that often). `BYTEWAX_WORKERS_PER_PROCESS`
and `BYTEWAX_ADDRESSES`, if set, size the store writers as `run -w`/`-a` would.
"""

from __future__ import annotations

import atexit
import logging
import os

from feature_pipeline.cli import EXIT_CONFIG, EXIT_ERROR, _exit_now, _fail, prepare_service
from feature_pipeline.connectors.qdrant.store import close_stores
from feature_pipeline.logs import configure_logging
from feature_pipeline.settings import SettingsError, get_settings


def _positive_env_int(name: str) -> int:
    value = os.environ.get(name, "").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise SettingsError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


try:
    _settings = get_settings()
    configure_logging(_settings.log_level or "INFO", _settings.log_format)
    for _warning in _settings.warnings:
        logging.getLogger("feature_pipeline").warning("%s", _warning)
    _addresses = os.environ.get("BYTEWAX_ADDRESSES", "")
    flow, _signals = prepare_service(
        _settings,
        workers=_positive_env_int("BYTEWAX_WORKERS_PER_PROCESS"),
        processes=len(_addresses.split(";")) if _addresses else 1,
    )
except SettingsError as _exc:
    _exit_now(_fail(_exc, EXIT_CONFIG))
except (ValueError, FileNotFoundError, RuntimeError) as _exc:
    _exit_now(_fail(_exc, EXIT_ERROR))

# `run` releases the embedded store in its own `finally`; Bytewax's runner has none.
atexit.register(close_stores)
