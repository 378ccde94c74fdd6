"""The delete flow: remove a generation's session from the server(s) it may be on.

Skipped when the row's current generation wants that session again (a replayed create, the
reconciler's re-create). A session that is not there is done too (``delete_or_gone``). A server
that cannot be reached defers the delete: it stays tracked in ``session_deletes``, the watchdog
re-drives it and the reconciler finds the session once the server answers again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from proto.commands import DeleteSession
from proto.events import SessionDeleted
from services.session_worker.fence import Verdict
from services.session_worker.flow import Deps, Run, retry_or_give_up, servers_of, wait_for
from services.session_worker.outcome import Ack, Outcome
from services.session_worker.server_pool import Server
from zapbus import db
from zapbus.dialects.errors import BaileysError
from zapbus.dialects.removal import delete_or_gone
from zapbus.logs import fields
from zapbus.outbox import untrack_delete

log = logging.getLogger("zapbus.session_worker")


async def run_delete(deps: Deps, cmd: DeleteSession, run: Run) -> Outcome:
    if await deps.fence.check_delete(cmd) is Verdict.DONE:
        # The row's current generation wants this session again (a replayed create, or the
        # reconciler's re-create): deleting it now would undo that.
        await _untrack(deps, cmd)
        return Ack(result="fenced")
    start = time.perf_counter()
    server: Server | None = None
    removed = False  # False: the server had no such session (404 or alike)
    try:
        servers = await servers_of(deps, cmd)
        if not servers:
            # Placed on a server no longer configured: it cannot be called. Tracked, not done
            # (the operator sees it in session_deletes and the worker's log).
            log.warning(
                "delete deferred: the session's Baileys server is not configured",
                extra=fields(connection_id=str(cmd.connection_id), session=cmd.session_name),
            )
            return Ack(result="deferred")
        for server in servers:
            if not await wait_for(deps, server, _reachable(server)):
                # Unreachable (the pool manager's probes fail): not worth retries and dead
                # letters.
                return Ack(result="deferred")
            if server.dialect.keys_by_phone and await deps.fence.phone_serves_another(cmd):
                continue  # the phone's server connection is another connection's now
            removed |= await delete_or_gone(server.dialect, cmd.session_name, cmd.phone_number)
            server.breaker.record(server_down=False)
    except BaileysError as exc:
        if server is not None:
            server.breaker.record(exc.server_down)
        deps.metrics.baileys_seconds.labels("delete", "error").observe(time.perf_counter() - start)
        return await retry_or_give_up(deps, cmd, run, exc)
    deps.metrics.baileys_seconds.labels("delete", "ok").observe(time.perf_counter() - start)
    common = run.common(cmd, "session.deleted")
    await deps.publish.event(SessionDeleted(**common, already_gone=not removed))
    await _untrack(deps, cmd)
    return Ack()


def _reachable(server: Server) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return server.down_since is None

    return check


async def _untrack(deps: Deps, cmd: DeleteSession) -> None:
    """The delete is done (or no longer wanted): stop tracking it for re-drives."""
    if deps.db is None:
        return
    try:
        await untrack_delete(deps.db, cmd.session_name)
    except db.UNAVAILABLE as exc:
        # The watchdog re-drives it later; the delete is idempotent.
        log.warning("delete done but still tracked: %s", exc)
