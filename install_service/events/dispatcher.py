"""Each worker process's webhook dispatcher: many lanes at once, each one in order.

A lane (endpoint, organization) sends one request at a time, in feed order (see
`events.webhooks`). The dispatcher keeps each lane it knows of in one of three states: ready
(look at it now), waiting (look again at a time: a retry's back-off, another worker's lease,
a transaction still running that may add an earlier event) or in flight (leased here; its
request is out, or its outcome not recorded yet). One loop, on a connection of its own whose
every statement commits as it completes, runs one statement after another, each of which
records every outcome that came in since the last one and leases the next delivery of up to
`LEASE_BATCH` ready lanes (a lane whose outcome it records among them: the lane's next
delivery goes out as its last one is recorded), leaving out lanes whose endpoint already has
`connections_per_endpoint` requests in flight from this process. Each leased delivery is sent
on a task of its own, over connections kept open to its endpoint.

The loop never waits for a receiver, and a request only ever waits for its own endpoint's
connections, so a slow or dead endpoint slows its own lanes only. While a statement runs,
outcomes and lanes gather for the next one: an idle dispatcher sends an event at once, a busy
one many per statement.

The dispatcher hears of a lane when the transaction that gave it something to send commits
(a notification), and looks for every lane with a delivery waiting when it starts, when its
listening connection comes back, and every minute (lost notifications, leases of dead
workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection

from install_service.config import WebhookSettings
from install_service.db.engine import asyncpg_dsn, connect_args, create_engine
from install_service.events import delivery, lanes
from install_service.events.lanes import Lane
from install_service.events.listener import Listener
from install_service.events.webhooks import LANES_CHANNEL

log = logging.getLogger("install_service.webhooks")

# Lanes leased by one statement at most.
LEASE_BATCH = 500
# Requests in flight from one process, every endpoint together: a bound on its open sockets.
MAX_IN_FLIGHT = 512
# How often every lane with a delivery waiting is looked for.
SWEEP_SECONDS = 60.0
# A client (and its open connections) unused this long is closed.
IDLE_CLIENT_SECONDS = 120.0
# While a lane's next event may still be preceded by one not yet committed, the feed's
# horizon is looked at after a pause doubling from the first to the second of these (one
# statement for every such lane): the lane goes as soon as the horizon passes its event.
_HORIZON_PAUSES = (0.005, 0.1)
# After a database error, a loop starts again after these pauses, the last one repeating.
_RECONNECT_PAUSES: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)
# How long a stopping dispatcher may take to record what it has and give back its leases.
_CLOSE_SECONDS = 5.0


@contextlib.asynccontextmanager
async def _autocommit(engine: Any) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        # Each lease and each record is one statement and its own unit of work: no BEGIN and
        # COMMIT round trips around it.
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        yield conn


class _Heard(Listener):
    """The lanes' channel, heard on a connection of its own."""

    channel = LANES_CHANNEL

    def __init__(self, dsn: str, dispatcher: Dispatcher) -> None:
        super().__init__(dsn)
        self.dispatcher = dispatcher

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.dispatcher.heard(payload)

    def _wake_all(self) -> None:
        # Connected again (or just lost): what was notified meanwhile was not heard.
        self.dispatcher.look_everywhere()


