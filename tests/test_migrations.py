"""Migrations: round trip on a populated database, and models equal to migrations."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError

from install_service.config import WebhookSettings
from install_service.db import migrate
from install_service.db.engine import create_engine
from install_service.db.models import Base
from install_service.db.session import transaction
from install_service.events import outbox, webhooks
from install_service.events.schemas import WebhookCreate
from install_service.installs import invariants
from install_service.installs import service as installs
from install_service.orgs.service import Actor
from install_service.testing import make_org, make_user, publish_template
from tests.conftest import TABLES, emit_event, small_doc


async def _populate(url: URL) -> None:
    engine = create_engine(url)
    try:
        await publish_template(engine, small_doc())
        actor, _, _ = await make_user(engine)
        async with transaction(engine) as session:
            await installs.install(session, actor, template="starter")
    finally:
        await engine.dispose()


async def _tables(url: URL) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            )
            return set(result.scalars())
    finally:
        await engine.dispose()


def test_round_trip_on_populated_database(install_service_database_url: URL) -> None:
    url = install_service_database_url
    asyncio.run(_populate(url))
    migrate.downgrade(url, "base")
    assert asyncio.run(_tables(url)) <= {"alembic_version"}
    migrate.upgrade(url)
    assert set(TABLES) <= asyncio.run(_tables(url))
    asyncio.run(_populate(url))
    migrate.check(url)


async def _release_items(url: URL) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Every release item (kind, slug, hash) and every invariant violation."""
    engine = create_engine(url)
    try:
        async with transaction(engine) as session:
            rows = await session.execute(
                text("SELECT kind, slug, content_hash FROM template_release_items ORDER BY 1, 2")
            )
            items = [tuple(row) for row in rows]
            found = [v.detail for v in await invariants.check(session)]
        return items, found
    finally:
        await engine.dispose()


def test_release_items_are_backfilled_from_snapshots(install_service_database_url: URL) -> None:
    url = install_service_database_url
    asyncio.run(_populate(url))
    written, _ = asyncio.run(_release_items(url))
    assert len(written) == 7  # small_doc: 2 entity types, 3 relationship types, 1 + 1
    migrate.downgrade(url, "0002")
    migrate.upgrade(url)
    assert asyncio.run(_release_items(url)) == (written, [])


def test_models_match_migrations(install_service_database_url: URL) -> None:
    migrate.check(install_service_database_url)


# A generated column's expression as PostgreSQL stores it (normalized: casts, parentheses).
_GENERATED = """
    SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
    JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
    WHERE d.adrelid = CAST(:table AS regclass) AND a.attname = :column AND a.attgenerated = 's'
"""


async def _generated_expressions(url: URL) -> list[tuple[str, str, str | None, str | None]]:
    """For each generated column of the models: the migrated column's expression, and that of
    the same column made from the model's expression on a copy of its table."""
    engine = create_engine(url)
    found = []
    try:
        async with engine.begin() as conn:  # its copies are dropped when it ends
            for table in Base.metadata.sorted_tables:
                for column in table.columns:
                    if column.computed is None:
                        continue
                    where = {"table": table.name, "column": column.name}
                    migrated = await conn.scalar(text(_GENERATED), where)
                    model = column.computed.sqltext.compile(
                        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
                    )
                    kind = column.type.compile(dialect=postgresql.dialect())
                    copy = f"copy_{len(found)}"
                    await conn.execute(
                        text(f"CREATE TEMP TABLE {copy} (LIKE {table.name}) ON COMMIT DROP")
                    )
                    await conn.execute(
                        text(
                            f"ALTER TABLE {copy} DROP COLUMN {column.name}, ADD COLUMN "
                            f"{column.name} {kind} GENERATED ALWAYS AS ({model}) STORED"
                        )
                    )
                    made = await conn.scalar(text(_GENERATED), {**where, "table": copy})
                    found.append((table.name, column.name, migrated, made))
    finally:
        await engine.dispose()
    return found


def test_generated_columns_match_migrations(install_service_database_url: URL) -> None:
    """Alembic compares columns, not a generated column's expression: the expression is
    written in the models and again in its migration (which may not import them), and
    PostgreSQL checks here that the two read the same."""
    found = asyncio.run(_generated_expressions(install_service_database_url))
    assert {table for table, *_ in found} >= {
        "entity_types",
        "entity_relationship_types",
        "event_classifiers",
        "watchers",
    }
    for table, column, migrated, made in found:
        assert migrated is not None, f"{table}.{column} is not generated in the database"
        assert made == migrated, f"{table}.{column}: the model's expression is not the migration's"


