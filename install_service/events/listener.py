"""One LISTEN connection per process, waking long-polling feed readers.

Every event's transaction notifies `install_service_events` with its organization id (a
trigger; PostgreSQL delivers notifications at commit, and never for a rollback). The listener
holds one dedicated connection, outside the pool, and sets the wake-up of every reader
waiting for that organization or for all. If the connection drops, every reader is woken
(they look again), and the listener reconnects with a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg

log = logging.getLogger("install_service.events")

CHANNEL = "install_service_events"


class Listener:
    channel = CHANNEL

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._waiters: dict[uuid.UUID | None, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    @contextlib.contextmanager
    def subscribe(self, organization_id: uuid.UUID | None) -> Iterator[asyncio.Event]:
        """An event set whenever an event of the organization (None: of any) commits."""
        woken = asyncio.Event()
        self._waiters.setdefault(organization_id, set()).add(woken)
        try:
            yield woken
        finally:
            waiters = self._waiters.get(organization_id)
            if waiters is not None:
                waiters.discard(woken)
                if not waiters:
                    del self._waiters[organization_id]

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            organization_id: uuid.UUID | None = uuid.UUID(payload)
        except ValueError:
            organization_id = None
        for key in {organization_id, None}:
            for woken in self._waiters.get(key, ()):
                woken.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for woken in waiters:
                woken.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="events-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        pause = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            # Set when the coroutine is discarded unfinished (its loop closed without stopping
            # the listener): nothing may be awaited then, only let go of.
            discarded = False
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self.channel, self._notified)
                self.connected.set()
                pause = 0.5
                # Anything committed while we were away: let every reader look.
                self._wake_all()
                await lost.wait()
                log.warning("event listener lost its connection; reconnecting")
            except GeneratorExit:
                discarded = True
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event listener cannot connect (%s); retrying in %.1f s", exc, pause)
            finally:
                self.connected.clear()
                if discarded:
                    # Its loop is gone, and with it the readers waiting on it: waking them
                    # would schedule on that loop. Only the connection is let go.
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.terminate()
                else:
                    self._wake_all()
                    if conn is not None and not conn.is_closed():
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(conn.close(), timeout=2)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 10)
