"""A real Prometheus scrapes the running services and counts the connections a test created.

Debian's ``prometheus`` runs on loopback with the project's prometheus.yml, its targets
rewritten to the in-process stack's ports and a 1 s scrape interval. The test then asks the
HTTP API, as the dashboard does: every target up, every alert rule healthy, every dashboard
query valid, and the created connections counted once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from tests.stack import Stack, wait_for
from tests.test_observability import ALERTS_YML, PROMETHEUS_YML, dashboard_exprs
from zapbus.tools.localinfra import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
N_CREATES = 5
CREATED = 'sum(zapbus_worker_commands_total{kind="create", outcome="succeeded"})'
ACCEPTED = (
    'sum(zapbus_http_requests_total{job="gateway", route="/v1/connections",'
    ' method="POST", status="202"})'
)
# What Grafana substitutes for its variables before sending a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s"}

pytestmark = pytest.mark.skipif(
    not Path(PROMETHEUS).is_file(),
    reason="prometheus binary missing: `make deps-system` installs Debian's prometheus package",
)


def adapted_config(stack: Stack, data: Path) -> Path:
    """The project's prometheus.yml, pointed at this stack's ports, scraping every second."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    urls = {
        "gateway": stack.gateway_url,
        "webhook": stack.webhook_url,
        "session_worker": stack.worker_url,
        "projector": stack.projector_url,
        "notifier": stack.notifier_url,
        "baileys_sim": stack.sim_url,
    }
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS_YML)]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [urlsplit(urls[job["job_name"]]).netloc]}]
    path = data / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.asynccontextmanager
async def prometheus(config: Path, data: Path) -> AsyncIterator[str]:
    """Run Prometheus on a free loopback port until the block ends; yield its base URL."""
    port = free_port()
    log = (data / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={data / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                assert proc.returncode is None, (data / "prometheus.log").read_text()[-3000:]
                try:
                    async with http.get(f"{url}/-/ready") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for("Prometheus ready", ready, timeout=30, every=0.1)
        yield url
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        log.close()


async def _api(http: aiohttp.ClientSession, url: str, path: str, **params: str) -> Any:
    async with http.get(f"{url}/api/v1/{path}", params=params) as r:
        body = await r.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]


async def _scalar(http: aiohttp.ClientSession, url: str, query: str) -> float | None:
    result = (await _api(http, url, "query", query=query))["result"]
    return float(result[0]["value"][1]) if result else None


async def test_prometheus_scrapes_every_service_and_counts_the_created_connections(
    stack: Stack, tmp_path: Path
) -> None:
    config = adapted_config(stack, tmp_path)
    async with prometheus(config, tmp_path) as url:
        created = await asyncio.gather(*(stack.create(f"prom-{i}") for i in range(N_CREATES)))
        for connection in created:
            await stack.wait_status(connection["id"], "qr_ready")
        http = stack.http

        async def all_targets_up() -> list[str] | None:
            targets = (await _api(http, url, "targets"))["activeTargets"]
            healthy = sorted(t["labels"]["job"] for t in targets if t["health"] == "up")
            return healthy if len(healthy) == len(targets) == 6 else None

        jobs = await wait_for("every scrape target up", all_targets_up, timeout=20, every=0.25)
        assert jobs == [
            "baileys_sim",
            "gateway",
            "notifier",
            "projector",
            "session_worker",
            "webhook",
        ]

        async def counted() -> tuple[float | None, float | None] | None:
            seen = await _scalar(http, url, CREATED), await _scalar(http, url, ACCEPTED)
            return seen if seen == (N_CREATES, N_CREATES) else None

        await wait_for(f"Prometheus to count {N_CREATES} creates", counted, timeout=20, every=0.25)

        async def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = (await _api(http, url, "rules"))["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return rules if rules and all(r["health"] != "unknown" for r in rules) else None

        rules = await wait_for("every alert rule evaluated", rules_evaluated, timeout=20)
        assert [r["name"] for r in rules if r["health"] != "ok"] == [], rules
        firing = [r["name"] for r in rules if r["state"] != "inactive"]
        assert firing == [], f"alerts pending or firing on a healthy stack: {firing}"

        for where, expr in dashboard_exprs().items():
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            async with http.get(f"{url}/api/v1/query", params={"query": expr}) as r:
                body = await r.json()
            assert body["status"] == "success", f"{where}: {expr}\n{body}"
