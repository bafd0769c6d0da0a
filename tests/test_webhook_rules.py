"""What a webhook endpoint may and may not receive, and how its failures are counted: the
organizations it is scoped to and no other, never through a redirect, a 3xx is no delivery,
a success or a re-enable starts the failure count again, and retries wait exactly the
documented doubling delays."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.config import WebhookSettings
from install_service.db.session import transaction
from install_service.events import delivery, lanes, webhooks
from install_service.testing import install_template, make_org, make_user, publish_template
from tests.conftest import execute, rows, scalar, small_doc
from tests.test_webhooks import add_endpoint, until, worker
from tests.webhook_receiver import Receiver


@pytest.fixture
def allowing(monkeypatch: pytest.MonkeyPatch) -> WebhookSettings:
    """Deliveries to this machine, quick retries, few attempts before disabling."""
    monkeypatch.setenv("INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("INSTALL_SERVICE_WEBHOOK_RETRY_BASE_SECONDS", "0.2")
    monkeypatch.setenv("INSTALL_SERVICE_WEBHOOK_TIMEOUT_SECONDS", "3")
    monkeypatch.setenv("INSTALL_SERVICE_WEBHOOK_MAX_ATTEMPTS", "30")
    return WebhookSettings.from_env()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    found.start()
    yield found
    found.stop()


class Redirector:
    """Answers every request with `status` and a `Location` pointing at `target`."""

    def __init__(self, status: int, target: str) -> None:
        redirector = self
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                redirector.hits += 1
                self.send_response(status)
                self.send_header("location", target)
                self.send_header("content-length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


async def _one_delivery(
    engine: AsyncEngine, url: str, settings: WebhookSettings, owner: Actor
) -> tuple[webhooks.WebhookCreated, uuid.UUID]:
    """An endpoint and the delivery of one install event to it (still pending)."""
    await publish_template(engine, small_doc())
    endpoint = await add_endpoint(engine, url, settings)
    await install_template(engine, owner, "starter")
    delivery_id = await scalar(
        engine,
        """SELECT d.id FROM webhook_deliveries d JOIN events e ON e.id = d.event_id
           WHERE d.endpoint_id = :e AND e.type = 'install.created'""",
        e=endpoint.id,
    )
    assert delivery_id is not None
    return endpoint, delivery_id


async def _attempt(engine: AsyncEngine, endpoint_id: uuid.UUID, settings: WebhookSettings) -> Any:
    """What a worker does with a lane once: lease its next delivery, send it, record it."""
    org = await scalar(
        engine, "SELECT organization_id FROM webhook_deliveries WHERE endpoint_id = :e "
        "AND status = 'pending' LIMIT 1", e=endpoint_id,
    )  # fmt: skip

    async def lease() -> list[lanes.Leased]:
        async with transaction(engine) as session:
            _, leases = await lanes.step(session, [], [(endpoint_id, org)], settings)
        return leases.leased

    # Until the feed's horizon passes the event: a transaction of this database still open
    # (the worker's, say) may hold it back a moment.
    [leased] = await until(lease, seconds=10, what="the delivery leased")
    connections = delivery.Connections()
    try:
        outcome = await delivery.send(
            connections, leased.url, leased.secret, leased.event, settings
        )
    finally:
        await connections.aclose()
    async with transaction(engine) as session:
        await _record(session, leased.delivery_id, outcome, settings, attempt=leased.attempt)
    return outcome


async def _record(
    session: Any,
    delivery_id: uuid.UUID,
    outcome: lanes.Outcome,
    settings: WebhookSettings,
    *,
    attempt: int,
) -> None:
    attempts = [lanes.Attempt(delivery_id=delivery_id, attempt=attempt, outcome=outcome)]
    await lanes.record(session, attempts, settings)


def _failed(status: int = 500) -> lanes.Outcome:
    return lanes.Outcome(
        attempted_at=datetime.now(UTC), duration_ms=1.0, status_code=status, error=f"HTTP {status}"
    )


def _ok() -> lanes.Outcome:
    return lanes.Outcome(
        attempted_at=datetime.now(UTC), duration_ms=1.0, status_code=200, error=None
    )


class TestScope:
    async def test_an_endpoint_scoped_to_organizations_receives_only_theirs(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        allowing: WebhookSettings,
        receiver: Receiver,
    ) -> None:
        await publish_template(engine, small_doc())
        owner, _, _ = await make_user(engine)
        await make_org(engine, owner=owner, slug="inside")
        await make_org(engine, owner=owner, slug="outside")
        everything = Receiver()
        everything.start()
        try:
            scoped = await add_endpoint(engine, receiver.url, allowing, organizations=["inside"])
            receiver.secret = scoped.secret
            unscoped = await add_endpoint(engine, everything.url, allowing)
            everything.secret = unscoped.secret
            await install_template(engine, owner, "starter", "outside")
            await install_template(engine, owner, "starter", "inside")
            async with worker(engine, install_service_database_url):
                # Nothing left to send to anyone: every lane of both endpoints was worked.
                await until(
                    lambda: scalar(
                        engine,
                        "SELECT count(*) = 0 FROM webhook_deliveries WHERE status = 'pending'",
                    ),
                    what="every delivery made",
                )
        finally:
            everything.stop()
        assert {e["organization"]["slug"] for e in everything.delivered()} == {"outside", "inside"}
        assert [e["organization"]["slug"] for e in receiver.delivered()] == ["inside"]
        assert [r.status for r in receiver.log()] == [200]
        orgs = await rows(
            engine,
            """SELECT DISTINCT o.slug FROM webhook_deliveries d
               JOIN organizations o ON o.id = d.organization_id WHERE d.endpoint_id = :e""",
            e=scoped.id,
        )
        assert [r.slug for r in orgs] == ["inside"]


class TestRedirects:
    @pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
    async def test_a_redirect_is_neither_followed_nor_a_delivery(
        self,
        engine: AsyncEngine,
        allowing: WebhookSettings,
        receiver: Receiver,
        owner: Actor,
        status: int,
    ) -> None:
        """A 3xx names another address; following it would carry the delivery past the
        address check. It is a failed attempt: retried later, counted against the endpoint."""
        redirector = Redirector(status, receiver.url)
        try:
            endpoint, delivery_id = await _one_delivery(engine, redirector.url, allowing, owner)
            receiver.secret = endpoint.secret
            outcome = await _attempt(engine, endpoint.id, allowing)
        finally:
            redirector.stop()
        assert redirector.hits == 1
        assert receiver.log() == []  # never reached through the redirect
        assert (outcome.status_code, outcome.succeeded) == (status, False)
        [found] = await rows(
            engine,
            "SELECT status, last_status_code FROM webhook_deliveries WHERE id = :d",
            d=delivery_id,
        )
        assert (found.status, found.last_status_code) == ("pending", status)
        [attempt] = await rows(
            engine, "SELECT succeeded, error FROM webhook_attempts WHERE delivery_id = :d",
            d=delivery_id,
        )  # fmt: skip
        assert (attempt.succeeded, attempt.error) == (False, f"HTTP {status}")
        assert await scalar(
            engine, "SELECT consecutive_failures FROM webhook_endpoints WHERE id = :e",
            e=endpoint.id,
        ) == 1  # fmt: skip


class TestSuccess:
    @pytest.mark.parametrize("status", [201, 202, 204, 299])
    async def test_any_2xx_answer_is_a_delivery(
        self,
        engine: AsyncEngine,
        allowing: WebhookSettings,
        receiver: Receiver,
        owner: Actor,
        status: int,
    ) -> None:
        """Receivers that queue the event answer 202 or 204, not 200: each is a success,
        settles the delivery and starts the endpoint's failure count again."""
        receiver.ok_status = status
        endpoint, delivery_id = await _one_delivery(engine, receiver.url, allowing, owner)
        receiver.secret = endpoint.secret
        async with transaction(engine) as session:
            await _record(session, delivery_id, _failed(), allowing, attempt=1)
        await execute(
            engine, "UPDATE webhook_deliveries SET next_attempt_at = now() WHERE id = :d",
            d=delivery_id,
        )  # fmt: skip
        outcome = await _attempt(engine, endpoint.id, allowing)
        assert (outcome.status_code, outcome.error, outcome.succeeded) == (status, None, True)
        assert [r.status for r in receiver.log()] == [status]
        [found] = await rows(
            engine,
            """SELECT status, last_status_code, finished_at IS NOT NULL AS finished
               FROM webhook_deliveries WHERE id = :d""",
            d=delivery_id,
        )
        assert (found.status, found.last_status_code, found.finished) == (
            "succeeded", status, True,
        )  # fmt: skip
        attempts = await rows(
            engine,
            """SELECT succeeded, status_code FROM webhook_attempts WHERE delivery_id = :d
               ORDER BY attempted_at""",
            d=delivery_id,
        )
        assert [(a.succeeded, a.status_code) for a in attempts] == [(False, 500), (True, status)]
        assert await scalar(
            engine, "SELECT consecutive_failures FROM webhook_endpoints WHERE id = :e",
            e=endpoint.id,
        ) == 0  # fmt: skip


