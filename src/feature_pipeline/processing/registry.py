"""The handler registry: one handler per (data type, step); a new data type registers its own."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeVar

from feature_pipeline.domain.types import DataType

Handler = TypeVar("Handler", bound=Callable[..., Any])


class Step(StrEnum):
    #: dict (the warehouse document) -> RawDocument subclass
    PARSE = "parse"
    #: (RawDocument, entry_id) -> CleanedDocument subclass
    CLEAN = "clean"
    #: (CleanedDocument, TokenSplitter) -> list[Chunk subclass]
    CHUNK = "chunk"


class MissingHandler(LookupError):
    """No handler is registered for a (data type, step) pair."""


class HandlerRegistry:
    def __init__(self) -> None:
        self._handlers: dict[tuple[DataType, Step], Callable[..., Any]] = {}

    def register(self, data_type: DataType, step: Step) -> Callable[[Handler], Handler]:
        """Decorator: `@registry.register(DataType.POSTS, Step.CLEAN)`."""

        def decorate(handler: Handler) -> Handler:
            key = (data_type, step)
            if key in self._handlers:
                raise ValueError(
                    f"a {step.value!r} handler for {data_type.value!r} is already registered"
                )
            self._handlers[key] = handler
            return handler

        return decorate

    def get(self, data_type: DataType, step: Step) -> Callable[..., Any]:
        try:
            return self._handlers[(data_type, step)]
        except KeyError:
            raise MissingHandler(
                f"no {step.value!r} handler is registered for data type {data_type.value!r}"
            ) from None

    def data_types(self) -> list[DataType]:
        return sorted({data_type for data_type, _ in self._handlers})


registry = HandlerRegistry()
