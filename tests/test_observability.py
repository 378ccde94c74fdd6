"""The dashboard and the alerts stay honest: what they query is exported, and promtool agrees.

One create runs through the in-process stack; then every service's ``/metrics`` must pass
``promtool check metrics``, every metric named in a dashboard query or an alert rule must be
among the samples some service exports, and no label value may be a connection id or a session
name. ``promtool`` checks prometheus.yml and alerts.yml, and runs the alerts' unit tests.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.stack import Stack
from tests.test_compose import SERVICES as COMPOSE_SERVICES
from tests.test_compose import configured_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
PROMTOOL = shutil.which("promtool")

# Series Prometheus makes itself rather than scraping them from a service.
PROMETHEUS_OWN = {"up"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$:])[a-zA-Z_:][a-zA-Z0-9_:]*")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)")
_CONNECTION_LIKE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-|zb_[0-9a-f]{32}")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries, $__rate_interval
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if not rest.startswith("(") and match[0].lower() not in _KEYWORDS:
            names.add(match[0])
    return names


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in panels:
        out.append(panel)
        out += _panels(panel.get("panels", []))
    return out


def dashboard_exprs() -> dict[str, str]:
    """Every PromQL query of every dashboard, keyed by where it is used."""
    exprs = {}
    for path in DASHBOARDS:
        for panel in _panels(json.loads(path.read_text())["panels"]):
            for target in panel.get("targets", []):
                exprs[f"{path.name}: {panel['title']} ({target['refId']})"] = target["expr"]
    return exprs


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS_YML.read_text())
    return {
        f"alerts.yml: {rule['alert']}": rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
    }


def sample_names(exposition: str) -> set[str]:
    """Names of the samples in a Prometheus text exposition (``_total``, ``_bucket`` ...)."""
    return {m[1] for line in exposition.splitlines() if (m := _SAMPLE.match(line))}


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.skip("promtool missing: `make deps-system` installs Debian's prometheus package")
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


async def _promtool_check_metrics(exposition: str) -> tuple[int, str]:
    if PROMTOOL is None:
        pytest.skip("promtool missing: `make deps-system` installs Debian's prometheus package")
    proc = await asyncio.create_subprocess_exec(
        PROMTOOL,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(exposition.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def test_metric_names_finds_selectors_only() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, job) (rate(a_bucket{route="/x {y}", s=~"5.."}'
        "[$__rate_interval]))) / on (job) group_left sum without (le) (b_total offset 5m)"
        " > bool 0 and up unless c:recorded"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up", "c:recorded"}


def test_dashboards_and_alerts_have_queries() -> None:
    assert DASHBOARDS, "no dashboard JSON under deploy/grafana/dashboards"
    assert len(dashboard_exprs()) >= 20
    assert set(alert_exprs()) >= {
        "alerts.yml: ZapbusDeadLetters",
        "alerts.yml: ZapbusProjectorLagHigh",
        "alerts.yml: ZapbusBaileysBreakerOpen",
        "alerts.yml: ZapbusConnectionsStuckCreating",
    }


async def _scrape_all(stack: Stack) -> dict[str, str]:
    urls = {
        "gateway": stack.gateway_url,
        "webhook": stack.webhook_url,
        "session_worker": stack.worker_url,
        "projector": stack.projector_url,
        "notifier": stack.notifier_url,
        "baileys_sim": stack.sim_url,
    }
    out = {}
    for service, url in urls.items():
        async with stack.http.get(f"{url}/metrics") as r:
            assert r.status == 200, f"{service} /metrics: {r.status}"
            assert r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
            out[service] = await r.text()
    return out


async def test_every_queried_metric_is_exported_and_passes_promtool(stack: Stack) -> None:
    created = await stack.create("observed")
    await stack.wait_status(created["id"], "qr_ready")
    wanted: dict[str, set[str]] = {}
    for where, expr in {**dashboard_exprs(), **alert_exprs()}.items():
        for name in metric_names(expr) - PROMETHEUS_OWN:
            wanted.setdefault(name, set()).add(where)
    # The consumer gauges are set by a background task: give it a few seconds (more on a
    # loaded machine).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    while True:
        scraped = await _scrape_all(stack)
        exported = set().union(*(sample_names(text) for text in scraped.values()))
        missing = {name: sorted(where) for name, where in wanted.items() if name not in exported}
        if not missing or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert not missing, f"queried but exported by no service: {json.dumps(missing, indent=2)}"

    for service, text in scraped.items():
        code, out = await _promtool_check_metrics(text)
        assert code == 0, f"promtool check metrics on {service}:\n{out}"
        assert "zapbus_" in text, service
        leaked = _CONNECTION_LIKE.search(text)
        assert leaked is None, f"{service} has a per-connection label value: {leaked[0]}"


def test_promtool_accepts_the_prometheus_config_and_rules() -> None:
    for args in (
        ("check", "config", str(PROMETHEUS_YML)),
        ("check", "rules", str(ALERTS_YML)),
        ("test", "rules", str(ALERTS_YML.with_name("alerts_test.yml"))),
    ):
        result = _promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_prometheus_scrapes_every_compose_service_on_its_port() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    expected = {"gateway", "webhook", "session_worker", "projector", "notifier", "baileys_sim"}
    assert set(targets) == expected
    for job, (target,) in targets.items():
        host, port = target.rsplit(":", 1)
        assert host == job and host in COMPOSE_SERVICES
        assert int(port) == configured_port(job), job


def test_compose_mounts_the_deploy_files_and_grafana_uses_the_provisioned_datasource() -> None:
    for name in ("prometheus", "grafana"):
        service = COMPOSE_SERVICES[name]
        for volume in service["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).is_dir(), f"{name} mounts missing {source}"
    grafana_env = COMPOSE_SERVICES["grafana"]["environment"]
    assert grafana_env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana_env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = [
        ds
        for path in (provisioning / "datasources").glob("*.yml")
        for ds in yaml.safe_load(path.read_text())["datasources"]
    ]
    uids = {ds["uid"] for ds in sources if ds["type"] == "prometheus"}
    assert uids, "no Prometheus datasource provisioned"
    for ds in sources:
        assert ds["url"] == "http://prometheus:9090"
    providers = [
        p
        for path in (provisioning / "dashboards").glob("*.yml")
        for p in yaml.safe_load(path.read_text())["providers"]
    ]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in COMPOSE_SERVICES["grafana"]["volumes"]}
    for provider in providers:
        assert mounted.get(provider["options"]["path"]) == "./deploy/grafana/dashboards"
    for path in DASHBOARDS:
        for panel in _panels(json.loads(path.read_text())["panels"]):
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] in uids, f"{path.name}: {panel['title']}"
                for target in panel["targets"]:
                    assert target["datasource"]["uid"] in uids
