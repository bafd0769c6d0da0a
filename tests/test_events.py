"""The change feed: one event per committed change, none otherwise, read in order exactly once
however transactions interleave; long polls that hold no pooled connection."""

from __future__ import annotations

import asyncio
import gc
import socket
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from install_service.actor import SYSTEM, Actor
from install_service.app import create_app
from install_service.db.engine import asyncpg_dsn, create_engine
from install_service.db.session import transaction
from install_service.errors import InstallConflict
from install_service.events import feed
from install_service.events.listener import Listener
from install_service.installs import repair
from install_service.installs import service as installs
from install_service.installs.schemas import ItemRef
from install_service.orgs.service import ensure_admin, hash_token, remove_member, set_deactivated
from install_service.pagination import PageRequest
from install_service.testing import (
    add_membership,
    bearer,
    install_template,
    make_org,
    make_user,
    publish_template,
)
from tests.conftest import (
    emit_event,
    execute,
    older_transaction,
    rows,
    scalar,
    small_doc,
    waits_for_a_lock,
)

Client = AsyncTestClient[Litestar]


def v2() -> dict[str, Any]:
    doc = small_doc()
    doc["watchers"][0]["prompt"] = "v2 prompt"
    doc["entity_types"][0]["name"] = "Human"
    doc["entity_types"].append({"slug": "project", "name": "Project"})
    return doc


async def events(engine: AsyncEngine, org: uuid.UUID | None = None) -> list[Any]:
    return await rows(
        engine,
        """SELECT type, install_id, data FROM events
           WHERE CAST(:o AS uuid) IS NULL OR organization_id = :o ORDER BY txid, seq""",
        o=org,
    )


async def settled(engine: AsyncEngine) -> None:
    """Wait until the feed shows every committed event: until no transaction of the test's
    database older than the newest event still runs (latency, never loss)."""
    deadline = time.monotonic() + 30
    while not await scalar(engine, f"SELECT coalesce(max(txid), 0) < {feed.HORIZON} FROM events"):
        assert time.monotonic() < deadline, "the feed's horizon did not pass the last event"
        await asyncio.sleep(0.02)


async def read_all(
    engine: AsyncEngine, cursor: str | None = None, *, settle: bool = True, **kw: Any
) -> Any:
    """A page of the feed after `cursor`, once `settled` (unless a test reads while its own
    transactions are open, `settle=False`)."""
    if settle:
        await settled(engine)
    async with transaction(engine) as session:
        return await feed.read(session, PageRequest(limit=200, cursor=cursor), **kw)