async def _sql(url: URL, *statements: str) -> list[Any]:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            results = [await conn.execute(text(s)) for s in statements]
            return [r.all() if r.returns_rows else None for r in results]
    finally:
        await engine.dispose()


# Before 0004: personal orgs were made freely. Ada has hers (named after her) and an older
# one; Bob co-owns Ada's and has his own; Cy has none; Dee's only one is not named after her;
# an admin made `lonely` personal with no one in it.
_ADA, _BOB, _CY, _DEE = (uuid.UUID(hex=c * 32) for c in "abcd")
_MESSY_ORGS = f"""
INSERT INTO users (id, email) VALUES ('{_ADA}', 'ada@x.io'), ('{_BOB}', 'bob@x.io'),
    ('{_CY}', 'cy@x.io'), ('{_DEE}', 'dee@x.io');
INSERT INTO organizations (slug, name, kind, created_at) VALUES
    ('ada-old', 'Ada old', 'personal', now() - interval '2 days'),
    ('user-{_ADA.hex[:12]}', 'Ada', 'personal', now() - interval '1 day'),
    ('user-{_BOB.hex[:12]}', 'Bob', 'personal', now()),
    ('dee-home', 'Dee', 'personal', now()),
    ('lonely', 'Lonely', 'personal', now()),
    ('team', 'Team', 'team', now());
INSERT INTO memberships (organization_id, user_id, role)
SELECT o.id, u.id, 'owner' FROM organizations o JOIN users u ON
    (o.slug IN ('ada-old', 'user-{_ADA.hex[:12]}') AND u.email = 'ada@x.io')
 OR (o.slug IN ('user-{_ADA.hex[:12]}', 'user-{_BOB.hex[:12]}') AND u.email = 'bob@x.io')
 OR (o.slug = 'dee-home' AND u.email = 'dee@x.io')
"""


def test_personal_orgs_are_made_one_per_user_deleting_nothing(
    install_service_database_url: URL,
) -> None:
    url = install_service_database_url
    migrate.downgrade(url, "0003")
    asyncio.run(_sql(url, *_MESSY_ORGS.strip().split(";\n")))
    migrate.upgrade(url)

    def state() -> dict[str, tuple[str, str | None]]:
        [found] = asyncio.run(
            _sql(
                url,
                """SELECT o.slug, o.kind, u.email FROM organizations o
                   LEFT JOIN users u ON u.id = o.personal_owner_id""",
            )
        )
        return {slug: (kind, email) for slug, kind, email in found}

    after = state()
    assert {slug: v for slug, v in after.items() if not slug.startswith("user-")} == {
        "ada-old": ("team", None),
        "dee-home": ("personal", "dee@x.io"),
        "lonely": ("team", None),
        "team": ("team", None),
    }
    assert after[f"user-{_ADA.hex[:12]}"] == ("personal", "ada@x.io")
    assert after[f"user-{_BOB.hex[:12]}"] == ("personal", "bob@x.io")
    [cy] = [slug for slug, (_, email) in after.items() if email == "cy@x.io"]
    assert cy == f"user-{_CY.hex}"
    [[(owner_role,)]] = asyncio.run(
        _sql(
            url,
            f"""SELECT m.role FROM memberships m JOIN organizations o
                ON o.id = m.organization_id WHERE o.slug = '{cy}'""",
        )
    )
    assert owner_role == "owner"
    assert asyncio.run(_violations(url)) == []

    migrate.downgrade(url, "0003")
    migrate.upgrade(url)
    assert state() == after
    assert asyncio.run(_violations(url)) == []


async def _violations(url: URL) -> list[str]:
    engine = create_engine(url)
    try:
        async with transaction(engine) as session:
            return [f"{v.check}: {v.detail}" for v in await invariants.check(session)]
    finally:
        await engine.dispose()


async def _staged_world(url: URL) -> dict[str, Any]:
    """At head: starter installed in three orgs, v2 published; returns ids for raw SQL."""
    engine = create_engine(url)
    try:
        await publish_template(engine, small_doc())
        ids: dict[str, Any] = {"installs": [], "orgs": []}
        for _ in range(3):
            actor, user, _ = await make_user(engine)
            async with transaction(engine) as session:
                result = await installs.install(session, actor, template="starter")
            ids["installs"].append(result.id)
            ids["orgs"].append(user.personal_organization.id)
        changed = small_doc()
        changed["entity_types"][0]["name"] = "Human"
        await publish_template(engine, changed)
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text("""SELECT template_agent_id, id FROM template_releases
                            WHERE version = 2""")
                )
            ).one()
        ids["agent"], ids["release"] = row
        return ids
    finally:
        await engine.dispose()


