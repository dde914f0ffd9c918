"""The one renderer of URLs and settings for humans masks every password and key."""

import pytest

from feature_pipeline.redaction import redact, redact_value, render_settings


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("amqp://user:hunter2@host:5672/", "amqp://user:***@host:5672/"),
        ("amqp:/guest:hunter2@localhost", "amqp:/guest:***@localhost"),  # malformed
        ("amqp://user:p@ss@host:5672/v", "amqp://user:***@host:5672/v"),  # '@' in the password
        (
            "cannot reach amqps://u:hunter2@h/ (RABBITMQ_URL)",
            "cannot reach amqps://u:***@h/ (RABBITMQ_URL)",
        ),
        (
            "mongodb://u:hunter2@h1:27017,h2/db?replicaSet=rs",
            "mongodb://u:***@h1:27017,h2/db?replicaSet=rs",
        ),
        ("host=db user=app password=hunter2 dbname=w", "host=db user=app password=*** dbname=w"),
        ("http://q:6333/?api_key=hunter2&x=1", "http://q:6333/?api_key=***&x=1"),
        ("amqp://guest@localhost/", "amqp://guest@localhost/"),  # nothing secret
        ("http://q:6333/collections/a@b", "http://q:6333/collections/a@b"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_secret_settings_are_masked_whole() -> None:
    assert redact_value("qdrant_api_key", "hunter2") == "***"
    assert redact_value("qdrant_api_key", None) == "None"
    assert render_settings(
        {"rabbitmq_url": "amqp://u:hunter2@h/", "qdrant_api_key": "k", "batch_size": 8}
    ) == {"RABBITMQ_URL": "amqp://u:***@h/", "QDRANT_API_KEY": "***", "BATCH_SIZE": "8"}