class TestOneEventPerChange:
    async def test_every_lifecycle_path(self, engine: AsyncEngine, owner: Actor) -> None:
        await publish_template(engine, small_doc())
        org = (
            await rows(
                engine, "SELECT id FROM organizations WHERE personal_owner_id = :u", u=owner.user_id
            )
        )[0].id
        first = await install_template(engine, owner, "starter")  # install.created
        await install_template(engine, owner, "starter")  # no-op
        await install_template(engine, owner, "starter", dry_run=True)  # dry run
        await publish_template(engine, v2())  # template.published (in the template org)
        await publish_template(engine, v2())  # unchanged: nothing
        await install_template(engine, owner, "starter")  # install.upgraded
        await install_template(engine, owner, "starter", version=1)  # install.rolled_back
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, first.id)  # install.uninstalled
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, first.id)  # already: nothing
        await install_template(engine, owner, "starter", version=2)  # install.reinstalled
        # A refused install (a conflict) writes nothing.
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Mine' WHERE organization_id = :o AND slug = 'person'",
            o=org,
        )
        with pytest.raises(InstallConflict):
            await install_template(engine, owner, "starter", version=1)

        found = await events(engine, org)
        assert [e.type for e in found] == [
            "install.created",
            "install.upgraded",
            "install.rolled_back",
            "install.uninstalled",
            "install.reinstalled",
        ]
        assert {e.install_id for e in found} == {first.id}
        published = await rows(
            engine,
            "SELECT type, install_id, data FROM events "
            "WHERE organization_id <> :o ORDER BY txid, seq",
            o=org,
        )
        assert [(p.type, p.data["to_release"]["version"]) for p in published] == [
            ("template.published", 1),
            ("template.published", 2),
        ]
        assert published[1].install_id is None
        assert published[1].data["from_release"]["version"] == 1
        # The history and the feed say the same.
        history = await rows(engine, "SELECT action FROM install_events ORDER BY created_at")
        assert len(history) == len(found)

        created, upgraded, rolled_back, uninstalled, reinstalled = (e.data for e in found)
        assert (created["from_release"], created["to_release"]["version"]) == (None, 1)
        assert {(i["kind"], i["slug"], i["action"]) for i in created["items"]} == {
            ("entity_types", "person", "created"),
            ("entity_types", "company", "created"),
            ("relationship_types", "employed_by", "created"),
            ("relationship_types", "employs", "created"),
            ("relationship_types", "knows", "created"),
            ("classifiers", "seniority", "created"),
            ("watchers", "inbox", "created"),
        }
        assert [i["version"] for i in created["items"] if i["kind"] == "watchers"] == [1]
        assert (upgraded["from_release"]["version"], upgraded["to_release"]["version"]) == (1, 2)
        assert [(i["kind"], i["slug"], i["action"]) for i in upgraded["items"]] == [
            ("entity_types", "person", "updated"),
            ("entity_types", "project", "created"),
            ("watchers", "inbox", "updated"),
        ]
        watcher = upgraded["items"][-1]
        current = await scalar(
            engine,
            "SELECT current_version_id FROM watchers WHERE organization_id = :o",
            o=org,
        )
        assert watcher["version"] == 2
        assert uuid.UUID(watcher["version_id"]) != current
        assert [i["action"] for i in rolled_back["items"]] == ["updated", "archived", "updated"]
        assert rolled_back["items"][-1]["version"] == 3  # the old content as a new version
        assert {i["action"] for i in uninstalled["items"]} == {"archived"}
        assert len(uninstalled["items"]) == 7
        assert all("version_id" not in i for i in uninstalled["items"])
        assert {i["action"] for i in reinstalled["items"]} == {"reactivated", "updated"}
        assert reinstalled["items"][-1] == {
            "kind": "watchers",
            "slug": "inbox",
            "action": "updated",
            "version": 4,
            "version_id": str(current),
        }

    async def test_adopt_reconcile_and_detach(self, engine: AsyncEngine, owner: Actor) -> None:
        await publish_template(engine, small_doc())
        org = (
            await rows(
                engine, "SELECT id FROM organizations WHERE personal_owner_id = :u", u=owner.user_id
            )
        )[0].id
        # The org's own watcher, on its own schedule, with the slug the template uses.
        await execute(
            engine,
            """WITH w AS (INSERT INTO watchers (organization_id, slug, name, schedule)
                          VALUES (:o, 'inbox', 'Ours', '0 6 * * *') RETURNING id),
               v AS (INSERT INTO watcher_versions (organization_id, watcher_id, version, name,
                         prompt, extraction_schema, sources_schema)
                     SELECT :o, id, 1, 'Ours', 'Our prompt', '{}', '{}' FROM w RETURNING id)
               UPDATE watchers SET current_version_id = (SELECT id FROM v)
               WHERE id = (SELECT id FROM w)""",
            o=org,
        )
        with pytest.raises(InstallConflict):  # refused: no event
            await install_template(engine, owner, "starter")
        first = await install_template(engine, owner, "starter", adopt=True)  # install.created
        assert first.id is not None
        assert await scalar(  # adopted, it is scheduled at once
            engine, "SELECT next_run_at IS NOT NULL FROM watchers WHERE organization_id = :o", o=org
        )

        # The org edits a managed row and archives its watcher; reconcile puts both back.
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Mine' WHERE organization_id = :o AND slug = 'person'",
            o=org,
        )
        await execute(
            engine, "UPDATE watchers SET status = 'archived' WHERE organization_id = :o", o=org
        )
        async with transaction(engine) as session:
            await repair.reconcile(session, owner, first.id, dry_run=True)  # dry run: nothing
        async with transaction(engine) as session:
            await repair.reconcile(session, owner, first.id)  # install.reconciled
        assert await scalar(  # brought back, it is scheduled again at once
            engine, "SELECT next_run_at IS NOT NULL FROM watchers WHERE organization_id = :o", o=org
        )
        async with transaction(engine) as session:
            await repair.reconcile(session, owner, first.id)  # nothing left: nothing

        async with transaction(engine) as session:  # install.item_detached
            await repair.detach(session, owner, first.id, kind="entity_types", slug="person")
        async with transaction(engine) as session:  # already detached: nothing
            await repair.detach(session, owner, first.id, kind="entity_types", slug="person")
        await publish_template(engine, v2())
        await install_template(engine, owner, "starter")  # install.upgraded, person left alone
        v3 = v2()
        v3["entity_types"][0]["description"] = "v3"
        await publish_template(engine, v3)
        await install_template(  # install.upgraded, adopting person back
            engine, owner, "starter", adopt=[ItemRef(kind="entity_types", slug="person")]
        )

        found = await events(engine, org)
        assert [e.type for e in found] == [
            "install.created",
            "install.reconciled",
            "install.item_detached",
            "install.upgraded",
            "install.upgraded",
        ]
        history = await rows(
            engine, "SELECT action FROM install_events WHERE install_id = :i", i=first.id
        )
        assert len(history) == len(found)
        created, reconciled, detached, upgraded, adopted = (e.data for e in found)

        def changed(data: dict[str, Any]) -> list[tuple[str, str, str]]:
            return [(i["kind"], i["slug"], i["action"]) for i in data["items"]]

        assert ("watchers", "inbox", "adopted") in changed(created)
        [watcher] = [i for i in created["items"] if i["kind"] == "watchers"]
        assert watcher["version"] == 2  # the org's content stays as version 1
        # The watcher is brought back merged: its schedule is the org's (a tenant field).
        assert changed(reconciled) == [
            ("entity_types", "person", "updated"),
            ("watchers", "inbox", "updated"),
        ]
        assert reconciled["from_release"] == reconciled["to_release"]
        assert changed(detached) == [("entity_types", "person", "detached")]
        assert ("entity_types", "person", "updated") not in changed(upgraded)
        assert ("entity_types", "project", "created") in changed(upgraded)
        assert changed(adopted) == [("entity_types", "person", "adopted")]
        # Adopted, archived and brought back, it runs on the org's schedule.
        [row] = await rows(
            engine, "SELECT schedule, next_run_at FROM watchers WHERE organization_id = :o", o=org
        )
        assert (row.schedule, row.next_run_at is not None) == ("0 6 * * *", True)

    async def test_the_database_refuses_to_rewrite_events(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        for statement in (
            "UPDATE events SET type = 'install.created'",
            "DELETE FROM events",
            "TRUNCATE events CASCADE",
        ):
            with pytest.raises(DBAPIError, match="append-only"):
                await execute(engine, statement)
        assert await scalar(engine, "SELECT count(*) FROM events") == 1

    async def test_a_rolled_back_operation_leaves_no_event(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        before = await read_all(engine)

        class Abandon(Exception):
            pass

        async def install_then_fail() -> None:
            async with transaction(engine) as session:
                await installs.install(session, owner, template="starter")
                assert await session.scalar(text("SELECT count(*) FROM events")) == 2
                raise Abandon

        with pytest.raises(Abandon):
            await install_then_fail()
        after = await read_all(engine, before.next_cursor)
        assert after.items == []
        assert await scalar(engine, "SELECT count(*) FROM events") == 1


async def _begin_install(conn: AsyncConnection, actor: Actor, org: str, **kw: Any) -> None:
    """Run an install in an open transaction on `conn`, leaving it uncommitted."""
    session = AsyncSession(bind=conn)
    await installs.install(session, actor, template="starter", organization=org, **kw)


class TestOrder:
    async def test_commits_in_the_opposite_order_are_read_in_order_exactly_once(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, small_doc())
        actor = Actor.system()
        await make_org(engine, slug="first")
        await make_org(engine, slug="second")
        cursor = (await read_all(engine)).next_cursor
        seen: list[str] = []

        async def poll(*, settle: bool = True) -> None:
            nonlocal cursor
            page = await read_all(engine, cursor, settle=settle)
            seen.extend(e.organization.slug for e in page.items)
            cursor = page.next_cursor

        async with engine.connect() as a, engine.connect() as b:
            await a.begin()
            await _begin_install(a, actor, "first")  # begins first: the lower transaction id
            await b.begin()
            await _begin_install(b, actor, "second")
            await poll(settle=False)
            await b.commit()  # ... but commits first
            await poll(settle=False)  # between the commits: "second" is held back, not skipped
            assert seen == []
            await a.commit()
            await poll()
            await poll()
        assert seen == ["first", "second"]

    async def test_a_cursor_resumes_before_a_later_transactions_earlier_event(
        self, engine: AsyncEngine
    ) -> None:
        """Order is by transaction, then by insertion: an event inserted before another may
        come after it in the feed. A cursor is a position in that order, so the next page
        starts with the later transaction's event even though it was inserted earlier."""
        org = await make_org(engine, slug="acme")
        cursor = (await read_all(engine)).next_cursor
        async with engine.connect() as a, engine.connect() as b:
            await a.begin()
            first = await emit_event(AsyncSession(bind=a), org.id)  # a's id: the lower
            await b.begin()
            inserted_second = await emit_event(AsyncSession(bind=b), org.id)
            inserted_third = await emit_event(AsyncSession(bind=a), org.id)
            await a.commit()
            page = await read_all(engine, cursor, settle=False)  # b still holds its own
            assert [e.id for e in page.items] == [first, inserted_third]
            await b.commit()
        rest = await read_all(engine, page.next_cursor)
        assert [e.id for e in rest.items] == [inserted_second]

    async def test_only_this_databases_transactions_hold_the_feed_back(
        self, engine: AsyncEngine, url: URL, install_service_template_database: str
    ) -> None:
        """A transaction of another database on the same server, older than an event, cannot
        write to this feed: the event is read at once. One of this database holds it back."""
        await publish_template(engine, small_doc())
        actor = Actor.system()
        for slug in ("first", "second"):
            await make_org(engine, slug=slug)
        cursor = (await read_all(engine)).next_cursor
        elsewhere = url.set(database=install_service_template_database)
        async with older_transaction(elsewhere):  # another database's, and older
            async with engine.connect() as conn:
                await conn.begin()
                await _begin_install(conn, actor, "first")
                await conn.commit()
            page = await read_all(engine, cursor, settle=False)
            assert [e.organization.slug for e in page.items] == ["first"]
            async with engine.connect() as here:
                await here.begin()
                await here.execute(text("SELECT pg_current_xact_id()"))
                async with engine.connect() as conn:
                    await conn.begin()
                    await _begin_install(conn, actor, "second")
                    await conn.commit()
                held = await read_all(engine, page.next_cursor, settle=False)
                assert held.items == []
                await here.rollback()
            page = await read_all(engine, held.next_cursor, settle=False)
            assert [e.organization.slug for e in page.items] == ["second"]

    async def test_a_reader_is_never_given_its_own_uncommitted_events(
        self, engine: AsyncEngine
    ) -> None:
        """A snapshot does not list its own transaction as running, yet that transaction's
        events may still roll back: read in it, they are held back like anyone's."""
        org = await make_org(engine, slug="acme")
        cursor = (await read_all(engine)).next_cursor
        async with engine.connect() as conn:
            await conn.begin()
            session = AsyncSession(bind=conn)
            await emit_event(session, org.id)
            await make_org(engine, slug="later")  # a later id ends: the snapshot's xmax passes ours
            page = await feed.read(session, PageRequest(limit=200, cursor=cursor))
            assert page.items == []
            await conn.rollback()
        assert (await read_all(engine, cursor)).items == []

    async def test_a_running_transaction_the_reader_cannot_place_holds_the_feed_back(
        self, engine: AsyncEngine
    ) -> None:
        """A transaction is passed over only when it is seen in another database. One the
        reader's view of the sessions does not show (it is read once per transaction, and a
        prepared transaction has no session) still holds the feed: its events may come."""
        await publish_template(engine, small_doc())
        actor = Actor.system()
        await make_org(engine, slug="first")
        cursor = (await read_all(engine)).next_cursor
        async with engine.connect() as reader, engine.connect() as unseen:
            await reader.begin()
            await reader.execute(text("SELECT count(*) FROM pg_stat_activity"))  # seen now
            await unseen.begin()
            await unseen.execute(text("SELECT pg_current_xact_id()"))  # an id, after that
            async with engine.connect() as conn:
                await conn.begin()
                await _begin_install(conn, actor, "first")
                await conn.commit()
            held = await feed.read(AsyncSession(bind=reader), PageRequest(limit=200, cursor=cursor))
            assert held.items == []
            await reader.rollback()
            await unseen.rollback()
        page = await read_all(engine, cursor)
        assert [e.organization.slug for e in page.items] == ["first"]

    async def test_an_operation_that_waited_for_another_comes_after_it(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        """B's transaction id is older (it wrote something first), but B's upgrade waited
        for A's install lock: B's event must follow A's."""
        await publish_template(engine, small_doc())
        await install_template(engine, owner, "starter")
        await publish_template(engine, v2())
        v3 = v2()
        v3["watchers"][0]["prompt"] = "v3 prompt"
        await publish_template(engine, v3)
        org = str(
            (
                await rows(
                    engine,
                    "SELECT id FROM organizations WHERE personal_owner_id = :u",
                    u=owner.user_id,
                )
            )[0].id
        )
        async with engine.connect() as a, engine.connect() as b:
            await b.begin()
            await b.execute(text("SELECT pg_current_xact_id()"))  # B's id is assigned first
            await a.begin()
            await _begin_install(a, owner, org, version=2)  # A holds the install
            upgrade_b = asyncio.create_task(_begin_install(b, owner, org, version=3))
            await waits_for_a_lock(engine, upgrade_b)
            await a.commit()
            await upgrade_b
            await b.commit()
        found = await events(engine, uuid.UUID(org))
        assert [(e.data["from_release"], e.data["to_release"]["version"]) for e in found] == [
            (None, 1),
            ({"id": found[0].data["to_release"]["id"], "version": 1}, 2),
            ({"id": found[1].data["to_release"]["id"], "version": 2}, 3),
        ]

    async def test_organizations_feeds_interleave_but_each_keeps_its_order(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, small_doc())
        await publish_template(engine, v2())
        actor = Actor.system()
        for slug in ("one", "two"):
            await make_org(engine, slug=slug)
        for version in (1, 2, 1, 2):
            for slug in ("one", "two"):
                await install_template(engine, actor, "starter", slug, version=version)
        everything = await read_all(engine)
        for slug in ("one", "two"):
            org = next(e.organization.id for e in everything.items if e.organization.slug == slug)
            own = await read_all(engine, organization_id=org)
            assert [e.type for e in own.items] == [
                "install.created",
                "install.upgraded",
                "install.rolled_back",
                "install.upgraded",
            ]
            assert [e.id for e in own.items] == [
                e.id for e in everything.items if e.organization.slug == slug
            ]


# Steps of a random schedule: ("begin", t), ("write", t), ("commit", t), ("rollback", t),
# ("read",) with t one of a few concurrent transactions.
_TRANSACTIONS = 4


@st.composite
def schedules(draw: st.DrawFn) -> list[tuple[str, int]]:
    steps: list[tuple[str, int]] = []
    for t in range(_TRANSACTIONS):
        steps.append(("begin", t))
        steps += [("write", t)] * draw(st.integers(0, 2))
        steps.append((draw(st.sampled_from(["commit", "commit", "rollback"])), t))
    # Any interleaving that keeps each transaction's own steps in order.
    order = draw(st.permutations(range(len(steps))))
    queues = {t: [s for s in steps if s[1] == t] for t in range(_TRANSACTIONS)}
    owners = [steps[i][1] for i in order]
    shuffled = [queues[t].pop(0) for t in owners]
    reads = draw(st.lists(st.integers(0, len(shuffled)), max_size=8))
    for at in sorted(reads, reverse=True):
        shuffled.insert(at, ("read", -1))
    return [*shuffled, ("read", -1)]


async def _play(url: URL, org: uuid.UUID, steps: list[tuple[str, int]]) -> None:
    engine = create_engine(url, pool_size=_TRANSACTIONS + 2)
    try:
        cursor = (await read_all(engine)).next_cursor
        conns: dict[int, AsyncConnection] = {}
        written: dict[int, list[uuid.UUID]] = {}
        committed: list[uuid.UUID] = []
        received: list[uuid.UUID] = []
        for step, t in steps:
            if step == "begin":
                conns[t] = await engine.connect()
                await conns[t].begin()
                written[t] = []
            elif step == "write":
                event = await emit_event(AsyncSession(bind=conns[t]), org)
                written[t].append(event)
            elif step in ("commit", "rollback"):
                await (conns[t].commit() if step == "commit" else conns[t].rollback())
                await conns[t].close()
                if step == "commit":
                    committed += written[t]
            else:
                page = await read_all(engine, cursor, settle=False)
                received += [e.id for e in page.items]
                cursor = page.next_cursor
        # Once every transaction has ended, a reader that waits for the horizon gets the rest.
        received += [e.id for e in (await read_all(engine, cursor)).items]
        # Exactly once: nothing twice, nothing rolled back, every committed event.
        assert len(received) == len(set(received))
        assert set(received) == set(committed)
        # In order: the order the feed itself keeps.
        order = await rows(engine, "SELECT id FROM events ORDER BY txid, seq")
        position = {r.id: n for n, r in enumerate(order)}
        assert received == sorted(received, key=position.__getitem__)
    finally:
        await engine.dispose()


class TestExactlyOnceInOrder:
    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(steps=schedules())
    def test_any_interleaving_of_writers_and_a_reader(
        self, install_service_database_url: URL, steps: list[tuple[str, int]]
    ) -> None:
        async def setup() -> uuid.UUID:
            engine = create_engine(install_service_database_url)
            try:
                found = await scalar(engine, "SELECT id FROM organizations WHERE slug = 'prop'")
                if found is None:
                    return (await make_org(engine, slug="prop")).id
                return found  # type: ignore[no-any-return]
            finally:
                await engine.dispose()

        org = asyncio.run(setup())
        asyncio.run(_play(install_service_database_url, org, steps))


@pytest.fixture
async def live(install_service_database_url: URL) -> AsyncIterator[tuple[Litestar, str]]:
    """The app served by uvicorn in this test's own event loop, on a loopback port: real HTTP,
    and the app's pool in reach."""
    app = create_app(install_service_database_url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        assert not serving.done(), serving
        await asyncio.sleep(0.05)
    yield app, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await serving


class TestFeedApi:
    @pytest.fixture
    def client(self, install_service_client: Client) -> Client:
        return install_service_client

    async def test_members_read_their_org_admins_read_all(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        await publish_template(engine, small_doc())
        owner, _, owner_token = await make_user(engine)
        member, _, member_token = await make_user(engine)
        _, _, stranger_token = await make_user(engine)
        org = await make_org(engine, owner=owner, slug="acme")
        await add_membership(engine, org, member)
        async with transaction(engine) as session:
            await ensure_admin(session, "feed-admin")
        await install_template(engine, owner, "starter", "acme")
        await settled(engine)

        page = (
            await client.get("/api/v1/organizations/acme/events", headers=bearer(member_token))
        ).json()
        assert [e["type"] for e in page["items"]] == ["install.created"]
        assert page["items"][0]["organization"] == {"id": str(org.id), "slug": "acme"}
        again = await client.get(
            "/api/v1/organizations/acme/events",
            params={"cursor": page["next_cursor"]},
            headers=bearer(member_token),
        )
        assert again.json()["items"] == []
        assert again.json()["next_cursor"] == page["next_cursor"]

        for token, status in ((stranger_token, 404), (None, 401)):
            headers = bearer(token) if token else {}
            response = await client.get("/api/v1/organizations/acme/events", headers=headers)
            assert response.status_code == status
        assert (
            await client.get("/api/v1/admin/events", headers=bearer(owner_token))
        ).status_code == 403

        admin = bearer("feed-admin")
        everything = (await client.get("/api/v1/admin/events", headers=admin)).json()
        assert [e["type"] for e in everything["items"]] == ["template.published", "install.created"]
        only = await client.get(
            "/api/v1/admin/events",
            params={"type": "install.created", "organization": "acme"},
            headers=admin,
        )
        assert [e["type"] for e in only.json()["items"]] == ["install.created"]
        limited = (
            await client.get("/api/v1/admin/events", params={"limit": 1}, headers=admin)
        ).json()
        rest = (
            await client.get(
                "/api/v1/admin/events", params={"cursor": limited["next_cursor"]}, headers=admin
            )
        ).json()
        assert [e["id"] for e in limited["items"] + rest["items"]] == [
            e["id"] for e in everything["items"]
        ]

        for params, status in (
            ({"wait": "31"}, 400),
            ({"wait": "-1"}, 400),
            ({"wait": "soon"}, 400),
            ({"limit": "201"}, 400),
            ({"cursor": "nonsense"}, 400),
            ({"type": "install.exploded"}, 400),
            ({"organization": "nowhere"}, 404),
        ):
            response = await client.get("/api/v1/admin/events", params=params, headers=admin)
            assert response.status_code == status, (params, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")

    async def test_a_long_poll_returns_when_an_event_commits_holding_no_pooled_connection(
        self, engine: AsyncEngine, live: tuple[Litestar, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        app, base = live
        # Only the commit's notification can answer before the deadline: no idle re-read.
        monkeypatch.setattr(feed, "IDLE_RECHECK_SECONDS", 60.0)
        await publish_template(engine, small_doc())
        owner, _, token = await make_user(engine)
        await make_org(engine, owner=owner, slug="acme")
        url = f"{base}/api/v1/organizations/acme/events"
        async with httpx.AsyncClient(headers=bearer(token), timeout=30) as http:
            start = (await http.get(url)).json()
            pool = app.state.engine.pool
            waiting = asyncio.create_task(
                http.get(url, params={"cursor": start["next_cursor"], "wait": "20"})
            )
            await asyncio.sleep(1.0)
            assert not waiting.done()
            assert pool.checkedout() == 0  # waiting, with every pooled connection back
            committed = time.monotonic()
            await install_template(engine, owner, "starter", "acme")
            response = await waiting
        answered = time.monotonic()
        assert [e["type"] for e in response.json()["items"]] == ["install.created"]
        # Woken by the commit, not by the 20-second deadline (with room for a busy machine).
        assert answered - committed < 10, answered - committed

    async def test_a_long_poll_with_nothing_to_say_returns_after_wait(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        owner, _, token = await make_user(engine)
        await make_org(engine, owner=owner, slug="quiet")
        started = time.monotonic()
        response = await client.get(
            "/api/v1/organizations/quiet/events", params={"wait": "1.5"}, headers=bearer(token)
        )
        assert response.json()["items"] == []
        assert response.json()["next_cursor"]
        assert 1.4 < time.monotonic() - started < 5


async def _lose_access(engine: AsyncEngine, how: str, user: Actor, token: str) -> None:
    """Take the user's access away the way an admin or the user would."""
    async with transaction(engine) as session:
        if how == "removed":
            await remove_member(session, SYSTEM, "acme", str(user.user_id))
        elif how == "revoked":
            await session.execute(
                text("UPDATE api_tokens SET revoked_at = now() WHERE token_hash = :h"),
                {"h": hash_token(token)},
            )
        elif how == "deactivated":
            await set_deactivated(session, SYSTEM, str(user.user_id), deactivated=True)
        else:
            await session.execute(
                text("UPDATE users SET is_platform_admin = false WHERE id = :u"),
                {"u": user.user_id},
            )


class TestLongPollLosingAccess:
    """A long poll is a request that lasts: the caller's access is checked again whenever it
    wakes, and one who lost it while waiting gets what their next request would get, not the
    events that woke them."""

    @pytest.mark.parametrize(
        ("feed_path", "admin", "lose", "status", "code"),
        [
            ("/api/v1/organizations/acme/events", False, "removed", 404, "org_not_found"),
            ("/api/v1/organizations/acme/events", False, "revoked", 401, "invalid_token"),
            ("/api/v1/admin/events", True, "deactivated", 401, "invalid_token"),
            ("/api/v1/admin/events", True, "revoked", 401, "invalid_token"),
            ("/api/v1/admin/events", True, "demoted", 403, "admin_required"),
        ],
    )
    async def test_the_poll_ends_as_the_next_request_would(
        self,
        engine: AsyncEngine,
        live: tuple[Litestar, str],
        feed_path: str,
        admin: bool,
        lose: str,
        status: int,
        code: str,
    ) -> None:
        _, base = live
        await publish_template(engine, small_doc())
        owner, _, _ = await make_user(engine)
        org = await make_org(engine, owner=owner, slug="acme")
        poller, _, token = await make_user(engine, admin=admin)
        if not admin:
            await add_membership(engine, org, poller)
        else:
            await make_user(engine, admin=True)  # so the poller is not the last admin
        await install_template(engine, owner, "starter", "acme")
        await publish_template(engine, v2())
        url = f"{base}{feed_path}"
        async with httpx.AsyncClient(headers=bearer(token), timeout=30) as http:
            # The feed's end: every event there is read. A reader is given events only below
            # the oldest transaction of this database still running, so one first read may
            # stop short, and the poll below would then be answered at once with the rest.
            there = await scalar(
                engine,
                "SELECT count(*) FROM events WHERE :every OR organization_id = :o",
                every=admin,
                o=org.id,
            )
            head, seen = None, 0
            while seen < there:
                page = (await http.get(url, params={"cursor": head} if head else {})).json()
                seen, head = seen + len(page["items"]), page["next_cursor"]
                if not page["items"]:
                    await asyncio.sleep(0.05)
            waiting = asyncio.create_task(http.get(url, params={"cursor": head, "wait": "12"}))
            await asyncio.sleep(1.0)
            assert not waiting.done()
            await _lose_access(engine, lose, poller, token)
            woke = time.monotonic()
            await install_template(engine, owner, "starter", "acme")  # wakes the poll
            response = await waiting
            answered = time.monotonic()
            assert response.status_code == status, response.text
            assert response.json()["code"] == code
            assert "items" not in response.json()
            assert answered - woke < 5, answered - woke  # on the wake-up, not at the deadline
            following = await http.get(url, params={"cursor": head})
            assert (following.status_code, following.json()["code"]) == (status, code)
        # The event that woke the poll is there: it was withheld, not missing.
        assert [e.type for e in await events(engine, org.id)][-1] == "install.upgraded"

    async def test_a_poll_that_times_out_checks_too(
        self, engine: AsyncEngine, live: tuple[Litestar, str]
    ) -> None:
        """Nothing wakes it; the deadline's last read still refuses a removed member."""
        _, base = live
        owner, _, _ = await make_user(engine)
        org = await make_org(engine, owner=owner, slug="acme")
        member, _, token = await make_user(engine)
        await add_membership(engine, org, member)
        url = f"{base}/api/v1/organizations/acme/events"
        async with httpx.AsyncClient(headers=bearer(token), timeout=30) as http:
            waiting = asyncio.create_task(http.get(url, params={"wait": "6"}))
            await asyncio.sleep(0.5)
            await _lose_access(engine, "removed", member, token)
            response = await waiting
        assert response.status_code == 404


def test_a_listener_discarded_with_its_loop_lets_go_without_awaiting(url: URL) -> None:
    """A listener still running when its event loop closes (an app that never stopped, a
    reader of the feed waiting on it) is discarded by the garbage collector, perhaps while
    another loop runs. It must let its connection go without awaiting or waking the reader,
    neither of which can happen there ("coroutine ignored GeneratorExit", "Event loop is
    closed", reported as unraisable, or a close never awaited)."""

    async def collect() -> None:
        gc.collect()

    found: list[Any] = []
    hook = sys.unraisablehook
    sys.unraisablehook = found.append
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            loop = asyncio.new_event_loop()
            listener = Listener(asyncpg_dsn(url))
            loop.run_until_complete(listener.start())
            loop.run_until_complete(asyncio.wait_for(listener.connected.wait(), 10))

            async def read(of: Listener) -> None:  # a long poll of the feed, waiting
                with of.subscribe(None) as woken:
                    await woken.wait()

            reader = loop.create_task(read(listener))
            loop.run_until_complete(asyncio.sleep(0.05))
            loop.close()
            del listener, loop, reader
            asyncio.run(collect())
    finally:
        sys.unraisablehook = hook
    assert [repr(u.exc_value) for u in found] == []
    assert [str(w.message) for w in warned if "never awaited" in str(w.message)] == []