class TestFailureCount:
    async def test_a_success_starts_the_count_again(
        self, engine: AsyncEngine, allowing: WebhookSettings, owner: Actor
    ) -> None:
        """Scattered failures of a healthy receiver never add up to disabling it."""
        settings = WebhookSettings(allow_private=True, max_attempts=3, retry_base_seconds=0.2)
        endpoint, delivery_id = await _one_delivery(
            engine, "http://127.0.0.1:9/hooks", settings, owner
        )

        async def counted() -> tuple[int, bool]:
            [row] = await rows(
                engine,
                "SELECT consecutive_failures, enabled FROM webhook_endpoints WHERE id = :e",
                e=endpoint.id,
            )
            return row.consecutive_failures, row.enabled

        for outcome, expected in (
            (_failed(), (1, True)),
            (_failed(), (2, True)),
            (_ok(), (0, True)),
            (_failed(), (1, True)),
            (_failed(), (2, True)),
        ):
            async with transaction(engine) as session:
                await _record(session, delivery_id, outcome, settings, attempt=1)
            assert await counted() == expected

    async def test_enabling_again_starts_the_count_again(
        self, engine: AsyncEngine, allowing: WebhookSettings, owner: Actor
    ) -> None:
        settings = WebhookSettings(allow_private=True, max_attempts=3, retry_base_seconds=0.2)
        endpoint, delivery_id = await _one_delivery(
            engine, "http://127.0.0.1:9/hooks", settings, owner
        )
        for _ in range(3):
            async with transaction(engine) as session:
                await _record(session, delivery_id, _failed(), settings, attempt=1)
        [disabled] = await rows(
            engine, "SELECT enabled, consecutive_failures FROM webhook_endpoints WHERE id = :e",
            e=endpoint.id,
        )  # fmt: skip
        assert (disabled.enabled, disabled.consecutive_failures) == (False, 3)
        async with transaction(engine) as session:
            await webhooks.set_enabled(session, Actor.system(), endpoint.id, enabled=True)
        assert await scalar(
            engine, "SELECT consecutive_failures FROM webhook_endpoints WHERE id = :e",
            e=endpoint.id,
        ) == 0  # fmt: skip
        async with transaction(engine) as session:
            await _record(session, delivery_id, _failed(), settings, attempt=1)
        [after] = await rows(
            engine, "SELECT enabled, consecutive_failures FROM webhook_endpoints WHERE id = :e",
            e=endpoint.id,
        )  # fmt: skip
        assert (after.enabled, after.consecutive_failures) == (True, 1)


