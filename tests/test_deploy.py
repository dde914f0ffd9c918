"""The production compose file and image agree with the code: commands, settings, plugins, pins.

Docker cannot run on the development machines, so this is what can be checked here: every
command line in the compose file parses with the real CLI, every variable is a setting the
pipeline accepts (with its value), and the pieces the pipeline depends on are in place.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from feature_pipeline.cli import build_parser
from feature_pipeline.settings import Settings, load_settings

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
#: Read by the CLI itself rather than by the settings.
NON_SETTINGS = {"LOG_LEVEL"}


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def app_services() -> dict[str, dict[str, Any]]:
    """The services that run our image."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("image") == "feature-pipeline:latest"
    }


def test_every_warehouse_has_its_cdc_service_and_the_pipeline_runs_by_default() -> None:
    apps = app_services()
    assert set(apps) == {"pipeline", "cdc-mongo", "cdc-postgres"}
    assert "profiles" not in apps["pipeline"]
    assert apps["cdc-mongo"]["profiles"] == compose()["services"]["mongo"]["profiles"]
    assert apps["cdc-postgres"]["profiles"] == compose()["services"]["postgres"]["profiles"]


@pytest.mark.parametrize("service", ["pipeline", "cdc-mongo", "cdc-postgres"])
def test_each_command_parses_with_the_real_cli(service: str) -> None:
    command = app_services()[service]["command"]
    args = build_parser().parse_args(command)
    assert callable(args.func)


@pytest.mark.parametrize("service", ["pipeline", "cdc-mongo", "cdc-postgres"])
def test_each_environment_is_valid_settings(service: str) -> None:
    environment = {k: str(v) for k, v in app_services()[service]["environment"].items()}
    fields = {name.upper() for name in Settings.model_fields}
    assert set(environment) - NON_SETTINGS <= fields, "unknown variables"
    settings = load_settings(
        _env_file=None, **{k.lower(): v for k, v in environment.items() if k not in NON_SETTINGS}
    )
    assert settings.qdrant_url == "http://qdrant:6333"  # the server, not an embedded store
    assert settings.rabbitmq_url.startswith("amqp://guest:guest@rabbitmq:5672")


def test_cdc_services_reach_their_warehouse_by_its_service_name() -> None:
    services = compose()["services"]
    mongo = build_parser().parse_args(services["cdc-mongo"]["command"])
    assert mongo.uri.startswith("mongodb://mongo:27017/") and "replicaSet=rs0" in mongo.uri
    assert "--replSet" in services["mongo"]["command"]
    state = Path(mongo.state_file)
    assert any(v.endswith(f":{state.parent}") for v in services["cdc-mongo"]["volumes"])
    postgres = build_parser().parse_args(services["cdc-postgres"]["command"])
    assert "@postgres:5432/" in postgres.dsn
    assert "wal_level=logical" in services["postgres"]["command"]


def test_the_broker_has_the_consistent_hash_exchange_plugin() -> None:
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert re.fullmatch(r"\[[a-z_,]+\]\.\n", plugins), "an Erlang list term ending with '.'"
    assert "rabbitmq_consistent_hash_exchange" in plugins
    volumes = compose()["services"]["rabbitmq"]["volumes"]
    assert "./rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro" in volumes


def test_the_pipeline_gets_time_to_finish_its_batch_on_stop() -> None:
    assert app_services()["pipeline"]["stop_grace_period"] == "2m"


def test_the_image_pins_the_cpu_torch_of_pyproject_and_stays_offline() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    assert f"--index-url https://download.pytorch.org/whl/cpu {pin}" in dockerfile
    assert "HF_HUB_OFFLINE=1" in dockerfile
    assert 'pip install ".[cdc]"' in dockerfile  # the CDC services run this image too


def exported_series() -> set[str]:
    """Every sample name the pipeline's /metrics can show (counters observed once, so their
    labelled series appear too)."""
    from feature_pipeline.metrics import COUNTER_LABELS, COUNTERS, HISTOGRAMS, Metrics

    own = Metrics()
    for name in COUNTERS:
        own.add(name, 1, label="x" if name in COUNTER_LABELS else None)
    for name in HISTOGRAMS:
        own.observe(name, 1.0)
    own.queue_depth.labels("q").set(1)
    return {
        line.split("{")[0].split(" ")[0]
        for line in own.prometheus().splitlines()
        if line and not line.startswith("#")
    }


def test_prometheus_scrapes_the_pipeline_query_service() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "feature-pipeline")
    assert job["metrics_path"] == "/metrics"
    port = int(app_services()["pipeline"]["environment"].get("QUERY_PORT", Settings().query_port))
    assert job["static_configs"][0]["targets"] == [f"pipeline:{port}"]
    # The query service listens beyond loopback inside the compose network only.
    assert app_services()["pipeline"]["environment"]["QUERY_HOST"] == "0.0.0.0"
    services = compose()["services"]
    assert (
        "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in (services["prometheus"]["volumes"])
    )


def test_every_dashboard_query_reads_a_metric_the_code_exports() -> None:
    dashboard = json.loads(
        (DEPLOY / "grafana" / "dashboards" / "feature-pipeline.json").read_text()
    )
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    used = {
        name
        for expr in exprs
        for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
        if name.startswith(("feature_pipeline_", "process_"))
    }
    assert used, "no metric in the dashboard"
    assert used <= exported_series(), f"not exported: {sorted(used - exported_series())}"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"][0]
    assert {panel["datasource"]["uid"] for panel in dashboard["panels"]} == {datasource["uid"]}
    assert datasource["url"] == "http://prometheus:9090"
