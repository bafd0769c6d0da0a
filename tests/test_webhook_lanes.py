"""Webhook delivery across many lanes at once: per-lane order and one request at a time, a
slow endpoint holding back no other, batches whose outcomes each land on their own delivery,
back-offs and disabled endpoints that hold whatever arrives, the feed's horizon, and worker
processes killed or stopped mid-batch. Real receivers, real workers, real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.config import WebhookSettings
from install_service.db.session import transaction
from install_service.events import webhooks
from install_service.orgs.schemas import Organization
from install_service.orgs.service import Actor
from install_service.testing import make_org
from tests.conftest import emit_event, execute, older_transaction, rows, scalar
from tests.test_webhooks import FAST, add_endpoint, until, worker, worker_process
from tests.webhook_receiver import Receiver

Lanes = dict[str, list[str]]  # organization slug -> its events' ids, in feed order


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> WebhookSettings:
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    return WebhookSettings.from_env()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    """Receivers a test starts; all stopped afterwards."""
    made: list[Receiver] = []
    yield made
    for found in made:
        found.stop()


def start(receivers: list[Receiver], *, mode: str = "ok", keep_alive: bool = False) -> Receiver:
    found = Receiver()
    found.mode, found.keep_alive = mode, keep_alive
    found.start()
    receivers.append(found)
    return found


async def endpoint_for(engine: AsyncEngine, receiver: Receiver, settings: WebhookSettings) -> Any:
    endpoint = await add_endpoint(engine, receiver.url, settings)
    receiver.secret = endpoint.secret
    return endpoint


async def orgs(engine: AsyncEngine, count: int) -> list[Organization]:
    prefix = uuid.uuid4().hex[:6]
    return [await make_org(engine, slug=f"lane-{prefix}-{n}") for n in range(count)]


async def emit(engine: AsyncEngine, organizations: list[Organization], per_org: int) -> Lanes:
    """`per_org` events in each organization, committed round by round (each round one
    event per organization, in one transaction); each lane's events in feed order."""
    lanes: Lanes = {org.slug: [] for org in organizations}
    for _ in range(per_org):
        async with transaction(engine) as session:
            for org in organizations:
                lanes[org.slug].append(str(await emit_event(session, org.id)))
    return lanes


async def listening(engine: AsyncEngine, dispatchers: int = 1) -> None:
    """Wait until `dispatchers` listen for lanes, and a moment for their first look at every
    lane: what is committed after this, they hear of."""
    await until(
        lambda: scalar(
            engine,
            """SELECT count(*) >= :n FROM pg_stat_activity
               WHERE datname = current_database()
                 AND query LIKE 'LISTEN %install_service_webhooks%'""",
            n=dispatchers,
        ),
        what="dispatchers listening",
    )
    await asyncio.sleep(0.5)


def received_per_lane(receiver: Receiver) -> Lanes:
    """Each organization's events in the order they were received with a 200."""
    found: Lanes = {}
    for event in receiver.delivered():
        found.setdefault(event["organization"]["slug"], []).append(event["id"])
    return found


def count(lanes: Lanes) -> int:
    return sum(len(ids) for ids in lanes.values())