class TestRetrySchedule:
    async def test_each_retry_waits_twice_the_last_from_the_base_up_to_an_hour(
        self, engine: AsyncEngine, allowing: WebhookSettings, owner: Actor
    ) -> None:
        """The documented schedule: the first retry after the base delay, each further one
        twice as long, never more than an hour."""
        settings = WebhookSettings(allow_private=True, retry_base_seconds=10, max_attempts=100)
        _, delivery_id = await _one_delivery(engine, "http://127.0.0.1:9/hooks", settings, owner)
        for attempt, expected in ((1, 10), (2, 20), (3, 40), (4, 80), (9, 2560), (10, 3600)):
            # as the lease of that attempt leaves the delivery
            await execute(
                engine,
                "UPDATE webhook_deliveries SET attempts = :a WHERE id = :d",
                a=attempt,
                d=delivery_id,
            )
            async with transaction(engine) as session:
                await _record(session, delivery_id, _failed(), settings, attempt=attempt)
            waits = await scalar(
                engine,
                """SELECT extract(epoch FROM next_attempt_at - a.attempted_at)
                   FROM webhook_deliveries d, LATERAL (
                       SELECT attempted_at FROM webhook_attempts
                       WHERE delivery_id = d.id ORDER BY attempted_at DESC LIMIT 1) a
                   WHERE d.id = :d""",
                d=delivery_id,
            )
            assert expected - 1 < float(waits) < expected + 1, (attempt, waits)
