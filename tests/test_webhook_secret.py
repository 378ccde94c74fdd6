"""The built-in webhook secret is public: the services that use it (webhook, session worker)
refuse to start with it unless ``ZAPBUS_ENV=dev``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from services.session_worker.app import create_app as create_worker
from services.webhook.app import create_app as create_webhook
from zapbus.config import DEV_WEBHOOK_SECRET, ConfigError, Settings, load_settings
from zapbus.tools.localinfra import free_port
from zapbus.tools.procs import ServiceProcess

USERS = {"webhook": "ZAPBUS_WEBHOOK_PORT", "session_worker": "ZAPBUS_WORKER_PORT"}


def _clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ZAPBUS_")}


def test_the_default_secret_is_refused_outside_dev() -> None:
    production = load_settings({})
    assert production.env == "production" and production.webhook_secret == DEV_WEBHOOK_SECRET
    for create in (create_webhook, create_worker):
        with pytest.raises(ConfigError, match="ZAPBUS_WEBHOOK_SECRET"):
            create(production)
        create(load_settings({"ZAPBUS_ENV": "dev"}))
        create(load_settings({"ZAPBUS_WEBHOOK_SECRET": "a-long-random-secret"}))
    with pytest.raises(ConfigError, match="ZAPBUS_WEBHOOK_SECRET"):
        create_webhook(msgspec.structs.replace(production, webhook_secret=""))


@pytest.mark.parametrize("service", sorted(USERS))
def test_service_process_refuses_to_start_naming_the_variable(service: str) -> None:
    env = {
        **_clean_environ(),
        "ZAPBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}",  # nothing there
        USERS[service]: str(free_port()),
    }
    out = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "ZAPBUS_WEBHOOK_SECRET" in out.stderr
    assert "Traceback" not in out.stderr


async def test_service_process_starts_with_the_default_secret_in_dev(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **_clean_environ(),
        "ZAPBUS_ENV": "dev",
        "ZAPBUS_NATS_URL": settings.nats_url,
        "ZAPBUS_NAMESPACE": settings.namespace,
        "ZAPBUS_WEBHOOK_PORT": str(port),
        "ZAPBUS_SHUTDOWN_GRACE_SECONDS": "3",
    }
    proc = ServiceProcess(
        "webhook", "services.webhook", env, f"http://127.0.0.1:{port}/healthz", tmp_path / "log"
    )
    proc.start()
    try:
        await proc.wait_healthy(timeout=60)
    finally:
        assert proc.stop(timeout=15) == 0, (tmp_path / "log").read_text()[-2000:]
