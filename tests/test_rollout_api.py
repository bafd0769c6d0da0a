"""Staged resyncs over HTTP: every refusal is a specific 4xx that changes nothing; runs and
items are listed page by page; the fleet dry run pages its items; control calls answer."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.db.session import transaction
from install_service.orgs.service import ensure_admin
from install_service.resync.service import BUSY_WAIT_SECONDS
from install_service.testing import bearer, publish_template
from tests.conftest import dump, rows
from tests.runs import FLEET_V2, fleet_of

Client = AsyncTestClient[Litestar]
ADMIN_TOKEN = "rollout-admin-token"  # noqa: S105
ADMIN = bearer(ADMIN_TOKEN)
RESYNC = "/api/v1/admin/templates/fleet/resync"


@pytest.fixture
async def client(engine: AsyncEngine, install_service_client: Client) -> Client:
    async with transaction(engine) as session:
        await ensure_admin(session, ADMIN_TOKEN)
    return install_service_client


async def walk(client: Client, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a list endpoint, page by page."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = await client.get(
            path, params={**params, **({"cursor": cursor} if cursor else {})}, headers=ADMIN
        )
        assert page.status_code == 200, page.text
        found += page.json()["items"]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return found


class TestRefusals:
    @pytest.mark.parametrize(
        ("body", "status", "code"),
        [
            ({"waves": [{"count": 2, "percent": 10}]}, 400, "invalid_request"),
            ({"waves": [{}]}, 400, "invalid_request"),
            ({"waves": [{"count": 0}]}, 400, "invalid_request"),
            ({"waves": [{"percent": 101}]}, 400, "invalid_request"),
            ({"waves": [{"orgs": []}]}, 400, "invalid_request"),
            ({"max_conflict_rate": 1.5}, 400, "invalid_request"),
            ({"max_failure_rate": -0.1}, 400, "invalid_request"),
            ({"bake_seconds": -1}, 400, "invalid_request"),
            ({"start_at": "2030-01-01T00:00:00"}, 400, "invalid_request"),
            ({"start_at": "soon"}, 400, "invalid_request"),
            ({"orgs": []}, 400, "invalid_request"),
            ({"wave": [{"count": 1}]}, 400, "invalid_request"),
            # A string is not a number, nor a boolean, in a JSON body.
            ({"waves": [{"count": "1"}]}, 400, "invalid_request"),
            ({"waves": [{"percent": "50"}]}, 400, "invalid_request"),
            ({"max_conflict_rate": "0.5"}, 400, "invalid_request"),
            ({"include_pinned": "true"}, 400, "invalid_request"),
            ({"version": "1"}, 400, "invalid_request"),
            ({"orgs": ["f-00001", "nobody"]}, 422, "unknown_organizations"),
            ({"exclude": ["nobody"]}, 422, "unknown_organizations"),
            ({"waves": [{"orgs": ["nobody"]}]}, 422, "unknown_organizations"),
            (
                {"exclude": ["f-00001"], "waves": [{"orgs": ["f-00001"]}]},
                422,
                "organizations_not_selected",
            ),
            ({"version": 7}, 404, "release_not_found"),
        ],
    )
    async def test_bad_requests_are_specific_and_write_nothing(
        self, engine: AsyncEngine, client: Client, body: dict[str, Any], status: int, code: str
    ) -> None:
        await fleet_of(engine, 2)
        await publish_template(engine, FLEET_V2)
        before = await dump(engine)
        for dry_run in (False, True):
            refused = await client.post(RESYNC, json={**body, "dry_run": dry_run}, headers=ADMIN)
            assert (refused.status_code, refused.json()["code"]) == (status, code), refused.text
            if code == "unknown_organizations":
                assert "nobody" in refused.json()["organizations"]
        assert await dump(engine) == before

    async def test_unknown_runs_templates_statuses_and_cursors(self, client: Client) -> None:
        missing = "00000000-0000-0000-0000-000000000000"
        for method, path in (
            ("GET", f"/api/v1/admin/resync-runs/{missing}"),
            ("GET", f"/api/v1/admin/resync-runs/{missing}/items"),
            ("POST", f"/api/v1/admin/resync-runs/{missing}/pause"),
            ("POST", f"/api/v1/admin/resync-runs/{missing}/resume"),
            ("POST", f"/api/v1/admin/resync-runs/{missing}/cancel"),
            ("POST", f"/api/v1/admin/resync-runs/{missing}/retry"),
        ):
            response = await client.request(method, path, headers=ADMIN)
            assert (response.status_code, response.json()["code"]) == (404, "resync_run_not_found")
        unknown = await client.get("/api/v1/admin/resync-runs?template=nope", headers=ADMIN)
        assert (unknown.status_code, unknown.json()["code"]) == (404, "template_not_found")
        for query in ("status=done", "cursor=bogus", "limit=500"):
            bad = await client.get(f"/api/v1/admin/resync-runs?{query}", headers=ADMIN)
            assert bad.status_code == 400, query
        bad_wave = await client.get(
            f"/api/v1/admin/resync-runs/{missing}/items?wave=0", headers=ADMIN
        )
        assert bad_wave.status_code == 400


class TestListsAndControl:
    async def test_runs_and_items_are_listed_filtered_and_paged(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        await fleet_of(engine, 7)
        await publish_template(engine, FLEET_V2)
        started = await client.post(
            RESYNC, json={"waves": [{"count": 2}, {"count": 2}]}, headers=ADMIN
        )
        assert started.status_code == 202
        run = started.json()
        assert [(w["wave"], w["total"]) for w in run["waves"]] == [(1, 2), (2, 2), (3, 3)]
        assert (run["status"], run["current_wave"], run["counts"]["pending"]) == ("queued", 1, 7)

        everything = await walk(client, f"/api/v1/admin/resync-runs/{run['id']}/items", limit=3)
        assert [i["wave"] for i in everything] == [1, 1, 2, 2, 3, 3, 3]
        assert len({i["install_id"] for i in everything}) == 7
        second = await walk(client, f"/api/v1/admin/resync-runs/{run['id']}/items", wave=2)
        assert [i["install_id"] for i in second] == [
            i["install_id"] for i in everything if i["wave"] == 2
        ]
        none_done = await walk(
            client, f"/api/v1/admin/resync-runs/{run['id']}/items", status="succeeded"
        )
        assert none_done == []

        cancelled = await client.post(
            f"/api/v1/admin/resync-runs/{run['id']}/cancel", headers=ADMIN
        )
        assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
        refused = await client.post(f"/api/v1/admin/resync-runs/{run['id']}/pause", headers=ADMIN)
        assert (refused.status_code, refused.json()["code"]) == (409, "resync_run_finished")
        again = await client.post(RESYNC, json={}, headers=ADMIN)
        assert (again.status_code, again.json()["created"]) == (202, True)
        paused = await client.post(
            f"/api/v1/admin/resync-runs/{again.json()['id']}/pause", headers=ADMIN
        )
        assert paused.json()["status"] == "paused"

        listed = await walk(client, "/api/v1/admin/resync-runs", template="fleet", limit=1)
        assert [r["id"] for r in listed] == [again.json()["id"], run["id"]]
        assert [
            r["id"] for r in await walk(client, "/api/v1/admin/resync-runs", status="paused")
        ] == [again.json()["id"]]
        actions = await rows(
            engine, "SELECT action FROM audit_log WHERE action LIKE 'resync.%' ORDER BY occurred_at"
        )
        assert [a.action for a in actions] == [
            "resync.started",
            "resync.cancelled",
            "resync.started",
            "resync.paused",
        ]

    async def test_the_dry_run_pages_its_items_with_the_same_totals(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        await fleet_of(engine, 9)
        await publish_template(engine, FLEET_V2)
        body = {"dry_run": True, "waves": [{"percent": 30}]}
        before = await dump(engine)
        pages = []
        cursor = None
        while True:
            page = await client.post(
                RESYNC + "?limit=4" + (f"&cursor={cursor}" if cursor else ""),
                json=body,
                headers=ADMIN,
            )
            assert page.status_code == 200
            pages.append(page.json())
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        assert await dump(engine) == before
        assert [len(p["items"]) for p in pages] == [4, 4, 1]
        assert all(p["totals"] == pages[0]["totals"] for p in pages)
        assert pages[0]["totals"] == {"upgrade": 9, "unchanged": 0, "conflict": 0, "skipped": 0}
        assert [(w["wave"], w["upgrade"]) for w in pages[0]["waves"]] == [(1, 3), (2, 6)]
        items = [i for p in pages for i in p["items"]]
        assert len({i["install_id"] for i in items}) == 9
        assert [i["wave"] for i in items] == [1, 1, 1, 2, 2, 2, 2, 2, 2]
        # in (wave, organization id) order across pages
        positions = [(i["wave"], uuid.UUID(i["organization"]["id"])) for i in items]
        assert positions == sorted(positions)
        assert all("conflicts" not in i for i in items)
        bad = await client.post(RESYNC + "?cursor=nope", json=body, headers=ADMIN)
        assert (bad.status_code, bad.json()["code"]) == (400, "invalid_cursor")


class TestStartWhileAnInstallIsBusy:
    """An install being changed holds its row until it commits. A start waits for it a
    bounded time, then names it in a 409; it never waits out the statement timeout."""

    @contextmanager
    def _held(self, url: URL, org: str, *, for_seconds: float) -> Iterator[None]:
        """A transaction of its own (on a thread: the in-process client blocks this loop)
        holding the org's install row for a while, as an upgrade in progress does."""
        locked = threading.Event()

        def hold() -> None:
            conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
            with psycopg.connect(conninfo) as conn:
                conn.execute(
                    """SELECT 1 FROM agents a JOIN organizations o ON o.id = a.organization_id
                       WHERE o.slug = %s AND a.template_agent_id IS NOT NULL FOR UPDATE OF a""",
                    (org,),
                )
                locked.set()
                time.sleep(for_seconds)
                conn.rollback()

        thread = threading.Thread(target=hold)
        thread.start()
        assert locked.wait(10)
        try:
            yield
        finally:
            thread.join()

    async def test_a_busy_install_is_named_in_a_409_after_a_bounded_wait(
        self, engine: AsyncEngine, client: Client, install_service_database_url: URL
    ) -> None:
        await fleet_of(engine, 3)
        await publish_template(engine, FLEET_V2)
        before = await dump(engine)
        with self._held(install_service_database_url, "f-00002", for_seconds=BUSY_WAIT_SECONDS + 3):
            started = time.monotonic()
            refused = await client.post(RESYNC, json={}, headers=ADMIN)
            waited = time.monotonic() - started
        assert (refused.status_code, refused.json()["code"]) == (409, "installs_busy")
        assert refused.json()["organizations"] == ["f-00002"]
        assert "f-00002" in refused.json()["detail"]
        assert BUSY_WAIT_SECONDS - 0.5 < waited < BUSY_WAIT_SECONDS + 2.5, waited
        assert await dump(engine) == before
        again = await client.post(RESYNC, json={}, headers=ADMIN)
        assert again.status_code == 202, again.text
        assert [r.status for r in await rows(engine, "SELECT status FROM resync_runs")] == [
            "queued"
        ]

    async def test_an_install_that_finishes_meanwhile_is_waited_for(
        self, engine: AsyncEngine, client: Client, install_service_database_url: URL
    ) -> None:
        await fleet_of(engine, 2)
        await publish_template(engine, FLEET_V2)
        with self._held(install_service_database_url, "f-00001", for_seconds=1.0):
            started = await client.post(RESYNC, json={}, headers=ADMIN)
        assert started.status_code == 202, started.text
        assert len(await rows(engine, "SELECT install_id FROM resync_items")) == 2
