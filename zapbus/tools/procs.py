"""Running zapbus services as child processes (``make run`` and the fault tests).

Each service is ``python -m services.<name>`` with its configuration in the environment, as in
production. ``wait_healthy`` polls its ``/healthz`` with a deadline and takes only an answer
that carries the process's pid: ``zapbus.httpkit.health_answer`` is that answer, for every app
started so (zapbus's services, and the benchmark's stand-ins, which ``bare_healthz`` serves).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import aiohttp


class ServiceProcess:
    def __init__(
        self,
        name: str,
        module: str,
        env: Mapping[str, str],
        health_url: str,
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.env = dict(env)
        self.health_url = health_url
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        out: IO[bytes] | None = None
        if self.log_path is not None:
            self._log = out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env={**os.environ, **self.env},
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            # Ctrl-C on `make run` reaches `zapbus run` only, which stops each service with
            # one SIGTERM (a second signal mid-shutdown would cancel its cleanup)
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        # A new connection per probe: with ZAPBUS_REUSE_PORT several processes share the port,
        # and a kept-alive connection to the first one would never reach the one started next
        # (test_scale_out's second webhook service timed out so on a loaded machine).
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
                try:
                    async with http.get(self.health_url, timeout=aiohttp.ClientTimeout(1)) as r:
                        if r.status == 200 and await self._ours(r):
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(
                        f"{self.name} not healthy at {self.health_url} in {timeout}s"
                    )
                await asyncio.sleep(0.05)

    async def _ours(self, r: aiohttp.ClientResponse) -> bool:
        """Did our process answer? Another one may hold the port (an earlier run still up,
        or a port taken between choosing it and our bind): its 200 is not ours."""
        try:
            body = await r.json(content_type=None)
        except ValueError:
            return False
        return isinstance(body, dict) and self.proc is not None and body.get("pid") == self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the crash the fault tests inflict."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); return the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
