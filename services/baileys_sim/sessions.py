"""In-memory sessions of the simulator and the background tasks that send their webhooks.

Each live session owns two tasks: a *lifecycle* task that rotates QR codes (and ends the session
with a 408 close when nobody scans), and a *sender* task (``webhooks.WebhookSender.run``) that POSTs
the session's webhooks one at a time, in order, from a queue. Every webhook body is recorded on
the session for ``/replay``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import msgspec

from .config import SimConfig
from .dialects import sim_dialect
from .dialects.base import SimDialect, SimEvent
from .metrics import SimMetrics
from .webhooks import Outgoing, OutQueue, WebhookSender

__all__ = ["ReplayMode", "ScanResult", "SessionRegistry", "SimSession", "make_qr"]

SCAN_CONNECT_DELAY = 0.05  # between the 515 restart close and "connected"

Status = Literal["connecting", "qr", "connected"]
ReplayMode = Literal["duplicate", "reverse"]
ScanResult = Literal["ok", "missing", "not_showing_qr"]
CreateOutcome = Literal["created", "exists", "failed", "shutting_down"]
DeleteOutcome = Literal["deleted", "missing", "failed"]


@dataclass(eq=False)
class SimSession:
    """One simulated Baileys session."""

    name: str
    webhook_url: str
    status: Status = "connecting"
    # What the create carried that the dialect's webhooks use (WAHA's HMAC key, fazer's
    # verify token; the phone number of a code login).
    secret: str = ""
    phone_number: str | None = None
    pairing_code: str | None = None
    qr: str | None = None  # the QR shown now (servers that do not push it are asked for it)
    qr_count: int = 0
    sent: list[Outgoing] = field(default_factory=list)
    queue: OutQueue = field(default_factory=asyncio.Queue)
    lifecycle: asyncio.Task[None] | None = None
    sender: asyncio.Task[None] | None = None

    def snapshot(self) -> dict[str, Any]:
        """The JSON ``data`` of ``GET /sessions/{name}``."""
        return {"name": self.name, "status": self.status, "qrCount": self.qr_count}


def make_qr(rng: random.Random) -> str:
    """A QR payload shaped like Baileys': ``2@ref,noiseKey,identityKey,advSecret`` (base64)."""
    ref = base64.b64encode(rng.randbytes(75)).decode()  # 100 characters
    keys = [base64.b64encode(rng.randbytes(32)).decode() for _ in range(3)]
    return "2@" + ",".join([ref, *keys])


def make_pairing_code(rng: random.Random) -> str:
    """Eight characters from Baileys' pairing alphabet (no 0, O, 1, I)."""
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTVWXYZ23456789") for _ in range(8))


