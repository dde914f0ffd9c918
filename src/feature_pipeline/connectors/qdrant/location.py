"""Where the embedded store lives (QDRANT_PATH): checked before anything opens it.

Any store implementation calls `prepare_store_folder` before opening an embedded store, and
read-only commands call `store_folder_is_empty` so that asking an empty store creates nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from feature_pipeline.settings import SettingsError

PROBE_NAME = ".feature-pipeline-write-probe"


def prepare_store_folder(path: Path) -> Path:
    """Create the folder if needed and prove a file can be written in it; fail naming QDRANT_PATH.

    A read-only file system, a path under a regular file, a folder without write permission or
    a path under /proc all fail here, in one line, before any model is loaded.
    """
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{PROBE_NAME}.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SettingsError(
            f"QDRANT_PATH={path} cannot hold the embedded store: {reason}. Point QDRANT_PATH at "
            "a writable folder (or set QDRANT_URL to use a Qdrant server)."
        ) from None
    return path


def store_folder_is_empty(path: Path) -> bool:
    """True when no store was ever written at `path` (missing or an empty folder)."""
    try:
        return not path.is_dir() or not any(path.iterdir())
    except OSError:
        return False  # unreadable: let opening the store report it
