"""A crash-safe JSON file holding a CDC position (the MongoDB resume token and snapshot phase)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class PositionFileError(RuntimeError):
    """The position file exists but cannot be read as a position; the message names it."""


class FilePositionStore:
    """Load and atomically replace one JSON object in a file.

    `save` writes a temporary file in the same directory, fsyncs it, renames it over the old
    file and fsyncs the directory: after a crash the file holds either the old or the new
    position, never a torn mix, and a saved position survives a power loss.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PositionFileError(f"position file {self.path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PositionFileError(f"position file {self.path} must hold a JSON object")
        return data

    def save(self, data: dict[str, Any]) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                json.dump(data, tmp, sort_keys=True)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self.path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # makes the rename itself durable
        finally:
            os.close(dir_fd)
