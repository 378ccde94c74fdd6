"""Keep a long-running loop (a consumer, a relay) alive: nothing dies silently.

A loop that raises is logged with its traceback and started again after a backoff (0.5 s
doubling to 30 s; a run that lasted a minute starts the count over). A loop that keeps
crashing (10 times within 10 minutes), or a supervisor that itself ends unexpectedly, marks the
service unhealthy, so ``/healthz`` answers 503 and the orchestrator restarts the process. The
loop is still retried meanwhile, and a run that lasts clears the mark: without an orchestrator
the service heals when the cause goes away.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Protocol

import msgspec

log = logging.getLogger("zapbus.supervisor")


class Runner(Protocol):
    """A long-running loop (a consumer, a relay) that can be asked to stop.

    ``run()`` may be called again after it raised, so it opens what it needs at its start
    and closes it on the way out.
    """

    async def run(self) -> None: ...

    def stop(self) -> None: ...


class Stoppable:
    """The stop half of a periodic ``Runner``: ``stop()`` ends its ``pause()`` at once, and so
    does ``kick()`` (there is work now: a kick that comes while no pause runs ends the next
    one at once, so none is missed)."""

    def __init__(self) -> None:
        self._stopping = asyncio.Event()
        self._woken = asyncio.Event()
        self.kicked = False  # whether the last pause ended early (by a kick or a stop)

    def stop(self) -> None:
        self._stopping.set()
        self._woken.set()

    def kick(self) -> None:
        """Work is waiting: end the current pause (or the next one) now."""
        self._woken.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if stopped or kicked meanwhile; True once stopped."""
        if not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._woken.wait()
        self.kicked = self._woken.is_set()
        self._woken.clear()
        return self._stopping.is_set()

    async def gather(self, seconds: float) -> None:
        """After a kick, wait ``seconds`` so the kicks that follow join this pass (they do
        not end the next pause)."""
        await asyncio.sleep(seconds)
        self._woken.clear()


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    first_delay: float = 0.5
    max_delay: float = 30.0
    # A run that lasted this long was healthy: the backoff and the crash count start over.
    stable_after: float = 60.0
    # This many crashes within ``window`` seconds make the service unhealthy.
    max_failures: int = 10
    window: float = 600.0


class Supervisor:
    """Runs ``runner.run()`` until ``stop()``, restarting it whenever it raises or returns."""

    def __init__(
        self, name: str, runner: Runner, policy: RestartPolicy, unhealthy: dict[str, str]
    ) -> None:
        self.name = name
        self.runner = runner
        self.policy = policy
        self.unhealthy = unhealthy  # the app's /healthz problems, shared
        self.restarts = 0
        self.backing_off = False
        self._stopping = asyncio.Event()
        self._failures: collections.deque[float] = collections.deque()

    def stop(self) -> None:
        self._stopping.set()
        self.runner.stop()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.policy.first_delay
        while not self._stopping.is_set():
            started = loop.time()
            healed = loop.call_later(self.policy.stable_after, self._stable)
            error: BaseException | None = None
            try:
                await self.runner.run()
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being cancelled (shutdown past its grace)
                error = exc  # something inside the loop was cancelled, not the loop
            except Exception as exc:
                error = exc
            finally:
                healed.cancel()
            if self._stopping.is_set():
                if error is not None:
                    log.error("%s failed while stopping", self.name, exc_info=error)
                return
            ran = loop.time() - started
            if ran >= self.policy.stable_after:
                delay = self.policy.first_delay
            self._count_failure(loop.time(), error)
            self.restarts += 1
            if error is None:
                log.error(
                    "%s returned without being asked to stop; restarting in %.1f s",
                    self.name,
                    delay,
                )
            else:
                log.error(
                    "%s crashed after %.1f s; restarting in %.1f s (restart %d)",
                    self.name,
                    ran,
                    delay,
                    self.restarts,
                    exc_info=error,
                )
            self.backing_off = True
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
            finally:
                self.backing_off = False
            delay = min(delay * 2, self.policy.max_delay)

    def _count_failure(self, now: float, error: BaseException | None) -> None:
        self._failures.append(now)
        while self._failures and self._failures[0] < now - self.policy.window:
            self._failures.popleft()
        if len(self._failures) >= self.policy.max_failures and self.name not in self.unhealthy:
            what = "returned unasked" if error is None else repr(error)
            self.unhealthy[self.name] = (
                f"{self.name} crashed {len(self._failures)} times in"
                f" {self.policy.window:.0f} s; last: {what}"
            )[:300]
            log.error("%s keeps crashing; the service is now unhealthy", self.name)

    def _stable(self) -> None:
        """The current run has lasted: forget earlier crashes."""
        self._failures.clear()
        if self.unhealthy.pop(self.name, None) is not None:
            log.warning("%s runs again; the service is healthy again", self.name)

    def watch(self, task: asyncio.Task[None]) -> None:
        """Mark the service unhealthy if the supervisor's own ``task`` ends unexpectedly."""

        def done(t: asyncio.Task[None]) -> None:
            if self._stopping.is_set():
                return
            exc = None if t.cancelled() else t.exception()
            self.unhealthy[self.name] = f"{self.name} is no longer supervised: {exc!r}"[:300]
            log.error("%s supervisor ended; the service is now unhealthy", self.name, exc_info=exc)

        task.add_done_callback(done)
