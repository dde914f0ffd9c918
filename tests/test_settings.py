"""Settings come from the environment; a bad one fails at start naming the variable."""

import pytest

from feature_pipeline.settings import SettingsError, load_settings


def test_defaults_match_the_course_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RABBITMQ_URL", "RABBITMQ_QUEUE", "QDRANT_URL", "QDRANT_PATH"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(_env_file=None)
    assert settings.rabbitmq_url == "amqp://guest:guest@localhost:5672/"
    assert settings.rabbitmq_queue == "default"
    assert settings.dead_letter_queue == "default.dlq"
    assert str(settings.qdrant_path) == "data/qdrant"
    assert settings.qdrant_url is None


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_QUEUE", "twin")
    monkeypatch.setenv("RABBITMQ_SHARDS", "2")
    monkeypatch.setenv("QDRANT_URL", "http://localhost:6333")
    settings = load_settings(_env_file=None)
    assert settings.shard_queues == ["twin.shard.0", "twin.shard.1"]
    assert settings.qdrant_url == "http://localhost:6333"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RABBITMQ_URL", "http://wrong"),
        ("RABBITMQ_PREFETCH", "100000"),
        ("CHUNK_SIZE_POSTS", "not-a-number"),
        ("QDRANT_URL", "localhost:6333"),
        ("EMBEDDING_BACKEND", "gpu"),
    ],
)
def test_bad_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings(_env_file=None)


def test_overlap_must_be_smaller_than_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHUNK_OVERLAP", "300")
    with pytest.raises(SettingsError, match="CHUNK_OVERLAP"):
        load_settings(_env_file=None)


def test_a_cross_field_error_never_echoes_other_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHUNK_OVERLAP", "300")
    monkeypatch.setenv("RABBITMQ_URL", "amqp://user:hunter2@localhost:5672/")
    monkeypatch.setenv("QDRANT_API_KEY", "s3cr3t")
    with pytest.raises(SettingsError) as raised:
        load_settings(_env_file=None)
    assert "CHUNK_OVERLAP" in str(raised.value)
    assert "hunter2" not in str(raised.value) and "s3cr3t" not in str(raised.value)


@pytest.mark.parametrize(
    "url", ["amqp:/guest:hunter2@localhost", "amqp://guest:hunter2@localhost:port/"]
)
def test_a_bad_broker_url_is_reported_masked(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("RABBITMQ_URL", url)
    with pytest.raises(SettingsError, match="RABBITMQ_URL") as raised:
        load_settings(_env_file=None)
    assert "hunter2" not in str(raised.value) and "guest:***@localhost" in str(raised.value)


def test_repr_of_settings_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://user:hunter2@localhost:5672/")
    monkeypatch.setenv("QDRANT_API_KEY", "s3cr3t")
    shown = repr(load_settings(_env_file=None))
    assert "hunter2" not in shown and "s3cr3t" not in shown
    assert "amqp://user:***@localhost:5672/" in shown


@pytest.mark.parametrize(
    ("value", "level"), [("debug", "DEBUG"), (" Warning ", "WARNING"), ("", None)]
)
def test_log_level_is_validated_and_normalised(
    monkeypatch: pytest.MonkeyPatch, value: str, level: str | None
) -> None:
    monkeypatch.setenv("LOG_LEVEL", value)
    assert load_settings(_env_file=None).log_level == level


@pytest.mark.parametrize(("name", "value"), [("LOG_LEVEL", "verbose"), ("LOG_FORMAT", "xml")])
def test_bad_logging_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings(_env_file=None)