def test_staged_resync_keeps_existing_runs_and_maps_new_states_back(
    install_service_database_url: URL,
) -> None:
    url = install_service_database_url
    world = asyncio.run(_staged_world(url))
    migrate.downgrade(url, "0008")
    installs_, orgs = world["installs"], world["orgs"]
    # Runs as the older code left them: one finished with a conflict, one still running.
    asyncio.run(
        _sql(
            url,
            f"""INSERT INTO resync_runs (id, template_agent_id, release_id, status)
                VALUES ('{_ADA}', '{world["agent"]}', '{world["release"]}', 'partial'),
                       ('{_BOB}', '{world["agent"]}', '{world["release"]}', 'running')""",
            f"""INSERT INTO resync_items (run_id, install_id, organization_id, status)
                VALUES ('{_ADA}', '{installs_[0]}', '{orgs[0]}', 'succeeded'),
                       ('{_ADA}', '{installs_[1]}', '{orgs[1]}', 'conflict'),
                       ('{_BOB}', '{installs_[2]}', '{orgs[2]}', 'pending')""",
        )
    )
    migrate.upgrade(url)
    [runs, waves] = asyncio.run(
        _sql(
            url,
            """SELECT id, status, wave_count, current_wave, selection::text FROM resync_runs
               ORDER BY status""",
            "SELECT DISTINCT wave FROM resync_items",
        )
    )
    assert [tuple(r) for r in runs] == [
        (_ADA, "partial", 1, 1, "{}"),
        (_BOB, "running", 1, 1, "{}"),
    ]
    assert [tuple(w) for w in waves] == [(1,)]
    migrate.check(url)

    # What the older schema cannot say: a halted run, skipped and cancelled items, pins.
    asyncio.run(
        _sql(
            url,
            f"UPDATE resync_runs SET status = 'halted', halt_reason = 'wave 1' WHERE id = '{_BOB}'",
            f"""UPDATE resync_items SET status = 'skipped', reason = 'pinned'
                WHERE install_id = '{installs_[0]}'""",
            f"UPDATE agents SET pinned_at = now() WHERE id = '{installs_[1]}'",
        )
    )
    migrate.downgrade(url, "0008")
    [items] = asyncio.run(
        _sql(url, "SELECT install_id, status, error FROM resync_items ORDER BY status, error")
    )
    assert {(i, s) for i, s, _ in items} == {
        (installs_[0], "failed"),
        (installs_[1], "conflict"),
        (installs_[2], "failed"),
    }
    errors = {i: e for i, _, e in items}
    assert errors[installs_[0]] == "skipped: pinned"
    assert errors[installs_[2]] == "not run: the run was halted when the database was migrated down"
    [[(halted,)]] = asyncio.run(_sql(url, f"SELECT status FROM resync_runs WHERE id = '{_BOB}'"))
    assert halted == "failed"
    migrate.upgrade(url)
    migrate.check(url)
    assert asyncio.run(_violations(url)) == []


def test_detached_markers_carry_over_both_ways(install_service_database_url: URL) -> None:
    """0010 turns each row's one detached-from template into a list and back (the last)."""
    url = install_service_database_url
    world = asyncio.run(_staged_world(url))
    agent = world["agent"]
    other = uuid.uuid4()
    migrate.downgrade(url, "0009")
    asyncio.run(
        _sql(
            url,
            f"""UPDATE entity_types SET managed_by_template_agent_id = NULL,
                    mirrored_release_id = NULL, mirrored_hash = NULL,
                    detached_from_template_agent_id = '{agent}'
                WHERE organization_id = '{world["orgs"][0]}' AND slug = 'person'""",
        )
    )
    migrate.upgrade(url)
    [marked] = asyncio.run(
        _sql(
            url,
            """SELECT organization_id, detached_from_template_agent_ids FROM entity_types
               WHERE cardinality(detached_from_template_agent_ids) > 0""",
        )
    )
    assert [tuple(r) for r in marked] == [(world["orgs"][0], [agent])]
    assert asyncio.run(_release_items(url))[1] == []  # still detached, not missing
    asyncio.run(
        _sql(
            url,
            f"""INSERT INTO agents (id, organization_id, slug, name)
                SELECT '{other}', organization_id, 'other', 'Other' FROM agents
                WHERE id = '{agent}'""",
            f"""UPDATE entity_types
                SET detached_from_template_agent_ids = ARRAY['{agent}', '{other}']::uuid[]
                WHERE organization_id = '{world["orgs"][0]}' AND slug = 'person'""",
        )
    )
    migrate.downgrade(url, "0009")
    [marked] = asyncio.run(
        _sql(
            url,
            """SELECT detached_from_template_agent_id FROM entity_types
               WHERE detached_from_template_agent_id IS NOT NULL""",
        )
    )
    assert [tuple(r) for r in marked] == [(other,)]
    migrate.upgrade(url)
    migrate.check(url)