class SessionRegistry:
    """Live sessions, name reservations, creation counts and webhook delivery."""

    def __init__(
        self,
        config: SimConfig,
        http: aiohttp.ClientSession,
        metrics: SimMetrics,
        dialect: SimDialect | None = None,
    ):
        self.config = config  # replaced as a whole by PATCH /_sim/config
        self.dialect = dialect or sim_dialect(config.kind)
        self.rng = random.Random(config.seed)
        self.live: dict[str, SimSession] = {}
        self.created_count: Counter[str] = Counter()
        # every delete asked for, by name (answered or not): did the client send it?
        self.delete_requests: Counter[str] = Counter()
        # name -> when each create of it reached the server (Unix time), for tests to time
        self.create_requests: dict[str, list[float]] = {}
        self._reserved: set[str] = set()
        self._ended: dict[str, SimSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self._metrics = metrics
        self.webhooks = WebhookSender(
            http,
            metrics,
            self.rng,
            lambda: self.config.webhook_duplicate_rate,
            lambda: self.config.signing_secret,
        )

    # --- names and creation -------------------------------------------------------------------

    def reserve(self, name: str) -> bool:
        """Claim ``name`` for a creation in progress; False if live or already claimed."""
        if name in self.live or name in self._reserved:
            return False
        self._reserved.add(name)
        return True

    def release(self, name: str) -> None:
        """Give up a reservation (the creation attempt failed)."""
        self._reserved.discard(name)

    def create(
        self, name: str, webhook_url: str, secret: str = "", phone_number: str | None = None
    ) -> SimSession:
        """Create the session, queue its first webhooks and start its tasks."""
        self._reserved.discard(name)
        session = SimSession(
            name=name, webhook_url=webhook_url, secret=secret, phone_number=phone_number
        )
        self.live[name] = session
        self.created_count[name] += 1
        self._metrics.sessions_created.inc()
        self._metrics.sessions_live.set(len(self.live))
        if self.config.whatsapp_unreachable:
            # No QR ever: the server reports its loop of closes, gives up and drops it.
            session.sender = self._spawn(self.webhooks.run(webhook_url, session.queue), name)
            self._happen(session, SimEvent(what="gave_up"))
            self._end(session)
            return session
        self._happen(session, SimEvent(what="connecting"))
        self._persist()
        self._emit_qr(session)
        session.sender = self._spawn(self.webhooks.run(webhook_url, session.queue), name)
        session.lifecycle = self._spawn(self._qr_loop(session, self.config), name)
        return session

    async def create_flow(
        self, name: str, webhook_url: str, secret: str = "", phone_number: str | None = None
    ) -> CreateOutcome:
        """A create as a slow, flaky server does it: reserve the name, wait the create delay,
        then create (or fail); sometimes create and then hang before answering."""
        self.create_requests.setdefault(name, []).append(time.time())
        if not self.reserve(name):
            self._metrics.create_requests.labels("conflict").inc()
            return "exists"
        config, rng = self.config, self.rng
        fail = rng.random() < config.fail_rate
        hang = rng.random() < config.timeout_rate
        created = False
        try:
            if await self.pause(rng.uniform(*config.create_delay)):
                return "shutting_down"
            if fail:
                self._metrics.create_requests.labels("failed").inc()
                return "failed"
            self.create(name, webhook_url, secret, phone_number)
            created = True
        finally:
            if not created:
                self.release(name)
        if hang:
            self._metrics.create_requests.labels("hung").inc()
            await self.pause(config.hang_seconds)
        else:
            self._metrics.create_requests.labels("created").inc()
        return "created"

    def delete_flow(self, name: str) -> DeleteOutcome:
        """A delete, failing at the configured rate."""
        self.delete_requests[name] += 1
        if self.rng.random() < self.config.delete_fail_rate:
            return "failed"
        return "deleted" if self.delete(name) else "missing"

    async def pause(self, seconds: float) -> bool:
        """Sleep ``seconds``, cut short when the app shuts down; True if it was cut short."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        return self._closing.is_set()

    # --- operations on live sessions ---------------------------------------------------------

    def delete(self, name: str) -> bool:
        """Stop the session's tasks at once (pending webhooks are dropped) and remove it."""
        session = self.live.pop(name, None)
        if session is None:
            return False
        for task in (session.lifecycle, session.sender):
            if task is not None:
                task.cancel()
        self._ended[name] = session
        self._metrics.sessions_live.set(len(self.live))
        self._persist()
        return True

    def scan(self, name: str, silent: bool = False) -> ScanResult:
        """The phone scanned the QR: 515 restart close, then ``connected``. ``silent``: the
        session connects but those webhooks are lost on the way."""
        session = self.live.get(name)
        if session is None:
            return "missing"
        if session.status != "qr":
            return "not_showing_qr"
        self._stop_lifecycle(session)
        session.status = "connected"
        self._persist()
        if not silent:
            self._happen(session, SimEvent(what="restart_required"))
            self._happen(session, SimEvent(what="connected"), delay=SCAN_CONNECT_DELAY)
        return "ok"

    def pairing_code(self, name: str, phone_number: str) -> str | None:
        """A pairing code for the session (None when it has no open socket yet: Baileys
        answers 428 "Connection Closed" then). One per session; asking again gives a new one."""
        session = self.live.get(name)
        if session is None or session.status != "qr":
            return None
        session.phone_number = phone_number
        session.pairing_code = make_pairing_code(self.rng)
        self._happen(session, SimEvent(what="pairing_code", code=session.pairing_code))
        return session.pairing_code

    def enter_code(self, name: str) -> ScanResult:
        """The user typed the pairing code on the phone: as a scan."""
        session = self.live.get(name)
        if session is None:
            return "missing"
        if session.pairing_code is None:
            return "not_showing_qr"
        return self.scan(name)

    def restart(self) -> list[str]:
        """The server restarted and kept nothing: every session vanishes without a webhook
        (as a Baileys server without persistent auth state does). Returns the names lost."""
        lost = sorted(self.live)
        for name in lost:
            self.delete(name)
        return lost

    def disconnect(self, name: str) -> bool:
        """The connection dropped (428): close webhook, session back to ``connecting``; a
        later ``reconnect`` sends ``connected`` again (identical bodies each cycle)."""
        session = self.live.get(name)
        if session is None or session.status != "connected":
            return False
        session.status = "connecting"
        self._happen(session, SimEvent(what="closed"))
        return True

    def reconnect(self, name: str) -> bool:
        session = self.live.get(name)
        if session is None or session.status != "connecting" or session.qr_count == 0:
            return False
        session.status = "connected"
        self._happen(session, SimEvent(what="connected"))
        return True

    def logout(self, name: str) -> bool:
        """The phone logged out: 401 close, then the session is gone."""
        session = self.live.get(name)
        if session is None:
            return False
        self._stop_lifecycle(session)
        self._happen(session, SimEvent(what="logged_out"))
        self._end(session)
        return True

    def replay(self, name: str, mode: ReplayMode) -> int | None:
        """Send every recorded webhook of ``name`` again; None if the name is unknown.

        ``duplicate`` re-sends them once more in their original order, ``reverse`` in reverse
        order. Works on live sessions (after their pending webhooks) and on ended ones.
        """
        session = self.live.get(name) or self._ended.get(name)
        if session is None:
            return None
        bodies = list(session.sent) if mode == "duplicate" else session.sent[::-1]
        if self.live.get(name) is session:
            queue = session.queue
        else:
            queue = asyncio.Queue()
            self._spawn(self.webhooks.run(session.webhook_url, queue), name)
        for item in bodies:
            queue.put_nowait(item._replace(delay=0.0))
        if queue is not session.queue:
            queue.put_nowait(None)
        return len(bodies)

    def stats(self) -> dict[str, Any]:
        """The JSON of ``GET /_sim/stats``."""
        return {
            "created": dict(self.created_count),
            "create_requested_at": {n: list(t) for n, t in self.create_requests.items()},
            "live": sorted(self.live),
            "states": {name: session.status for name, session in sorted(self.live.items())},
            "webhooks_sent": self.webhooks.sent,
            "webhooks_failed": self.webhooks.failed,
        }

    # --- persistence (ZAPBUS_SIM_STATE_FILE) ----------------------------------------------------

    def _persist(self) -> None:
        if not self.config.state_file:
            return
        saved = {
            name: {
                "webhook_url": s.webhook_url,
                "status": s.status,
                "secret": s.secret,
                "phone_number": s.phone_number,
            }
            for name, s in self.live.items()
        }
        path = Path(self.config.state_file)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(msgspec.json.encode(saved))
        os.replace(tmp, path)

    def restore(self) -> list[str]:
        """Bring back the sessions of the state file: linked ones connect again (a
        ``connected`` webhook), the others start showing QR codes again."""
        path = Path(self.config.state_file) if self.config.state_file else None
        if path is None or not path.exists():
            return []
        saved = msgspec.json.decode(path.read_bytes(), type=dict[str, dict[str, Any]])
        for name, item in saved.items():
            url, secret, phone = item["webhook_url"], item["secret"], item["phone_number"]
            if item["status"] != "connected":
                self.create(name, url, secret, phone)
                continue
            session = SimSession(name=name, webhook_url=url, secret=secret, phone_number=phone)
            session.status, session.qr_count = "connected", 1
            self.live[name] = session
            session.sender = self._spawn(self.webhooks.run(url, session.queue), name)
            self._happen(session, SimEvent(what="connected"))
        self._metrics.sessions_live.set(len(self.live))
        self._persist()
        return sorted(saved)

    # --- shutdown ----------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Cut short every pending creation delay or hang (app shutdown)."""
        self._closing.set()

    async def close(self) -> None:
        """Cancel every background task and wait for them to finish."""
        self._closing.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.live.clear()
        self._metrics.sessions_live.set(0)

    # --- internals ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"baileys-sim:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _stop_lifecycle(self, session: SimSession) -> None:
        task = session.lifecycle
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _end(self, session: SimSession) -> None:
        """Remove a session but let its sender deliver what is already queued."""
        if self.live.get(session.name) is session:
            del self.live[session.name]
        self._ended[session.name] = session
        session.queue.put_nowait(None)
        self._metrics.sessions_live.set(len(self.live))
        self._persist()

    def _happen(self, session: SimSession, event: SimEvent, delay: float = 0.0) -> None:
        """Queue the webhooks the dialect's server sends when ``event`` happens."""
        for out in self.dialect.render(session, event):
            msg_id = f"msg_{uuid.uuid4().hex}" if self.config.webhook_ids else ""
            item = Outgoing(msgspec.json.encode(out.body), delay, msg_id, out.headers)
            session.sent.append(item)
            session.queue.put_nowait(item)
            delay = 0.0

    def _emit_qr(self, session: SimSession) -> None:
        session.qr_count += 1
        session.status = "qr"
        session.qr = make_qr(self.rng)
        self._happen(session, SimEvent(what="qr", qr=session.qr))

    async def _qr_loop(self, session: SimSession, config: SimConfig) -> None:
        wait = config.qr_first_seconds
        while True:
            await asyncio.sleep(wait)
            if session.qr_count >= config.qr_max:
                break
            self._emit_qr(session)
            wait = config.qr_next_seconds
        self._happen(session, SimEvent(what="qr_refs_ended"))
        self._end(session)