class TestManyLanes:
    async def test_each_lane_in_order_one_request_at_a_time_over_reused_connections(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        fast: WebhookSettings,
        receivers: list[Receiver],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("INSTALL_SERVICE_WEBHOOK_CONNECTIONS_PER_ENDPOINT", "3")
        receiver = start(receivers, mode="stall", keep_alive=True)
        receiver.stall_seconds = 0.02
        await endpoint_for(engine, receiver, fast)
        lanes = await emit(engine, await orgs(engine, 10), per_org=5)
        async with worker(engine, install_service_database_url):
            await until(lambda: len(receiver.delivered()) >= count(lanes), what="every event")

        assert received_per_lane(receiver) == lanes
        assert sorted(receiver.arrivals) == sorted(itertools.chain(*lanes.values()))  # once
        log = receiver.log()
        for slug in lanes:
            own = sorted(
                (r for r in log if r.payload and r.payload["data"]["organization"]["slug"] == slug),
                key=lambda r: r.started,
            )
            for earlier, later in itertools.pairwise(own):
                assert later.started >= earlier.at, f"two requests of {slug} at once"
        # Never more requests at once than the endpoint's share, over as many connections.
        edges = sorted([(r.started, 1) for r in log] + [(r.at, -1) for r in log])
        assert max(itertools.accumulate(step for _, step in edges)) <= 3
        assert len({r.peer for r in log}) <= 3

    async def test_a_slow_endpoint_holds_back_no_other(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        fast: WebhookSettings,
        receivers: list[Receiver],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("INSTALL_SERVICE_WEBHOOK_TIMEOUT_SECONDS", "40")
        settings = WebhookSettings.from_env()
        slow, quick = start(receivers, mode="stall"), start(receivers)
        slow.stall_seconds = 30  # longer than the quick endpoint's lanes take, however busy
        await endpoint_for(engine, slow, settings)
        await endpoint_for(engine, quick, settings)
        # More lanes than an endpoint's share of connections (8).
        lanes = await emit(engine, await orgs(engine, 12), per_org=3)
        async with worker(engine, install_service_database_url):
            await until(
                lambda: len(quick.delivered()) >= count(lanes), seconds=30, what="the quick one"
            )
            # Every request to the quick endpoint was answered while the slow endpoint's
            # first requests were still being held.
            assert slow.log() == []
            assert 1 <= len(slow.arrivals) <= settings.connections_per_endpoint
        assert received_per_lane(quick) == lanes
        # Stopped mid-request, the worker gave its leases back for the next one to send.
        assert (
            await scalar(
                engine, "SELECT count(*) FROM webhook_deliveries WHERE leased_until IS NOT NULL"
            )
            == 0
        )

    async def test_each_outcome_of_a_batch_is_recorded_on_its_own_delivery(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        fast: WebhookSettings,
        receivers: list[Receiver],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("INSTALL_SERVICE_WEBHOOK_MAX_ATTEMPTS", "100")
        settings = WebhookSettings.from_env()
        failing, answering = start(receivers, mode="fail"), start(receivers)
        broken = await endpoint_for(engine, failing, settings)
        working = await endpoint_for(engine, answering, settings)
        lanes = await emit(engine, await orgs(engine, 6), per_org=2)
        async with worker(engine, install_service_database_url):
            await until(lambda: len(answering.delivered()) >= count(lanes), what="deliveries")
            await until(lambda: len(failing.log()) >= 2 * len(lanes), what="failures")

        assert received_per_lane(answering) == lanes
        attempts = await rows(
            engine,
            """SELECT d.endpoint_id, d.event_id, d.status, a.status_code, a.succeeded
               FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id""",
        )
        ok = [a for a in attempts if a.endpoint_id == working.id]
        assert sorted(str(a.event_id) for a in ok) == sorted(itertools.chain(*lanes.values()))
        assert {(a.status, a.status_code, a.succeeded) for a in ok} == {("succeeded", 200, True)}
        failed = [a for a in attempts if a.endpoint_id == broken.id]
        assert {(a.status, a.status_code, a.succeeded) for a in failed} == {("pending", 500, False)}
        # Only each lane's first event was tried: the second waits behind it.
        assert {str(a.event_id) for a in failed} == {ids[0] for ids in lanes.values()}
        failures = await rows(
            engine, "SELECT id, consecutive_failures, enabled FROM webhook_endpoints"
        )
        assert {(f.id, f.consecutive_failures, f.enabled) for f in failures} == {
            (working.id, 0, True),
            (broken.id, len(failed), True),
        }

    async def test_an_event_waits_for_an_earlier_transaction_of_its_lane(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        fast: WebhookSettings,
        receivers: list[Receiver],
    ) -> None:
        receiver = start(receivers)
        await endpoint_for(engine, receiver, fast)
        [org] = await orgs(engine, 1)
        async with worker(engine, install_service_database_url):
            await listening(engine)
            async with transaction(engine) as earlier:
                first = await emit_event(earlier, org.id)
                async with transaction(engine) as later:
                    second = await emit_event(later, org.id)
                # `later` committed; its event comes after `earlier`'s, still running.
                await asyncio.sleep(1.5)
                assert receiver.log() == []
            # Heard of at its commit, not at the dispatcher's look at every lane (a minute).
            await until(lambda: len(receiver.delivered()) >= 2, seconds=30, what="both events")
        assert received_per_lane(receiver) == {org.slug: [str(first), str(second)]}

    async def test_a_transaction_of_another_database_holds_no_delivery_back(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        install_service_template_database: str,
        fast: WebhookSettings,
        receivers: list[Receiver],
    ) -> None:
        """Another database on the same server cannot write this feed: its transaction,
        older than the event, leaves the lane free to go at once."""
        from install_service.events import lanes

        endpoint = await endpoint_for(engine, start(receivers), fast)
        (org,) = await orgs(engine, 1)
        elsewhere = install_service_database_url.set(database=install_service_template_database)
        async with older_transaction(elsewhere):  # another database's, and older
            await emit(engine, [org], per_org=1)
            async with engine.begin() as conn:
                _, found = await lanes.step(conn, [], [(endpoint.id, org.id)], fast)
            assert (len(found.leased), found.unsettled) == (1, [])

    async def test_a_lane_behind_a_running_transaction_waits_for_exactly_its_event(
        self, engine: AsyncEngine, fast: WebhookSettings, receivers: list[Receiver]
    ) -> None:
        """A lane whose event a running transaction of this database may still precede is
        reported with that event's `txid` (it may go once the horizon is past it), and goes
        once that transaction has ended."""
        from install_service.events import lanes

        endpoint = await endpoint_for(engine, start(receivers), fast)
        (org,) = await orgs(engine, 1)
        lane = (endpoint.id, org.id)
        async with engine.connect() as older:
            await older.begin()
            await older.execute(text("SELECT pg_current_xact_id()"))  # older, still running
            await emit(engine, [org], per_org=1)
            txid = await scalar(
                engine, "SELECT txid FROM events WHERE organization_id = :o", o=org.id
            )
            async with engine.begin() as conn:
                _, held = await lanes.step(conn, [], [lane], fast)
            assert (held.leased, held.unsettled) == ([], [(txid, lane)])
            assert held.horizon <= txid
            await older.rollback()
        async with engine.begin() as conn:
            _, found = await lanes.step(conn, [], [lane], fast)
        assert (len(found.leased), found.unsettled, found.horizon > txid) == (1, [], True)


class TestWaiting:
    async def test_a_retry_waits_its_back_off_whatever_arrives_meanwhile(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        fast: WebhookSettings,
        receivers: list[Receiver],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("INSTALL_SERVICE_WEBHOOK_RETRY_BASE_SECONDS", "1")
        settings = WebhookSettings.from_env()
        receiver = start(receivers, mode="fail")
        await endpoint_for(engine, receiver, settings)
        organizations = await orgs(engine, 1)
        async with worker(engine, install_service_database_url):
            lanes = await emit(engine, organizations, per_org=1)
            await until(lambda: receiver.log(), what="the first attempt")
            # More events in the lane while its first backs off: each wakes the lane, which
            # goes on waiting.
            for _ in range(3):
                more = await emit(engine, organizations, per_org=1)
                for slug, ids in more.items():
                    lanes[slug] += ids
                await asyncio.sleep(0.1)
            await until(lambda: len(receiver.log()) >= 3, what="two retries")
            receiver.mode = "ok"
            await until(lambda: len(receiver.delivered()) >= count(lanes), what="deliveries")

        assert received_per_lane(receiver) == lanes
        [first] = next(iter(lanes.values()))[:1]
        tried = [r for r in receiver.log() if r.status == 500]
        assert {r.webhook_id for r in tried} == {first}
        gaps = [b.started - a.started for a, b in itertools.pairwise(tried)]
        assert gaps[0] >= 0.9  # 1 s, then 2 s (give or take the clocks' grain)
        assert gaps[1] >= 1.9
        # The success ended the endpoint's run of failures.
        assert await scalar(engine, "SELECT consecutive_failures FROM webhook_endpoints") == 0

    async def test_redelivering_a_pending_delivery_sends_it_now_in_its_place(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        fast: WebhookSettings,
        receivers: list[Receiver],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("INSTALL_SERVICE_WEBHOOK_RETRY_BASE_SECONDS", "600")
        settings = WebhookSettings.from_env()
        receiver = start(receivers, mode="fail")
        endpoint = await endpoint_for(engine, receiver, settings)
        lanes = await emit(engine, await orgs(engine, 1), per_org=2)
        async with worker(engine, install_service_database_url):
            # Recorded, and backing off for ten minutes.
            await until(
                lambda: scalar(engine, "SELECT count(*) > 0 FROM webhook_attempts"),
                what="the first attempt",
            )
            receiver.mode = "ok"
            head = await scalar(
                engine,
                """SELECT id FROM webhook_deliveries WHERE status = 'pending'
                   ORDER BY event_txid, event_seq LIMIT 1""",
            )
            async with transaction(engine) as session:
                await webhooks.redeliver(session, Actor.system(), endpoint.id, head)
            await until(lambda: len(receiver.delivered()) >= 2, seconds=30, what="both")
        assert received_per_lane(receiver) == lanes

    async def test_a_disabled_endpoint_sends_nothing_until_enabled(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        fast: WebhookSettings,
        receivers: list[Receiver],
    ) -> None:
        receiver = start(receivers)
        endpoint = await endpoint_for(engine, receiver, fast)
        receiver.stop()  # down: its lanes back off
        lanes = await emit(engine, await orgs(engine, 3), per_org=2)
        async with worker(engine, install_service_database_url):
            await until(
                lambda: scalar(engine, "SELECT count(*) >= 3 FROM webhook_attempts"),
                what="refused attempts",
            )
            async with transaction(engine) as session:
                await webhooks.set_enabled(session, Actor.system(), endpoint.id, enabled=False)
            # A lease taken just before the endpoint was disabled is still tried: let it fail.
            await until(
                lambda: scalar(
                    engine,
                    "SELECT count(*) = 0 FROM webhook_deliveries WHERE leased_until > now()",
                ),
                what="no delivery leased",
            )
            receiver.start()
            await asyncio.sleep(2)  # every back-off so far has run out
            assert receiver.log() == []
            async with transaction(engine) as session:
                await webhooks.set_enabled(session, Actor.system(), endpoint.id, enabled=True)
            # Well before the dispatcher's look at every lane (once a minute).
            await until(
                lambda: len(receiver.delivered()) >= count(lanes), seconds=30, what="deliveries"
            )
        assert received_per_lane(receiver) == lanes
        # Nothing was leased that was not sent and logged.
        counted = await rows(
            engine,
            """SELECT d.attempts, (SELECT count(*) FROM webhook_attempts a
                                   WHERE a.delivery_id = d.id) AS logged
               FROM webhook_deliveries d""",
        )
        assert all(c.attempts == c.logged for c in counted), counted


class TestWorkerProcesses:
    async def test_killed_mid_batch_sends_again_only_what_was_in_flight(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        receivers: list[Receiver],
        tmp_path: Path,
    ) -> None:
        settings = WebhookSettings(allow_private=True, timeout_seconds=3)
        receiver = start(receivers, mode="stall", keep_alive=True)
        receiver.stall_seconds = 0.3
        await endpoint_for(engine, receiver, settings)
        lanes = await emit(engine, await orgs(engine, 12), per_org=4)
        first = worker_process(install_service_database_url, tmp_path / "first.log", FAST)
        second: subprocess.Popen[bytes] | None = None
        try:
            await until(lambda: len(receiver.log()) >= 12, what="a first batch answered")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=20)
            in_flight = {
                str(r.event_id)
                for r in await rows(
                    engine,
                    """SELECT event_id FROM webhook_deliveries
                       WHERE status = 'pending' AND leased_until > now()""",
                )
            }
            assert in_flight  # killed mid-batch
            receiver.stall_seconds = 0
            second = worker_process(install_service_database_url, tmp_path / "second.log", FAST)
            await until(
                lambda: scalar(
                    engine, "SELECT bool_and(status = 'succeeded') FROM webhook_deliveries"
                ),
                what="every delivery",
            )
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(timeout=20)

        # Nothing lost, each lane in order (counting each event's first arrival).
        firsts: Lanes = {}
        for event in receiver.delivered():
            own = firsts.setdefault(event["organization"]["slug"], [])
            if event["id"] not in own:
                own.append(event["id"])
        assert firsts == lanes
        # Sent twice: only what was in flight, as the same message.
        arrivals = [r.webhook_id for r in receiver.log()]
        again = {i for i in arrivals if arrivals.count(i) > 1}
        assert again <= in_flight
        bodies: dict[str, set[bytes]] = {}
        for body, headers in receiver.raw:
            bodies.setdefault(headers["webhook-id"], set()).add(body)
        assert all(len(found) == 1 for found in bodies.values())

    async def test_two_workers_share_lanes_one_request_at_a_time(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        receivers: list[Receiver],
        tmp_path: Path,
    ) -> None:
        settings = WebhookSettings(allow_private=True)
        receiver = start(receivers, mode="stall", keep_alive=True)
        receiver.stall_seconds = 0.2
        await endpoint_for(engine, receiver, settings)
        organizations = await orgs(engine, 8)
        workers = [
            worker_process(install_service_database_url, tmp_path / f"{n}.log", FAST)
            for n in range(2)
        ]
        try:
            await listening(engine, dispatchers=2)  # each hears of every lane
            # Events keep coming while the lanes' earlier ones are in flight: both workers
            # hear of each, and look at lanes the other is sending.
            lanes: Lanes = {org.slug: [] for org in organizations}
            for _ in range(6):
                for slug, ids in (await emit(engine, organizations, per_org=1)).items():
                    lanes[slug] += ids
                await asyncio.sleep(0.1)
            await until(
                lambda: len(receiver.delivered()) >= count(lanes), seconds=30, what="every event"
            )
            await asyncio.sleep(0.5)  # time for a second copy to arrive, were one sent
        finally:
            for process in workers:
                process.terminate()
                process.wait(timeout=20)
        assert received_per_lane(receiver) == lanes
        assert sorted(receiver.arrivals) == sorted(itertools.chain(*lanes.values()))  # once
        log = receiver.log()
        for slug in lanes:
            own = sorted(
                (r for r in log if r.payload and r.payload["data"]["organization"]["slug"] == slug),
                key=lambda r: r.started,
            )
            for earlier, later in itertools.pairwise(own):
                assert later.started >= earlier.at, f"two requests of {slug} at once"

    async def test_stopped_mid_batch_finishes_what_it_sent_and_leaves_no_lease(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        receivers: list[Receiver],
        tmp_path: Path,
    ) -> None:
        settings = WebhookSettings(allow_private=True, timeout_seconds=3)
        receiver = start(receivers, mode="stall")
        receiver.stall_seconds = 1
        await endpoint_for(engine, receiver, settings)
        lanes = await emit(engine, await orgs(engine, 4), per_org=2)
        process = worker_process(install_service_database_url, tmp_path / "worker.log", FAST)
        try:
            await until(lambda: receiver.arrivals, what="requests in flight")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=20)
        answered = {r.webhook_id for r in receiver.log()}
        assert answered == set(receiver.arrivals)  # every request sent was answered...
        recorded = await rows(
            engine,
            """SELECT CAST(d.event_id AS text) AS event_id, d.status, d.leased_until
               FROM webhook_deliveries d""",
        )
        # ... and recorded; nothing is left leased.
        assert {r.event_id for r in recorded if r.status == "succeeded"} == answered
        assert all(r.leased_until is None for r in recorded)
        assert count(lanes) > len(answered)  # it stopped mid-way


class TestLateRecords:
    async def test_a_record_made_after_its_lease_ran_out_settles_nothing(
        self, engine: AsyncEngine, fast: WebhookSettings, receivers: list[Receiver]
    ) -> None:
        """A worker whose lease ran out (it hung past timeout + margin) records its attempt
        after another worker leased the delivery again: the attempt is logged, but the
        delivery stays as the second lease has it, and that lease's record settles it."""
        from datetime import UTC, datetime

        from install_service.events import lanes

        endpoint = await endpoint_for(engine, start(receivers), fast)
        (org,) = await orgs(engine, 1)
        await emit(engine, [org], per_org=1)
        lane = (endpoint.id, org.id)

        async def lease() -> Any:
            """The lane's delivery, leased once the feed's horizon has passed its event (a
            transaction of this database still open holds it back for a moment)."""
            for _ in range(200):
                async with engine.begin() as conn:
                    _, found = await lanes.step(conn, [], [lane], fast)
                if found.leased:
                    (leased,) = found.leased
                    return leased
                await asyncio.sleep(0.05)
            raise AssertionError("the delivery was never leased")

        first = await lease()
        await execute(
            engine,
            "UPDATE webhook_deliveries SET leased_until = now() - interval '1 second'",
        )
        second = await lease()
        assert (first.attempt, second.attempt) == (1, 2)

        def attempt(leased: Any) -> Any:
            outcome = lanes.Outcome(
                attempted_at=datetime.now(UTC), duration_ms=1.0, status_code=200, error=None
            )
            return lanes.Attempt(
                delivery_id=leased.delivery_id, attempt=leased.attempt, outcome=outcome
            )

        async with engine.begin() as conn:
            await lanes.record(conn, [attempt(first)], fast)
        late = (
            await rows(
                engine,
                """SELECT status, attempts, leased_until > now() AS leased,
                          (SELECT count(*) FROM webhook_attempts) AS logged
                   FROM webhook_deliveries""",
            )
        )[0]
        assert (late.status, late.attempts, late.leased, late.logged) == ("pending", 2, True, 1)
        async with engine.begin() as conn:
            await lanes.record(conn, [attempt(second)], fast)
        status = await scalar(engine, "SELECT status FROM webhook_deliveries")
        assert status == "succeeded"
