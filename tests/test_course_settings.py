"""The LLM Twin course's environment names: honoured where ours are unset, else ours win with a warning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from feature_pipeline.settings import COURSE_NAMES, DEFAULT_MODEL, SettingsError, load_settings

COURSE_VARIABLES = sorted({name for names in COURSE_NAMES.values() for name in names})
OURS = ("RABBITMQ_URL", "RABBITMQ_QUEUE", "QDRANT_URL", "QDRANT_API_KEY", "MODEL_POSTS")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*COURSE_VARIABLES, *OURS, "MODEL_ARTICLES", "MODEL_REPOSITORIES"):
        monkeypatch.delenv(name, raising=False)


def test_the_course_names_stand_in_for_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    course = {
        "RABBITMQ_HOST": "mq.internal",
        "RABBITMQ_PORT": "5673",
        "RABBITMQ_DEFAULT_USERNAME": "twin",
        "RABBITMQ_DEFAULT_PASSWORD": "p@ss/word",
        "RABBITMQ_QUEUE_NAME": "mongo_data",
        "QDRANT_DATABASE_HOST": "qdrant.internal",
        "QDRANT_DATABASE_PORT": "6334",
        "QDRANT_APIKEY": "k3y",
        "EMBEDDING_MODEL_ID": DEFAULT_MODEL,
    }
    for name, value in course.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(_env_file=None)
    assert settings.rabbitmq_url == "amqp://twin:p%40ss%2Fword@mq.internal:5673/"
    assert settings.rabbitmq_queue == "mongo_data"
    assert settings.dead_letter_queue == "mongo_data.dlq"
    assert settings.qdrant_url == "http://qdrant.internal:6334"
    assert settings.qdrant_api_key == "k3y"
    assert settings.warnings == ()
    assert "p@ss/word" not in repr(settings) and "k3y" not in repr(settings)


def test_qdrant_cloud_when_the_course_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USE_QDRANT_CLOUD", "true")
    monkeypatch.setenv("QDRANT_DATABASE_HOST", "localhost")
    monkeypatch.setenv("QDRANT_CLOUD_URL", "https://xyz.cloud.qdrant.io:6333")
    assert load_settings(_env_file=None).qdrant_url == "https://xyz.cloud.qdrant.io:6333"
    monkeypatch.delenv("QDRANT_CLOUD_URL")
    with pytest.raises(SettingsError, match="USE_QDRANT_CLOUD is true but QDRANT_CLOUD_URL"):
        load_settings(_env_file=None)


def test_ours_win_and_one_warning_names_both_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://guest:hunter2@localhost:5672/")
    monkeypatch.setenv("RABBITMQ_HOST", "elsewhere")
    monkeypatch.setenv("RABBITMQ_DEFAULT_PASSWORD", "s3cr3t")
    monkeypatch.setenv("RABBITMQ_QUEUE", "ours")
    monkeypatch.setenv("RABBITMQ_QUEUE_NAME", "ours")  # the same value: nothing to say
    settings = load_settings(_env_file=None)
    assert settings.rabbitmq_url == "amqp://guest:hunter2@localhost:5672/"
    assert settings.rabbitmq_queue == "ours"
    assert len(settings.warnings) == 1
    (warning,) = settings.warnings
    assert "RABBITMQ_URL" in warning and "RABBITMQ_HOST" in warning
    assert "RABBITMQ_DEFAULT_PASSWORD" in warning
    assert "hunter2" not in warning and "s3cr3t" not in warning and "***" in warning


def test_the_course_model_id_is_the_packaged_model_or_a_local_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EMBEDDING_MODEL_ID", str(tmp_path))
    monkeypatch.setenv("MODEL_ARTICLES", DEFAULT_MODEL)
    settings = load_settings(_env_file=None)
    assert settings.model_posts == settings.model_repositories == str(tmp_path)
    assert settings.model_articles == DEFAULT_MODEL
    (warning,) = settings.warnings
    assert "MODEL_ARTICLES" in warning and "EMBEDDING_MODEL_ID" in warning
    monkeypatch.setenv("EMBEDDING_MODEL_ID", "BAAI/bge-small-en-v1.5")
    with pytest.raises(
        SettingsError, match=r"EMBEDDING_MODEL_ID=BAAI/bge-small-en-v1\.5"
    ) as raised:
        load_settings(_env_file=None)
    assert "MODEL_POSTS" in str(raised.value)


def test_a_bad_course_value_names_the_course_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_PORT", "five")
    with pytest.raises(SettingsError, match="RABBITMQ_PORT"):
        load_settings(_env_file=None)
    monkeypatch.setenv("RABBITMQ_PORT", "5672")
    monkeypatch.setenv("RABBITMQ_HOST", "mq:x")  # a port in the host
    monkeypatch.setenv("RABBITMQ_DEFAULT_PASSWORD", "hunter2")
    with pytest.raises(SettingsError) as raised:
        load_settings(_env_file=None)
    assert "RABBITMQ_URL" in str(raised.value) and "from the course's RABBITMQ_HOST" in str(
        raised.value
    )
    assert "hunter2" not in str(raised.value)


def test_the_warning_is_one_log_line_of_a_command(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "QDRANT_PATH": str(tmp_path / "qdrant"),
        "QDRANT_APIKEY": "t0ken",
        "QDRANT_API_KEY": "mine",
    }
    done = subprocess.run(
        [sys.executable, "-m", "feature_pipeline.cli", "counts"],
        env=env | {"PYTHONPATH": ":".join(sys.path)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "QDRANT_APIKEY" in line]
    assert len(lines) == 1 and "QDRANT_API_KEY" in lines[0], done.stderr
    assert "t0ken" not in done.stderr + done.stdout and "mine" not in done.stderr + done.stdout
