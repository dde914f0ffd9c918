"""`--version`, and `--help` of every command: option defaults and the environment it reads."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version

import pytest

from feature_pipeline.cli import COMMAND_SETTINGS, build_parser, main
from feature_pipeline.settings import SETTING_GROUPS, Settings, settings_of


def commands() -> list[tuple[str, ...]]:
    """Every command and subcommand as typed: ("run",), ("dlq", "list"), ..."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found.append((*path, name))
                    walk(child, (*path, name))

    walk(build_parser(), ())
    return found


def help_of(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", commands(), ids=" ".join)
def test_every_command_lists_its_environment_with_defaults(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_of(command, capsys)
    assert "environment (or .env), with defaults:" in text
    for group in COMMAND_SETTINGS[command[0]]:
        for name in settings_of(group):
            assert f"\n  {name.upper()} " in text, (command, name)
    assert "LOG_LEVEL" in text


def test_what_each_command_reads(capsys: pytest.CaptureFixture[str]) -> None:
    run = help_of(("run",), capsys)
    assert "RABBITMQ_PREFETCH           10000" in run and "QDRANT_PATH " in run
    assert "EMBEDDING_DEVICE            auto" in run and "QUERY_PORT                  8723" in run
    assert (
        "-w WORKERS, --workers WORKERS\n                        worker threads per process (default: 1)"
        in run
    )
    publish = help_of(("publish",), capsys)
    assert "RABBITMQ_URL" in publish and "QDRANT_PATH" not in publish
    assert "MODEL_POSTS" not in publish and "(default: insert)" in publish
    search = help_of(("search",), capsys)
    assert "MODEL_POSTS" in search and "RABBITMQ_URL" not in search
    assert "(default: 5)" in search
    backfill = help_of(("backfill",), capsys)
    assert "(default: data/dead_letters)" in backfill and "RABBITMQ_URL" not in backfill


def test_every_setting_belongs_to_exactly_one_group() -> None:
    grouped = [name for group in SETTING_GROUPS for name in settings_of(group)]
    assert sorted(grouped) == sorted(Settings.model_fields)


def test_version_is_the_installed_package_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "feature_pipeline.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"feature-pipeline {version('feature-pipeline')}"
