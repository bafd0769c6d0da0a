"""Webhooks end to end: a real receiver verifying signatures with the reference library, real
workers (in process, and processes killed mid-delivery), outages, ordering per organization,
retries, disabling, redelivery, and the address checks at creation and at delivery."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.config import WebhookSettings
from install_service.db.session import transaction
from install_service.errors import Invalid
from install_service.events import addresses, webhooks
from install_service.events.schemas import WebhookCreate, WebhookCreated
from install_service.orgs.service import ensure_admin
from install_service.resync import jobs
from install_service.testing import bearer, install_template, make_org, make_user, publish_template
from tests.conftest import execute, rows, scalar, small_doc
from tests.webhook_receiver import Receiver, event_ids

Client = AsyncTestClient[Litestar]
FAST = {
    "INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE": "true",
    "INSTALL_SERVICE_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
    "INSTALL_SERVICE_WEBHOOK_MAX_ATTEMPTS": "30",
    "INSTALL_SERVICE_WEBHOOK_TIMEOUT_SECONDS": "3",
}


def v2() -> dict[str, Any]:
    doc = small_doc()
    doc["watchers"][0]["prompt"] = "v2 prompt"
    return doc


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> WebhookSettings:
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    return WebhookSettings.from_env()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    found.start()
    yield found
    found.stop()


async def add_endpoint(
    engine: AsyncEngine, url: str, settings: WebhookSettings, **kw: Any
) -> WebhookCreated:
    async with transaction(engine) as session:
        return await webhooks.create_endpoint(
            session, Actor.system(), WebhookCreate(url=url, **kw), settings
        )


@asynccontextmanager
async def worker(engine: AsyncEngine, url: URL) -> AsyncIterator[None]:
    """A worker in this process (every queue), until the block ends."""
    async with jobs.opened(url) as app:
        task = asyncio.create_task(
            jobs.run_worker(engine, app, concurrency=4, install_signal_handlers=False)
        )
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(check: Callable[[], Any], seconds: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.1)


async def feed_order(engine: AsyncEngine) -> list[tuple[str, str]]:
    found = await rows(
        engine,
        """SELECT e.id, o.slug FROM events e JOIN organizations o ON o.id = e.organization_id
           WHERE e.install_id IS NOT NULL ORDER BY e.txid, e.seq""",
    )
    return [(str(r.id), r.slug) for r in found]


class TestDelivery:
    async def test_signed_in_order_per_org_through_an_outage_and_errors(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        fast: WebhookSettings,
        receiver: Receiver,
    ) -> None:
        await publish_template(engine, small_doc())
        await publish_template(engine, v2())
        endpoint = await add_endpoint(
            engine,
            receiver.url,
            fast,
            event_types=["install.created", "install.upgraded", "install.rolled_back"],
        )
        receiver.secret = endpoint.secret
        receiver.stop()  # down: connections refused
        for slug in ("one", "two"):
            await make_org(engine, slug=slug)
        async with worker(engine, install_service_database_url):
            for version in (1, 2, 1, 2):  # two orgs' events interleaved
                for slug in ("one", "two"):
                    await install_template(engine, Actor.system(), "starter", slug, version=version)
            await until(
                lambda: scalar(engine, "SELECT count(*) FROM webhook_attempts"), what="attempts"
            )
            await asyncio.sleep(1)
            receiver.mode = "fail"
            receiver.start()  # up again, answering 500
            await until(lambda: len(receiver.log()) >= 4, what="500s")
            receiver.mode = "ok"
            await until(lambda: len(receiver.delivered()) >= 8, seconds=90, what="deliveries")

        assert receiver.bad_signatures == 0
        expected = await feed_order(engine)
        delivered = receiver.delivered()
        assert sorted(event_ids(delivered)) == sorted(e for e, _ in expected)
        for slug in ("one", "two"):
            own = [e for e, s in expected if s == slug]
            # Every request for an org's event came after its previous event was delivered.
            requests = [
                r
                for r in receiver.log()
                if r.payload and r.payload["data"]["organization"]["slug"] == slug
            ]
            first_success = {}
            for n, r in enumerate(requests):
                if r.status == 200:
                    first_success.setdefault(r.webhook_id, n)
            for earlier, later in itertools.pairwise(own):
                first_later = next(n for n, r in enumerate(requests) if r.webhook_id == later)
                assert first_success[earlier] < first_later
            assert [e["id"] for e in delivered if e["organization"]["slug"] == slug] == own
        # Every attempt is in the log, and the deliveries say so.
        async with transaction(engine) as session:
            page = await webhooks.list_deliveries(
                session, endpoint.id, webhooks.PageRequest(limit=200)
            )
        assert {d.status for d in page.items} == {"succeeded"}
        attempts = [a for d in page.items for a in d.attempts]
        assert any(a.error and "Connect" in a.error for a in attempts), attempts
        assert any(a.status_code == 500 for a in attempts)
        assert sum(a.succeeded for a in attempts) == 8
        assert all(a.duration_ms >= 0 for a in attempts)

    async def test_a_rolled_back_operation_delivers_nothing(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        fast: WebhookSettings,
        receiver: Receiver,
        owner: Actor,
    ) -> None:
        await publish_template(engine, small_doc())
        endpoint = await add_endpoint(engine, receiver.url, fast)
        receiver.secret = endpoint.secret

        class Abandon(Exception):
            pass

        async def install_then_fail() -> None:
            async with transaction(engine) as session:
                from install_service.installs import service as installs

                await installs.install(session, owner, template="starter")
                assert await scalar_in(session, "SELECT count(*) FROM webhook_deliveries") == 1
                raise Abandon

        with pytest.raises(Abandon):
            await install_then_fail()
        async with worker(engine, install_service_database_url):
            await asyncio.sleep(3)
        assert receiver.log() == []
        assert await scalar(engine, "SELECT count(*) FROM webhook_deliveries") == 0
        assert await scalar(engine, "SELECT count(*) FROM events") == 1  # the publish only
        assert (
            await scalar(
                engine,
                "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = 'webhooks' "
                "AND task_name = 'webhooks:deliver'",
            )
            == 0
        )

    async def test_failing_endpoint_is_disabled_with_a_reason_then_redelivered(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        fast: WebhookSettings,
        receiver: Receiver,
        owner: Actor,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("INSTALL_SERVICE_WEBHOOK_MAX_ATTEMPTS", "3")
        settings = WebhookSettings.from_env()
        await publish_template(engine, small_doc())
        endpoint = await add_endpoint(engine, receiver.url, settings)
        receiver.secret = endpoint.secret
        receiver.mode = "fail"
        await install_template(engine, owner, "starter")
        async with worker(engine, install_service_database_url):
            await until(
                lambda: scalar(engine, "SELECT NOT enabled FROM webhook_endpoints"),
                what="the endpoint disabled",
            )
        async with transaction(engine) as session:
            disabled = await webhooks.get_endpoint(session, endpoint.id)
            [delivery] = (
                await webhooks.list_deliveries(session, endpoint.id, webhooks.PageRequest())
            ).items
        assert not disabled.enabled
        assert disabled.disabled_reason == (
            "disabled after 3 consecutive failed attempts; last: HTTP 500"
        )
        assert (delivery.status, len(delivery.attempts)) == ("failed", 3)
        # The delays doubled: 0.2 s, then 0.4 s (each at least, give or take a poll).
        gaps = [
            (b.attempted_at - a.attempted_at).total_seconds()
            for a, b in zip(delivery.attempts, delivery.attempts[1:], strict=False)
        ]
        assert gaps[0] >= 0.2
        assert gaps[1] >= 0.4
        assert (
            await scalar(engine, "SELECT count(*) FROM audit_log WHERE action = 'webhook.disabled'")
            == 1
        )

        receiver.mode = "ok"
        async with transaction(engine) as session:
            with pytest.raises(webhooks.Conflict):
                await webhooks.redeliver(session, Actor.system(), endpoint.id, delivery.id)
        async with transaction(engine) as session:
            await webhooks.set_enabled(session, Actor.system(), endpoint.id, enabled=True)
        async with transaction(engine) as session:
            await webhooks.redeliver(session, Actor.system(), endpoint.id, delivery.id)
        async with worker(engine, install_service_database_url):
            await until(lambda: receiver.delivered(), what="the redelivery")
        async with transaction(engine) as session:
            again = await webhooks.get_delivery(session, endpoint.id, delivery.id)
        assert again.status == "succeeded"
        assert [(a.succeeded, a.redelivery) for a in again.attempts] == [
            (False, False),
            (False, False),
            (False, False),
            (True, True),
        ]
        assert {r.webhook_id for r in receiver.log()} == {str(delivery.event_id)}


async def scalar_in(session: Any, sql: str) -> Any:
    from sqlalchemy import text

    return await session.scalar(text(sql))


def worker_process(url: URL, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "install_service", "worker", "--concurrency", "2"],
        env={
            **os.environ,
            **env,
            "INSTALL_SERVICE_DATABASE_URL": url.render_as_string(hide_password=False),
        },
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


class TestWorkerCrash:
    async def test_sigkill_mid_delivery_is_delivered_again_later(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        receiver: Receiver,
        owner: Actor,
        tmp_path: Path,
    ) -> None:
        settings = WebhookSettings(allow_private=True, timeout_seconds=3, retry_base_seconds=0.2)
        await publish_template(engine, small_doc())
        endpoint = await add_endpoint(engine, receiver.url, settings)
        receiver.secret = endpoint.secret
        receiver.mode = "stall"  # holds the request: the worker is mid-delivery
        await install_template(engine, owner, "starter")
        first = worker_process(install_service_database_url, tmp_path / "first.log", FAST)
        second: subprocess.Popen[bytes] | None = None
        try:
            await until(lambda: receiver.arrivals, seconds=60, what="the first attempt")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=20)
            receiver.mode = "ok"
            leased = await scalar(engine, "SELECT leased_until > now() FROM webhook_deliveries")
            assert leased  # claimed by the dead worker
            second = worker_process(install_service_database_url, tmp_path / "second.log", FAST)
            await until(
                lambda: scalar(engine, "SELECT status = 'succeeded' FROM webhook_deliveries"),
                seconds=60,
                what="the delivery to succeed",
            )
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(timeout=20)
        # The same message came twice (at least once): the receiver deduplicates on its id.
        assert len(receiver.arrivals) >= 2
        assert len(set(receiver.arrivals)) == 1
        assert receiver.delivered()[0]["id"] == receiver.arrivals[0]
        [attempt] = await rows(engine, "SELECT succeeded, redelivery FROM webhook_attempts")
        assert tuple(attempt) == (True, False)  # the killed attempt left no record, only a lease


class TestAddresses:
    REFUSED = (
        "http://127.0.0.1/hook",
        "http://127.1/hook",
        "http://0x7f.1/hook",
        "http://0177.0.0.1/hook",
        "http://2130706433/hook",
        "http://0x7f000001/hook",
        "http://localhost:8080/hook",
        "http://LOCALHOST./hook",
        "http://api.localhost/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[::ffff:7f00:1]/hook",
        "http://[0:0:0:0:0:ffff:7f00:1]/hook",
        "http://[2002:7f00:1::1]/hook",
        "http://[64:ff9b::a00:1]/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.1/hook",
        "http://100.64.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]/hook",
        "http://[fe80::1%25eth0]/hook",
        "http://[fd00::1]/hook",
        "http://[fc00::1]/hook",
        "http://[fec0::1]/hook",
        "http://224.0.0.1/hook",
        "http://[ff02::1]/hook",
        "http://0.0.0.0/hook",
        "http://0/hook",
        "http://[::]/hook",
        "http://240.0.0.1/hook",
        "http://255.255.255.255/hook",
    )

    @pytest.mark.parametrize("url", REFUSED)
    async def test_refused_at_creation(self, url: str) -> None:
        # Refused as a local or private address, or (spellings URL parsers reject, such as
        # `0177.0.0.1`) as no valid URL at all: a 422 either way.
        with pytest.raises(Invalid):
            await addresses.check_new(url, allow_private=False)

    @pytest.mark.parametrize(
        "url",
        [
            "ftp://example.com/x",
            "example.com/hook",
            "http:///x",
            "javascript:alert(1)",
            "http://exa mple.com/",
        ],
    )
    async def test_not_http_urls_are_refused(self, url: str) -> None:
        with pytest.raises(Invalid) as raised:
            await addresses.check_new(url, allow_private=True)
        assert raised.value.code == "invalid_webhook_url"

    @pytest.mark.parametrize(
        "url",
        ["https://93.184.216.34/hook", "http://[2606:4700::1111]/x", "https://[::ffff:8.8.8.8]/"],
    )
    async def test_public_addresses_are_accepted(self, url: str) -> None:
        await addresses.check_new(url, allow_private=False)

    async def test_allowed_when_private_addresses_are(self) -> None:
        await addresses.check_new("http://127.0.0.1:9/hook", allow_private=True)

    async def test_checked_again_on_the_address_resolved_at_delivery(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        receiver: Receiver,
        owner: Actor,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A name accepted when the endpoint was made (here: while private addresses were
        allowed; in the wild: a name that pointed elsewhere then) that resolves to a loopback
        address when delivering is refused, and nothing reaches the receiver."""
        name = socket.gethostname()
        resolved = {i[4][0] for i in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
        if not resolved or any(
            addresses.refusal(addresses.literal_address(a)) is None for a in resolved
        ):  # type: ignore[arg-type]
            pytest.skip(f"{name} does not resolve to a private address here")
        await publish_template(engine, small_doc())
        allowing = WebhookSettings(allow_private=True)
        endpoint = await add_endpoint(engine, f"http://{name}:{receiver.port}/hooks", allowing)
        receiver.secret = endpoint.secret
        for key, value in FAST.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE", "false")
        await install_template(engine, owner, "starter")
        async with worker(engine, install_service_database_url):
            await until(
                lambda: scalar(engine, "SELECT count(*) >= 2 FROM webhook_attempts"),
                what="refused attempts",
            )
        errors = await rows(engine, "SELECT error, status_code FROM webhook_attempts")
        assert all(e.status_code is None for e in errors)
        assert all("refused" in e.error and "loopback" in e.error for e in errors), errors
        assert all("INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE=true" in e.error for e in errors)
        assert receiver.log() == []

        # Allowed again: it connects to the address it checked, naming the host it was given.
        monkeypatch.setenv("INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE", "true")
        async with worker(engine, install_service_database_url):
            await until(lambda: receiver.delivered(), what="the delivery")
        assert receiver.log()[0].host == f"{name}:{receiver.port}"


class TestApi:
    @pytest.fixture
    def client(self, install_service_client: Client) -> Client:
        return install_service_client

    @pytest.fixture
    async def admin(self, engine: AsyncEngine) -> dict[str, str]:
        async with transaction(engine) as session:
            await ensure_admin(session, "hooks-admin")
        return bearer("hooks-admin")

    async def test_organizations_by_slug_or_id_among_thousands(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        """With enough organizations for PostgreSQL to look slugs and ids up by index, each
        reference still resolves: a slug is never cast to an id."""
        await execute(
            engine,
            """INSERT INTO organizations (slug, name)
               SELECT 'bulk-' || g, 'Bulk ' || g FROM generate_series(1, 3000) g""",
        )
        await execute(engine, "ANALYZE organizations")
        by_slug = await scalar(engine, "SELECT id FROM organizations WHERE slug = 'bulk-1234'")
        by_id = await scalar(engine, "SELECT id FROM organizations WHERE slug = 'bulk-2345'")
        # A slug spelled like an id names the org of that slug, not the org of that id.
        lookalike = await make_org(engine, slug=str(by_id))
        created = await client.post(
            "/api/v1/admin/webhooks",
            json={
                "url": "https://93.184.216.34/hooks",
                "organizations": ["bulk-1234", str(by_id), str(by_id), "bulk-1234"],
            },
            headers=admin,
        )
        assert created.status_code == 201, created.text
        stored = await scalar(
            engine,
            "SELECT organization_ids FROM webhook_endpoints WHERE id = :i",
            i=created.json()["id"],
        )
        assert stored == [by_slug, lookalike.id]
        unknown = await client.post(
            "/api/v1/admin/webhooks",
            json={"url": "https://93.184.216.34/hooks", "organizations": ["bulk-1", "bulk-0"]},
            headers=admin,
        )
        assert (unknown.status_code, unknown.json()["organizations"]) == (422, ["bulk-0"])
        assert await scalar(engine, "SELECT count(*) FROM webhook_endpoints") == 1

    async def test_manage_endpoints(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        acme = await make_org(engine, slug="acme")
        created = await client.post(
            "/api/v1/admin/webhooks",
            json={
                "url": "https://93.184.216.34/hooks",
                "event_types": ["install.created"],
                "organizations": ["acme", str(acme.id)],
            },
            headers=admin,
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["secret"].startswith("whsec_")
        assert body["organizations"] == [{"id": str(acme.id), "slug": "acme"}]
        hook = body["id"]
        listed = (await client.get("/api/v1/admin/webhooks", headers=admin)).json()
        assert [h["id"] for h in listed["items"]] == [hook]
        assert "secret" not in listed["items"][0]
        one = (await client.get(f"/api/v1/admin/webhooks/{hook}", headers=admin)).json()
        assert "secret" not in one
        for _ in range(2):  # a repeat is a no-op
            off = await client.post(f"/api/v1/admin/webhooks/{hook}/disable", headers=admin)
            assert (off.status_code, off.json()["enabled"]) == (200, False)
        on = await client.post(f"/api/v1/admin/webhooks/{hook}/enable", headers=admin)
        assert (on.json()["enabled"], on.json()["disabled_reason"]) == (True, None)
        deliveries = await client.get(f"/api/v1/admin/webhooks/{hook}/deliveries", headers=admin)
        assert deliveries.json() == {"items": [], "next_cursor": None}
        missing = await client.post(
            f"/api/v1/admin/webhooks/{hook}/deliveries/{uuid.uuid4()}/redeliver", headers=admin
        )
        assert (missing.status_code, missing.json()["code"]) == (404, "delivery_not_found")
        gone = await client.delete(f"/api/v1/admin/webhooks/{hook}", headers=admin)
        assert gone.status_code == 200
        for path in ("", "/deliveries"):
            response = await client.get(f"/api/v1/admin/webhooks/{hook}{path}", headers=admin)
            assert (response.status_code, response.json()["code"]) == (404, "webhook_not_found")
        actions = await rows(engine, "SELECT action FROM audit_log ORDER BY occurred_at")
        assert [a.action for a in actions if a.action.startswith("webhook.")] == [
            "webhook.created",
            "webhook.disabled",
            "webhook.enabled",
            "webhook.deleted",
        ]

    async def test_refusals(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        _, _, user_token = await make_user(engine)
        before = await scalar(engine, "SELECT count(*) FROM webhook_endpoints")
        cases = [
            ({"url": "http://127.0.0.1/x"}, 422, "webhook_address_not_allowed"),
            ({"url": "http://[::ffff:10.0.0.1]/x"}, 422, "webhook_address_not_allowed"),
            ({"url": "ftp://example.com/x"}, 422, "invalid_webhook_url"),
            ({"url": "https://93.184.216.34/x", "event_types": []}, 422, "no_event_types"),
            ({"url": "https://93.184.216.34/x", "organizations": []}, 422, "no_organizations"),
            (
                {"url": "https://93.184.216.34/x", "organizations": ["nope"]},
                422,
                "unknown_organizations",
            ),
            (
                {"url": "https://93.184.216.34/x", "event_types": ["install.exploded"]},
                400,
                "invalid_request",
            ),
            ({"url": "https://93.184.216.34/x", "secret": "mine"}, 400, "invalid_request"),
            ({}, 400, "invalid_request"),
        ]
        for body, status, code in cases:
            response = await client.post("/api/v1/admin/webhooks", json=body, headers=admin)
            assert (response.status_code, response.json()["code"]) == (status, code), body
            if code == "webhook_address_not_allowed":  # and how a local runner allows it
                assert "INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE=true" in response.json()["detail"]
        forbidden = await client.post(
            "/api/v1/admin/webhooks",
            json={"url": "https://93.184.216.34/x"},
            headers=bearer(user_token),
        )
        assert forbidden.status_code == 403
        assert (await client.get("/api/v1/admin/webhooks")).status_code == 401
        assert await scalar(engine, "SELECT count(*) FROM webhook_endpoints") == before
        for path in ("/api/v1/admin/webhooks/not-a-uuid", "/api/v1/admin/webhooks?limit=0"):
            assert (await client.get(path, headers=admin)).status_code in (400, 404)
