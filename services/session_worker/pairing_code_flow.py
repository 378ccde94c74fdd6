"""The pairing-code flow: ask the generation's server for the code a code login shows.

Queued by a code-login create once it succeeded; until the session's socket is open the server
answers 428 and the request is retried. Skipped once the row is linked, failed or superseded.
"""

from __future__ import annotations

import time

from proto.commands import RequestPairingCode
from proto.events import PairingCodeShown
from services.session_worker.fence import Verdict
from services.session_worker.flow import Deps, Run, retry_or_give_up, servers_of
from services.session_worker.outcome import Ack, Outcome
from zapbus.dialects.errors import BaileysError, RetryableError


async def run_pairing_code(deps: Deps, cmd: RequestPairingCode, run: Run) -> Outcome:
    if await deps.fence.check_pairing_code(cmd) is Verdict.DONE:
        return Ack(result="fenced")  # linked, failed or superseded meanwhile: no code wanted
    start = time.perf_counter()
    try:
        servers = await servers_of(deps, cmd)
        if len(servers) != 1:
            raise RetryableError("the connection is not placed on a server yet")
        server = servers[0]
        await server.wait_available(deps.wait_slice)
        code = await server.dialect.request_pairing_code(cmd.session_name, cmd.phone_number)
    except BaileysError as exc:
        deps.metrics.baileys_seconds.labels("pairing_code", "error").observe(
            time.perf_counter() - start
        )
        return await retry_or_give_up(deps, cmd, run, exc)
    deps.metrics.baileys_seconds.labels("pairing_code", "ok").observe(time.perf_counter() - start)
    common = run.common(cmd, "pairing_code.updated")
    await deps.publish.event(PairingCodeShown(**common, code=code))
    return Ack()
