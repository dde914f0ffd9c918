"""The benchmark's ceiling pass: `feature-pipeline run` with the embedding model replaced by a
zero-cost stand-in, to measure everything but the model (broker, parse, clean, chunk, store).

For the benchmark only: the vectors it writes are constant and useless for search. `bench/run.py`
starts it as a subprocess, configured by the environment like `run`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from feature_pipeline.cli import serve
from feature_pipeline.domain.types import DataType
from feature_pipeline.processing.embedding import resolve_model_path
from feature_pipeline.settings import Settings, load_settings

#: What the stand-in reports as its device, in logs and in the benchmark's output.
STAND_IN = "zero-cost stand-in (no model)"


class ZeroCostModel:
    """Stands in for a model: one constant unit vector per text, no tokenizing, no forward pass.

    It keeps the real model's name, window and dimension, read from the model's directory, so
    point ids, chunk-size checks and collections are exactly the production ones.
    """

    def __init__(self, model: str) -> None:
        self.name = model
        self.path = resolve_model_path(model)
        self.device = STAND_IN
        folder = Path(self.path)
        config = json.loads((folder / "sentence_bert_config.json").read_text())
        self.max_seq_length = int(config["max_seq_length"])
        modules = json.loads((folder / "modules.json").read_text())
        pooling = next(m for m in modules if m["type"].endswith("Pooling"))
        pooling_config = json.loads((folder / pooling["path"] / "config.json").read_text())
        self.dimension = int(pooling_config["word_embedding_dimension"])
        self._vector = np.zeros(self.dimension, dtype=np.float32)
        self._vector[0] = 1.0

    def embed(
        self,
        texts: Sequence[str],
        token_ids: Sequence[Sequence[int] | None] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        return np.tile(self._vector, (len(texts), 1))


_models: dict[str, ZeroCostModel] = {}


def zero_cost_embedders(settings: Settings, data_type: DataType) -> ZeroCostModel:
    """The ceiling pass's `EmbedderFactory`: one stand-in per configured model."""
    name = settings.model_for(data_type)
    model = _models.get(name)
    if model is None:  # once per model, as the real factory loads each model once
        model = _models[name] = ZeroCostModel(name)
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-w", "--workers", type=int, default=1, help="as `run -w`")
    args = parser.parse_args()
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger(__name__).warning("ceiling pass: the embedding model is a %s", STAND_IN)
    serve(load_settings(), workers=args.workers, embedders=zero_cost_embedders)
    return 0


if __name__ == "__main__":
    sys.exit(main())