class Dispatcher:
    """Sends every lane's deliveries; one per worker process (see the module's notes)."""

    def __init__(self, url: URL, settings: WebhookSettings) -> None:
        self.settings = settings
        # A connection of its own, held while it runs, outside the pool the process's other
        # work uses. Its commits do not wait for the disk: if PostgreSQL itself crashes, the
        # last moments of leases and outcomes may be lost, which only means those deliveries
        # are sent again (at least once, same ids); the events and deliveries were committed
        # by their own transactions, durably. Its statement takes arrays whatever their
        # size, so it is planned once, not on every call (which took as long as running it).
        settings_ = {"synchronous_commit": "off", "plan_cache_mode": "force_generic_plan"}
        self.engine = create_engine(
            url,
            pool_size=1,
            max_overflow=0,
            connect_args={**connect_args(), "server_settings": settings_},
        )
        self.listener = _Heard(asyncpg_dsn(url), self)
        self.lease_seconds = lanes.lease_seconds(settings)
        self._ready: dict[uuid.UUID, dict[uuid.UUID, None]] = {}
        self._waiting: list[tuple[float, int, Lane]] = []
        self._waiting_at: dict[Lane, float] = {}
        self._order = itertools.count()
        self._unsettled: list[tuple[int, Lane]] = []
        self._unsettled_at: dict[Lane, int] = {}
        self._horizon_pause = _HORIZON_PAUSES[0]
        self._next_horizon = 0.0
        self._flying: dict[Lane, lanes.Leased] = {}
        # Per endpoint, the lanes being leased or sent right now.
        self._requests: Counter[uuid.UUID] = Counter()
        self._done: list[tuple[lanes.Leased, lanes.Outcome]] = []
        self._sends: set[asyncio.Task[None]] = set()
        self._clients: dict[uuid.UUID, tuple[delivery.Connections, float]] = {}
        self._wake = asyncio.Event()
        self._next_sweep = 0.0
        self._stopping = False

    # Hearing of lanes.

    def heard(self, payload: str) -> None:
        """A lane may have something to send (a notification's `<endpoint> <organization>`)."""
        try:
            endpoint, organization = payload.split(" ")
            lane = (uuid.UUID(endpoint), uuid.UUID(organization))
        except ValueError:
            log.warning("ignored a malformed lane notification: %r", payload)
            return
        self._make_ready(lane)
        self._wake.set()

    def look_everywhere(self) -> None:
        self._next_sweep = 0.0
        self._wake.set()

    def _make_ready(self, lane: Lane) -> None:
        if lane in self._flying:
            return  # made ready again once its outcome is recorded
        self._waiting_at.pop(lane, None)
        self._ready.setdefault(lane[0], {})[lane[1]] = None

    def _later(self, lane: Lane, seconds: float) -> None:
        at = time.monotonic() + seconds
        if self._waiting_at.get(lane, at + 1) <= at:
            return
        self._waiting_at[lane] = at
        heapq.heappush(self._waiting, (at, next(self._order), lane))
        if len(self._waiting) > 2 * len(self._waiting_at) + 1000:
            # Entries left behind by lanes made ready early: drop them.
            self._waiting = [
                (t, n, lane) for t, n, lane in self._waiting if self._waiting_at.get(lane) == t
            ]
            heapq.heapify(self._waiting)

    def _wake_waiting(self) -> float:
        """Make ready the lanes whose time has come; seconds until the next one's."""
        now = time.monotonic()
        while self._waiting and self._waiting[0][0] <= now:
            at, _, lane = heapq.heappop(self._waiting)
            if self._waiting_at.get(lane) == at:
                self._make_ready(lane)
        return self._waiting[0][0] - now if self._waiting else SWEEP_SECONDS

    def _hold(self, txid: int, lane: Lane) -> None:
        """Send the lane once the horizon passes `txid`."""
        if self._unsettled_at.get(lane, txid + 1) <= txid:
            return
        self._unsettled_at[lane] = txid
        heapq.heappush(self._unsettled, (txid, lane))

    def _passed(self, horizon: int) -> bool:
        """The horizon is at least `horizon`: make ready the lanes it passed (any?)."""
        released = False
        while self._unsettled and self._unsettled[0][0] < horizon:
            txid, lane = heapq.heappop(self._unsettled)
            if self._unsettled_at.get(lane) == txid:
                del self._unsettled_at[lane]
                self._make_ready(lane)
                released = True
        return released

    def _pick(self, returning: list[Lane]) -> list[Lane]:
        """Lanes to lease now, endpoint by endpoint, within each endpoint's share: first those
        whose outcome is `returning` (in flight until it is recorded), then ready ones."""
        room = min(LEASE_BATCH, MAX_IN_FLIGHT - self._requests.total())
        picked: list[Lane] = []
        for lane in returning:
            if (
                len(picked) < room
                and self._requests[lane[0]] < self.settings.connections_per_endpoint
            ):
                picked.append(lane)
                self._requests[lane[0]] += 1
        for endpoint in list(self._ready):
            if len(picked) >= room:
                break
            organizations = self._ready[endpoint]
            free = self.settings.connections_per_endpoint - self._requests[endpoint]
            while organizations and free > 0 and len(picked) < room:
                organization = next(iter(organizations))
                del organizations[organization]
                if (endpoint, organization) not in self._flying:
                    picked.append((endpoint, organization))
                    self._requests[endpoint] += 1
                    free -= 1
            if not organizations:
                del self._ready[endpoint]
        return picked

    # The loops.

    async def run(self) -> None:
        """Dispatch until `stop()` (the requests in flight finish and are recorded) or until
        cancelled (they are abandoned and their leases given back)."""
        await self.listener.start()
        try:
            # Listening before the first look for lanes, so no lane falls between the two.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.listener.connected.wait(), _CLOSE_SECONDS)
            await self._work()
        finally:
            await self._close()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def _work(self) -> None:
        pauses = _RECONNECT_PAUSES
        while True:
            try:
                async with _autocommit(self.engine) as conn:
                    pauses = _RECONNECT_PAUSES
                    while True:
                        self._wake.clear()
                        if self._stopping and not self._done:
                            if not self._sends:
                                return
                            await self._wake.wait()  # the last requests' outcomes
                            continue
                        if not self._stopping and time.monotonic() >= self._next_sweep:
                            await self._sweep(conn)
                        if self._unsettled and time.monotonic() >= self._next_horizon:
                            await self._look_at_horizon(conn)
                        next_due = self._wake_waiting()
                        done, self._done = self._done, []
                        returning = [leased.lane for leased, _ in done]
                        picked = [] if self._stopping else self._pick(returning)
                        if done or picked:
                            await self._step(conn, done, picked)
                            continue
                        now = time.monotonic()
                        wait = min(next_due, self._next_sweep - now)
                        if self._unsettled:
                            wait = min(wait, self._next_horizon - now)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), max(wait, 0))
            except Exception as exc:
                pause, pauses = pauses[0], pauses[1:] or pauses
                log.warning("webhook dispatch failed (%s); again in %.1f s", exc, pause)
                await asyncio.sleep(pause)

    async def _sweep(self, conn: AsyncConnection) -> None:
        self._next_sweep = time.monotonic() + SWEEP_SECONDS
        for waiting in await lanes.lanes_waiting(conn):
            if waiting.seconds > 0:
                self._later(waiting.lane, waiting.seconds)
            else:
                self._make_ready(waiting.lane)
        idle = time.monotonic() - IDLE_CLIENT_SECONDS
        for endpoint, (connections, used) in list(self._clients.items()):
            if used < idle and not self._requests[endpoint]:
                del self._clients[endpoint]
                await connections.aclose()
            else:
                connections.close_stale()

    async def _look_at_horizon(self, conn: AsyncConnection) -> None:
        if self._passed(await lanes.horizon(conn)):
            self._horizon_pause = _HORIZON_PAUSES[0]
        else:  # still held back: look less often
            self._horizon_pause = min(self._horizon_pause * 2, _HORIZON_PAUSES[1])
        self._next_horizon = time.monotonic() + self._horizon_pause

    async def _step(
        self,
        conn: AsyncConnection,
        done: list[tuple[lanes.Leased, lanes.Outcome]],
        picked: list[Lane],
    ) -> None:
        attempts = [
            lanes.Attempt(delivery_id=leased.delivery_id, attempt=leased.attempt, outcome=outcome)
            for leased, outcome in done
        ]
        try:
            recorded, found = await lanes.step(conn, attempts, picked, self.settings)
        except BaseException:
            self._done[:0] = done  # kept for the next try
            for lane in picked:
                self._requests[lane[0]] -= 1
                self._make_ready(lane)  # not the lanes still in flight
            raise
        for leased, _ in done:
            self._flying.pop(leased.lane, None)
        sending = set()
        for leased in found.leased:
            sending.add(leased.lane)
            self._flying[leased.lane] = leased
            task = asyncio.create_task(self._send(leased))
            self._sends.add(task)
            task.add_done_callback(self._sent)
        for lane in picked:
            if lane not in sending:
                self._requests[lane[0]] -= 1
        chosen = set(picked)
        for leased, _ in done:
            _, retry_in = recorded.statuses.get(leased.delivery_id, ("", None))
            if retry_in is not None:
                self._later(leased.lane, retry_in)
            elif leased.lane not in chosen:
                self._make_ready(leased.lane)  # its next delivery, next time
        for waiting in found.waiting:
            self._later(waiting.lane, waiting.seconds)
        if found.unsettled and not self._unsettled:
            self._horizon_pause = _HORIZON_PAUSES[0]
            self._next_horizon = time.monotonic() + self._horizon_pause
        for txid, lane in found.unsettled:
            self._hold(txid, lane)
        self._passed(found.horizon)
        for endpoint in recorded.disabled_endpoints:
            log.warning("webhook %s disabled after repeated failures", endpoint)
        # A lane in no list has nothing to send: forgotten until heard of again.

    def _client(self, endpoint: uuid.UUID) -> delivery.Connections:
        found = self._clients.get(endpoint)
        connections = (
            found[0] if found else delivery.Connections(keep=self.settings.connections_per_endpoint)
        )
        self._clients[endpoint] = (connections, time.monotonic())
        return connections

    async def _send(self, leased: lanes.Leased) -> None:
        endpoint = leased.lane[0]
        try:
            outcome = await delivery.send(
                self._client(endpoint), leased.url, leased.secret, leased.event, self.settings
            )
        except Exception:
            # Not the receiver's doing (`send` answers for those): leave the lease to run out.
            log.exception("webhook delivery %s was not sent", leased.delivery_id)
            self._flying.pop(leased.lane, None)
            self._later(leased.lane, self.lease_seconds)
            return
        finally:
            self._requests[endpoint] -= 1
        self._done.append((leased, outcome))

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        self._wake.set()

    async def _close(self) -> None:
        """Abandon what is still being sent, record what was, give back the other leases."""
        for task in self._sends:
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)
        try:
            async with asyncio.timeout(_CLOSE_SECONDS), _autocommit(self.engine) as conn:
                done, self._done = self._done, []
                if done:
                    await self._step(conn, done, [])
                await lanes.release(conn, list(self._flying.values()))
        except Exception as exc:
            log.warning("webhook leases not given back (%s); they run out by themselves", exc)
        self._flying.clear()
        for connections, _ in self._clients.values():
            await connections.aclose()
        self._clients.clear()
        await self.listener.stop()
        await self.engine.dispose()
