"""Small recurring chores inside a process (gauges, the Billing budget share)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import psycopg
import psycopg_pool

logger = logging.getLogger(__name__)


class Every:
    """Run `chore` every `seconds` until stopped.

    Stopped by an event rather than by cancellation alone: on Python 3.11 a
    cancel that lands as an inner `wait_for` completes can be lost, and a
    shutdown that waits for such a task would hang for ever.
    """

    def __init__(self, seconds: float, chore: Callable[[], Awaitable[None]], name: str) -> None:
        self.seconds = seconds
        self.chore = chore
        self.name = name
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Every:
        self._task = asyncio.create_task(self._loop(), name=self.name)
        return self

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.chore()
            except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
                # The database is away (a restart, a failover): expected, and
                # said by /ready and the alerts; one line, no traceback.
                logger.warning("%s: database unavailable (%s); trying again", self.name, exc)
            except Exception:
                logger.exception("%s failed; trying again in %.0fs", self.name, self.seconds)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.seconds):
                    await self._stop.wait()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop, waiting at most `grace` seconds twice: for the chore, then for its cancel."""
        self._stop.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=grace)
        if not done:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=grace)
