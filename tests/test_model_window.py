"""The chunk-size check's one place (start-up, from the model folder's files): the window as
sentence-transformers decides it, and a folder that does not say refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sentence_transformers import SentenceTransformer

from feature_pipeline.processing.chunking import model_window
from feature_pipeline.processing.embedding import DEFAULT_MODEL, resolve_model_path
from feature_pipeline.settings import SettingsError, load_settings
from feature_pipeline.startup import check_models

SMALL_FILES = ("modules.json", "config.json", "tokenizer.json", "tokenizer_config.json")


def model_files(tmp_path: Path, names: tuple[str, ...]) -> Path:
    """The packaged model's small files (no weights), those named only."""
    source = Path(resolve_model_path(DEFAULT_MODEL))
    folder = tmp_path / "model"
    folder.mkdir()
    for name in names:
        shutil.copy(source / name, folder / name)
    return folder


def test_the_window_is_read_from_sentence_bert_config() -> None:
    path = resolve_model_path(DEFAULT_MODEL)
    model = SentenceTransformer(path, device="cpu")
    assert model_window(path) == (model.max_seq_length, 2) == (256, 2)


def test_without_sentence_bert_config_the_window_is_what_sentence_transformers_takes(
    tmp_path: Path,
) -> None:
    folder = model_files(tmp_path, SMALL_FILES)
    # sentence-transformers' Transformer: min(max_position_embeddings, model_max_length).
    assert model_window(str(folder)) == (512, 2)


def test_a_model_folder_that_does_not_say_its_window_is_refused_at_start(tmp_path: Path) -> None:
    folder = model_files(tmp_path, ("modules.json", "tokenizer.json"))
    assert model_window(str(folder)) is None
    settings = load_settings(_env_file=None, model_posts=str(folder))
    with pytest.raises(SettingsError, match=r"MODEL_POSTS: .* does not say how many word pieces"):
        check_models(settings)