async def _schema_edit(url: URL) -> None:
    """At head: starter installed in a user's personal org, and the event of the org's own
    edit of its watcher."""
    engine = create_engine(url)
    try:
        await publish_template(engine, small_doc())
        actor, user, _ = await make_user(engine)
        async with transaction(engine) as session:
            await installs.install(session, actor, template="starter")
            await outbox.emit(
                session,
                organization_id=user.personal_organization.id,
                type="schema.item_updated",
                template=None,
                from_release=None,
                to_release=None,
                items=[outbox.Item(kind="watchers", slug="inbox", action="updated")],
                extra={"provenance": {"type": "own"}},
            )
    finally:
        await engine.dispose()


async def _pending_lanes(url: URL) -> set[str]:
    """At head: an endpoint, and a pending delivery in each of two organizations' lanes."""
    engine = create_engine(url)
    try:
        async with transaction(engine) as session:
            endpoint = await webhooks.create_endpoint(
                session,
                Actor.system(),
                WebhookCreate(url="https://93.184.216.34/hooks"),
                WebhookSettings(),
            )
        lanes = set()
        for _ in range(2):
            org = await make_org(engine)
            async with transaction(engine) as session:
                await _event(session, org.id)
            lanes.add(f"webhooks:{endpoint.id}:{org.id}")
        return lanes
    finally:
        await engine.dispose()


def test_schema_events_survive_a_round_trip(install_service_database_url: URL) -> None:
    """0011 admits an organization's own schema events; going back keeps them."""
    url = install_service_database_url
    asyncio.run(_schema_edit(url))
    [before] = asyncio.run(_sql(url, "SELECT id, type, data FROM events ORDER BY seq"))
    assert [e.type for e in before][-1] == "schema.item_updated"
    migrate.downgrade(url, "0010")
    # The older schema keeps the events and refuses new ones of these types.
    [kept, refused] = asyncio.run(
        _sql(
            url,
            "SELECT id, type, data FROM events ORDER BY seq",
            """SELECT count(*) FROM pg_constraint
               WHERE conname = 'ck_events_type' AND NOT convalidated""",
        )
    )
    assert kept == before
    assert refused == [(1,)]
    with pytest.raises(IntegrityError):
        asyncio.run(
            _sql(
                url,
                """INSERT INTO events (type, organization_id)
                   SELECT 'schema.item_created', organization_id FROM events LIMIT 1""",
            )
        )
    migrate.upgrade(url)
    migrate.check(url)
    [again, validated] = asyncio.run(
        _sql(
            url,
            "SELECT id, type, data FROM events ORDER BY seq",
            "SELECT convalidated FROM pg_constraint WHERE conname = 'ck_events_type'",
        )
    )
    assert again == before
    assert validated == [(True,)]
    asyncio.run(_schema_edit(url))
    assert asyncio.run(_violations(url)) == []


async def _event(session: Any, organization_id: uuid.UUID) -> None:
    await emit_event(session, organization_id)


_LANE_JOBS = """SELECT queueing_lock FROM procrastinate_jobs
                WHERE task_name = 'webhooks:deliver' AND status = 'todo'"""


def test_webhook_lanes_leave_the_job_queue_and_come_back(
    install_service_database_url: URL,
) -> None:
    url = install_service_database_url
    lanes = asyncio.run(_pending_lanes(url))
    [[(deliveries,)]] = asyncio.run(_sql(url, "SELECT count(*) FROM webhook_deliveries"))
    assert asyncio.run(_sql(url, _LANE_JOBS)) == [[]]  # the dispatchers' now, not the queue's

    migrate.downgrade(url, "0011")
    [queued] = asyncio.run(_sql(url, _LANE_JOBS))
    assert {lock for (lock,) in queued} == lanes  # the older workers carry on...
    asyncio.run(_event_in_new_org(url))
    [queued] = asyncio.run(_sql(url, _LANE_JOBS))
    assert len(queued) == len(lanes) + 1  # ... and the older trigger queues new lanes
    migrate.upgrade(url)
    asyncio.run(_event_in_new_org(url))
    assert asyncio.run(_sql(url, _LANE_JOBS, "SELECT count(*) FROM webhook_deliveries")) == [
        [],
        [(deliveries + 2,)],
    ]
    migrate.check(url)


async def _event_in_new_org(url: URL) -> None:
    engine = create_engine(url)
    try:
        org = await make_org(engine)
        async with transaction(engine) as session:
            await _event(session, org.id)
    finally:
        await engine.dispose()
