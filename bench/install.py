"""Install cost: the engine beside a set-based floor and a row-by-row baseline, in one run.

    uv run python -m bench.install [--installs 30] [--latency-ms 0,0.5,1] [--factors 1,10]

For personal-finance and for the same template ten times larger (`--factors`), each into fresh orgs,
interleaved install by install after a warm-up: median and p99 ms, installs/s and round trips
(statements, BEGIN and COMMIT) per install for

- engine: as the API installs, `installs.noop` (a no-op, answered by one statement outside any
  transaction), else `installs.install` (authorize, plan, apply, verify, history; commit
  included);
- floor: the same rows, provenance, history event, change-feed event and audit row included,
  written by one hand-written statement on a direct connection with the engine's connection
  settings (no plan, no locks, no conflict checks, no verification); the run checks that its
  rows equal the engine's;
- row-by-row: a select-then-insert per template row, as a naive implementation would.

Then the no-op re-install of engine and floor (and whether each took a transaction id),
beside a floor no-op that checks in one statement every fact the engine's no-op rests on, an
upgrade where one watcher changed, and upgrades where 0, 10, 50 and 100% of the entity types
were edited locally while the release renames all of them (every edited row is merged). With
`--latency-ms`, each round trip also waits that long, as a network would. Prints tables and
writes bench/results/install.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from bench import bench_database, personal_finance, write_results
from install_service.actor import Actor
from install_service.db.engine import (
    asyncpg_dsn,
    connect_args,
    create_engine,
)
from install_service.db.session import transaction
from install_service.engine import KINDS
from install_service.installs import repair
from install_service.installs import service as installs
from install_service.orgs.service import create_organization
from install_service.releases import get_release
from install_service.templates.documents import parse
from install_service.templates.schemas import TemplateDocument
from install_service.templates.service import publish
from install_service.testing import install_template, scaled_template

WARM_UP = 8
SYSTEM = Actor.system()
FLOOR_CONNECT_ARGS = connect_args()

# The floor: the same rows, provenance included, with the history event, the change-feed
# event and the audit row the engine writes, by ONE statement in an implicit transaction. Ids
# are generated up front so every reference (inverse, rules, classifier targets, current
# versions) resolves inside the statement; foreign keys are checked at its end. The install
# row makes it idempotent: a second run inserts nothing. No plan, no locks, no conflict
# checks, no verification. (Watchers' `next_run_at` stays unset: a trigger clears it on
# insert, so only a second statement could set it, as the engine's does.)
_FLOOR = """
WITH install AS (
    INSERT INTO agents (organization_id, slug, name, description, template_agent_id,
                        installed_release_id, last_synced_at)
    SELECT $1, t.slug, t.name, t.description, t.id, $2, now() FROM agents t WHERE t.id = $3
    ON CONFLICT (template_agent_id, organization_id) DO NOTHING
    RETURNING id),
items AS MATERIALIZED (
    SELECT i.kind, i.slug, i.item, i.content_hash, gen_random_uuid() AS id,
           gen_random_uuid() AS version_id
    FROM template_release_items i
    WHERE i.release_id = $2 AND EXISTS (SELECT FROM install)),
entity_types_written AS (
    INSERT INTO entity_types (id, organization_id, slug, name, description, icon, color,
        metadata_schema, event_kinds, {provenance})
    SELECT i.id, $1, i.slug, i.item->>'name', i.item->>'description', i.item->>'icon',
           i.item->>'color', i.item->'metadata_schema', i.item->'event_kinds',
           {provenance_values_entity_types}
    FROM items i WHERE i.kind = 'entity_types'),
watchers_written AS (
    INSERT INTO watchers (id, organization_id, slug, name, description, schedule, agent_id,
        current_version_id, {provenance})
    SELECT i.id, $1, i.slug, i.item->>'name', i.item->>'description', i.item->>'schedule',
           (SELECT id FROM install), i.version_id, {provenance_values_watchers}
    FROM items i WHERE i.kind = 'watchers'),
watcher_versions_written AS (
    INSERT INTO watcher_versions (id, organization_id, watcher_id, version, name, prompt,
        extraction_schema, sources_schema, reactions_guidance)
    SELECT i.version_id, $1, i.id, 1, i.item->>'name', i.item->>'prompt',
           i.item->'extraction_schema', i.item->'sources_schema', i.item->>'reactions_guidance'
    FROM items i WHERE i.kind = 'watchers'),
relationship_types_written AS (
    INSERT INTO entity_relationship_types (id, organization_id, slug, name, description,
        metadata_schema, is_symmetric, inverse_type_id, {provenance})
    SELECT i.id, $1, i.slug, i.item->>'name', i.item->>'description', i.item->'metadata_schema',
           (i.item->>'is_symmetric')::boolean, inverse.id,
           {provenance_values_entity_relationship_types}
    FROM items i
    LEFT JOIN items inverse ON inverse.kind = 'relationship_types'
                           AND inverse.slug = i.item->>'inverse'
    WHERE i.kind = 'relationship_types'),
rules_written AS (
    INSERT INTO entity_relationship_type_rules (organization_id, relationship_type_id,
        source_entity_type_id, target_entity_type_id)
    SELECT $1, i.id, source.id, target.id
    FROM items i
    CROSS JOIN LATERAL jsonb_array_elements(i.item->'rules') AS rule(r)
    JOIN items source ON source.kind = 'entity_types' AND source.slug = rule.r->>'source'
    JOIN items target ON target.kind = 'entity_types' AND target.slug = rule.r->>'target'
    WHERE i.kind = 'relationship_types'),
classifiers_written AS (
    INSERT INTO event_classifiers (id, organization_id, slug, name, description, attribute_key,
        entity_type_id, watcher_id, current_version_id, {provenance})
    SELECT i.id, $1, i.slug, i.item->>'name', i.item->>'description', i.item->>'attribute_key',
           entity_type.id, watcher.id, i.version_id, {provenance_values_event_classifiers}
    FROM items i
    LEFT JOIN items entity_type ON entity_type.kind = 'entity_types'
                               AND entity_type.slug = i.item->>'entity_type'
    LEFT JOIN items watcher ON watcher.kind = 'watchers' AND watcher.slug = i.item->>'watcher'
    WHERE i.kind = 'classifiers'),
classifier_versions_written AS (
    INSERT INTO event_classifier_versions (id, organization_id, classifier_id, version,
        attribute_values, fallback_value, extraction_config)
    SELECT i.version_id, $1, i.id, 1, i.item->'attribute_values', i.item->>'fallback_value',
           i.item->'extraction_config'
    FROM items i WHERE i.kind = 'classifiers'),
changes AS (
    SELECT jsonb_object_agg(k.kind, jsonb_build_object(
               'created', coalesce(c.n, 0), 'updated', 0, 'unchanged', 0, 'archived', 0,
               'adopted', 0, 'detached', 0)) AS counts
    FROM unnest(ARRAY['entity_types', 'relationship_types', 'classifiers', 'watchers']) k(kind)
    LEFT JOIN (SELECT kind, count(*) AS n FROM items GROUP BY kind) c ON c.kind = k.kind),
history_written AS (
    INSERT INTO install_events (organization_id, install_id, action, to_release_id, changes)
    SELECT $1, install.id, 'install', $2, changes.counts FROM install, changes),
event_written AS (
    INSERT INTO events (type, organization_id, install_id, data)
    SELECT 'install.created', $1, install.id, jsonb_build_object(
               'template', CAST($5 AS text), 'from_release', NULL,
               'to_release', jsonb_build_object('id', $2, 'version', CAST($6 AS int)),
               'items', (SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                                  'kind', i.kind, 'slug', i.slug, 'action', 'created',
                                  'version_id', CASE WHEN i.kind IN ('watchers', 'classifiers')
                                                     THEN i.version_id END,
                                  'version', CASE WHEN i.kind IN ('watchers', 'classifiers')
                                                  THEN 1 END)) ORDER BY i.kind, i.slug)
                         FROM items i))
    FROM install)
INSERT INTO audit_log (action, target_type, target_id, organization_id, details)
SELECT 'install.created', 'install', CAST(install.id AS text), $1, jsonb_build_object(
           'from_release', NULL, 'to_release', CAST($2 AS text), 'changes', changes.counts)
FROM install, changes
"""

# The fair no-op floor: the same facts the engine's no-op rests on, checked by ONE read-only
# statement: the org by slug, the template's latest visible release by slug, the install at
# that release and active, and every item of the release mirrored by an active row the
# template manages whose mirrored hash is the item's (and no managed active row beyond them).
FLOOR_NOOP_SQL = """
SELECT a.status = 'active' AND a.installed_release_id = r.id AND NOT EXISTS (
           SELECT 1 FROM template_release_items i
           WHERE i.release_id = r.id AND NOT EXISTS (
               SELECT 1 FROM (
                   SELECT mirrored_hash, status, managed_by_template_agent_id FROM entity_types
                   WHERE i.kind = 'entity_types' AND organization_id = o.id AND slug = i.slug
                   UNION ALL
                   SELECT mirrored_hash, status, managed_by_template_agent_id
                   FROM entity_relationship_types
                   WHERE i.kind = 'relationship_types' AND organization_id = o.id
                     AND slug = i.slug
                   UNION ALL
                   SELECT mirrored_hash, status, managed_by_template_agent_id
                   FROM event_classifiers
                   WHERE i.kind = 'classifiers' AND organization_id = o.id AND slug = i.slug
                   UNION ALL
                   SELECT mirrored_hash, status, managed_by_template_agent_id FROM watchers
                   WHERE i.kind = 'watchers' AND organization_id = o.id AND slug = i.slug) x
               WHERE x.status = 'active' AND x.managed_by_template_agent_id = t.id
                 AND x.mirrored_hash = i.content_hash))
       AND (SELECT count(*) FROM template_release_items i WHERE i.release_id = r.id) = (
           SELECT count(*) FROM (
               SELECT 1 FROM entity_types WHERE organization_id = o.id
                 AND managed_by_template_agent_id = t.id AND status = 'active'
               UNION ALL
               SELECT 1 FROM entity_relationship_types WHERE organization_id = o.id
                 AND managed_by_template_agent_id = t.id AND status = 'active'
               UNION ALL
               SELECT 1 FROM event_classifiers WHERE organization_id = o.id
                 AND managed_by_template_agent_id = t.id AND status = 'active'
               UNION ALL
               SELECT 1 FROM watchers WHERE organization_id = o.id
                 AND managed_by_template_agent_id = t.id AND status = 'active') managed)
       AS unchanged
FROM organizations o
JOIN organizations tor ON tor.slug = $2
JOIN agents t ON t.organization_id = tor.id AND t.is_template
JOIN LATERAL (SELECT x.id FROM template_releases x WHERE x.template_agent_id = t.id
              ORDER BY x.version DESC LIMIT 1) r ON true
JOIN agents a ON a.template_agent_id = t.id AND a.organization_id = o.id
WHERE o.slug = $1
"""
_PROVENANCE = (
    "managed_by_template_agent_id, source_template_org_id, source_row_id, "
    "mirrored_release_id, mirrored_at, mirrored_hash"
)


def _provenance_values(table: str) -> str:
    return (
        f"$3, $4, (SELECT s.id FROM {table} s "  # noqa: S608 (fixed table names)
        "WHERE s.organization_id = $4 AND s.slug = i.slug), $2, now(), i.content_hash"
    )


FLOOR_SQL = _FLOOR.format(
    provenance=_PROVENANCE,
    **{
        f"provenance_values_{table}": _provenance_values(table)
        for table in ("entity_types", "watchers", "entity_relationship_types", "event_classifiers")
    },
)


def floor_args(org_id: uuid.UUID, release: Mapping[str, Any]) -> tuple[Any, ...]:
    """The floor's parameters: the org, the release, its template agent and org, its
    template's slug and its version."""
    return (
        org_id,
        release["id"],
        release["template_agent_id"],
        release["organization_id"],
        release["template"],
        release["version"],
    )


async def connect_floor(url: URL) -> asyncpg.Connection:
    """A direct connection with the engine's connection settings, so both cache statements
    and plans alike (asyncpg prepares every statement on both)."""
    return await asyncpg.connect(asyncpg_dsn(url), **FLOOR_CONNECT_ARGS)


async def row_by_row_install(
    session: AsyncSession, org_id: uuid.UUID, snap: dict[str, Any]
) -> None:
    """A select-then-insert per template row, as a naive implementation would."""

    async def one(sql: str, **params: Any) -> Any:
        result = await session.execute(text(sql), params)
        return result.scalar() if result.returns_rows else None

    ids: dict[tuple[str, str], Any] = {}
    for kind, table, columns in (
        ("entity_types", "entity_types", ("name", "description", "icon", "color")),
        ("watchers", "watchers", ("name", "description", "schedule")),
        ("relationship_types", "entity_relationship_types", ("name", "description")),
    ):
        for item in snap[kind]:
            found = await one(
                f"SELECT id FROM {table} WHERE organization_id = :o AND slug = :s",  # noqa: S608
                o=org_id,
                s=item["slug"],
            )
            if found is None:
                names = ", ".join(columns)
                values = ", ".join(f":{c}" for c in columns)
                found = await one(
                    f"INSERT INTO {table} (organization_id, slug, {names}) "  # noqa: S608
                    f"VALUES (:o, :s, {values}) RETURNING id",
                    o=org_id,
                    s=item["slug"],
                    **{c: item.get(c) for c in columns},
                )
            ids[(kind, item["slug"])] = found
    for item in snap["watchers"]:
        version = await one(
            """INSERT INTO watcher_versions (organization_id, watcher_id, version, name, prompt,
                   extraction_schema, sources_schema) VALUES (:o, :w, 1, :n, :p,
                   CAST(:e AS jsonb), CAST(:src AS jsonb)) RETURNING id""",
            o=org_id,
            w=ids[("watchers", item["slug"])],
            n=item["name"],
            p=item["prompt"],
            e=json.dumps(item["extraction_schema"]),
            src=json.dumps(item["sources_schema"]),
        )
        await one(
            "UPDATE watchers SET current_version_id = :v WHERE id = :w",
            v=version,
            w=ids[("watchers", item["slug"])],
        )
    for item in snap["relationship_types"]:
        if item["inverse"]:
            await one(
                "UPDATE entity_relationship_types SET inverse_type_id = :i WHERE id = :t",
                i=ids[("relationship_types", item["inverse"])],
                t=ids[("relationship_types", item["slug"])],
            )
        for rule in item["rules"]:
            await one(
                """INSERT INTO entity_relationship_type_rules (organization_id,
                       relationship_type_id, source_entity_type_id, target_entity_type_id)
                   VALUES (:o, :t, :s, :g)""",
                o=org_id,
                t=ids[("relationship_types", item["slug"])],
                s=ids[("entity_types", rule["source"])],
                g=ids[("entity_types", rule["target"])],
            )
    for item in snap["classifiers"]:
        classifier = await one(
            """INSERT INTO event_classifiers (organization_id, slug, name, attribute_key,
                   entity_type_id, watcher_id) VALUES (:o, :s, :n, :k, :e, :w) RETURNING id""",
            o=org_id,
            s=item["slug"],
            n=item["name"],
            k=item["attribute_key"],
            e=ids.get(("entity_types", item["entity_type"] or "")),
            w=ids.get(("watchers", item["watcher"] or "")),
        )
        version = await one(
            """INSERT INTO event_classifier_versions (organization_id, classifier_id, version,
                   attribute_values, fallback_value, extraction_config)
               VALUES (:o, :c, 1, CAST(:a AS jsonb), :f, CAST(:x AS jsonb)) RETURNING id""",
            o=org_id,
            c=classifier,
            a=json.dumps(item["attribute_values"]),
            f=item["fallback_value"],
            x=json.dumps(item["extraction_config"]),
        )
        await one(
            "UPDATE event_classifiers SET current_version_id = :v WHERE id = :c",
            v=version,
            c=classifier,
        )


class Wire:
    """Counts the round trips an engine makes and, given a latency, waits that long before each
    (statements, BEGIN and COMMIT), as a network between service and database would."""

    def __init__(self, engine: AsyncEngine, latency_ms: float) -> None:
        self.engine, self.latency_ms, self.round_trips = engine, latency_ms, 0

    def trip(self, *_: Any) -> None:
        self.round_trips += 1
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000)

    def ends(self, conn: Connection, *_: Any) -> None:
        """BEGIN, COMMIT or ROLLBACK: no round trip on a connection in autocommit mode."""
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            self.trip()

    def __enter__(self) -> Wire:
        event.listen(self.engine.sync_engine, "before_cursor_execute", self.trip)
        for name in ("begin", "commit", "rollback"):
            event.listen(self.engine.sync_engine, name, self.ends)
        return self

    def __exit__(self, *_: Any) -> None:
        event.remove(self.engine.sync_engine, "before_cursor_execute", self.trip)
        for name in ("begin", "commit", "rollback"):
            event.remove(self.engine.sync_engine, name, self.ends)


class Bench:
    """One template published in one database, and the three ways of installing it."""

    def __init__(self, engine: AsyncEngine, conn: asyncpg.Connection, slug: str) -> None:
        self.engine, self.conn, self.slug = engine, conn, slug
        self.release: dict[str, Any] = {}

    async def refresh(self) -> None:
        async with transaction(self.engine) as session:
            self.release = await get_release(session, SYSTEM, self.slug, with_snapshot=True)

    async def fresh_orgs(self, count: int) -> list[tuple[uuid.UUID, str]]:
        orgs = []
        async with transaction(self.engine) as session:
            for _ in range(count):
                slug = f"o-{uuid.uuid4().hex[:12]}"
                orgs.append(((await create_organization(session, slug=slug, name=slug)).id, slug))
        return orgs

    async def by_engine(self, org: tuple[uuid.UUID, str]) -> None:
        """As the API and the test harness install (`install_template`): a no-op answered
        outside a transaction, anything else in one."""
        await install_template(self.engine, SYSTEM, self.slug, org[1])

    async def by_floor(self, org: tuple[uuid.UUID, str]) -> None:
        await self.conn.execute(FLOOR_SQL, *floor_args(org[0], self.release))

    async def by_floor_noop(self, org: tuple[uuid.UUID, str]) -> None:
        """The fair no-op floor: checks every fact the engine's no-op rests on."""
        if not await self.conn.fetchval(FLOOR_NOOP_SQL, org[1], self.slug):
            raise RuntimeError(f"the no-op floor finds {org[1]} not at the release")

    async def by_rows(self, org: tuple[uuid.UUID, str]) -> None:
        async with transaction(self.engine) as session:
            await row_by_row_install(session, org[0], self.release["snapshot"])


def _summary(timings: list[float], round_trips: float) -> dict[str, Any]:
    timings = sorted(timings)
    return {
        "median_ms": round(statistics.median(timings), 2),
        "p99_ms": round(timings[min(len(timings) - 1, int(len(timings) * 0.99))], 2),
        "installs_per_s": round(1000 / statistics.mean(timings), 1),
        "round_trips": round(round_trips, 1),
    }


Method = Callable[[tuple[uuid.UUID, str]], Awaitable[None]]


async def side_by_side(
    bench: Bench,
    methods: Mapping[str, tuple[Method, list[tuple[uuid.UUID, str]]]],
    latency_ms: float,
) -> dict[str, dict[str, Any]]:
    """Run each method once per org of its own, interleaved (engine, floor, row-by-row, engine,
    ...) so the machine's noise falls on all of them alike; figures per install."""
    timings: dict[str, list[float]] = {name: [] for name in methods}
    trips: dict[str, int] = dict.fromkeys(methods, 0)
    count = min(len(orgs) for _, orgs in methods.values())
    with Wire(bench.engine, latency_ms) as wire:
        for n in range(count):
            for name, (install, orgs) in methods.items():
                wire.round_trips = 0
                started = time.perf_counter()
                if install in (bench.by_floor, bench.by_floor_noop):
                    wire.trip()  # the floor's one round trip, on a raw connection
                await install(orgs[n])
                timings[name].append((time.perf_counter() - started) * 1000)
                trips[name] += wire.round_trips
    return {name: _summary(timings[name], trips[name] / count) for name in methods}


async def floor_xid_taken(bench: Bench, org: tuple[uuid.UUID, str]) -> bool:
    """Whether the floor took a transaction id (wrote anything), checked inside it."""
    async with bench.conn.transaction():
        await bench.by_floor(org)
        return await bench.conn.fetchval("SELECT txid_current_if_assigned()") is not None


async def floor_equals_engine(bench: Bench, org: tuple[uuid.UUID, str]) -> bool:
    """The floor wrote the rows the engine would: no drift and no plan change for its install."""
    async with transaction(bench.engine) as session:
        install_id = await session.scalar(
            text("SELECT id FROM agents WHERE organization_id = :o AND template_agent_id = :t"),
            {"o": org[0], "t": bench.release["template_agent_id"]},
        )
        report = await repair.drift(session, SYSTEM, install_id)
        dry = await installs.install(
            session, SYSTEM, template=bench.slug, organization=org[1], dry_run=True
        )
    return not report.drift and dry.action == "none"


async def measure_template(
    bench: Bench, doc: TemplateDocument, count: int, latencies: list[float], *, naive: bool
) -> list[dict[str, Any]]:
    rows = []
    for latency in latencies:
        row: dict[str, Any] = {"template": "", "latency_ms": latency}
        # Warm up (prepared statements settle on their plans) on fresh statistics, untimed.
        warm = {
            "engine": (bench.by_engine, await bench.fresh_orgs(WARM_UP)),
            "floor": (bench.by_floor, await bench.fresh_orgs(WARM_UP)),
        }
        if naive:
            warm["rowbyrow"] = (bench.by_rows, await bench.fresh_orgs(WARM_UP))
        await side_by_side(bench, warm, 0)
        await bench.conn.execute("ANALYZE")
        engine_orgs, floor_orgs = [await bench.fresh_orgs(count) for _ in range(2)]
        methods: dict[str, tuple[Method, list[tuple[uuid.UUID, str]]]] = {
            "engine": (bench.by_engine, engine_orgs),
            "floor": (bench.by_floor, floor_orgs),
        }
        if naive:
            methods["rowbyrow"] = (bench.by_rows, await bench.fresh_orgs(count))
        row |= await side_by_side(bench, methods, latency)
        row["engine/floor"] = round(row["engine"]["median_ms"] / row["floor"]["median_ms"], 2)
        if naive:
            row["rowbyrow/engine"] = round(
                row["rowbyrow"]["median_ms"] / row["engine"]["median_ms"], 2
            )
        if latency == 0:
            row["floor_equals_engine"] = await floor_equals_engine(bench, floor_orgs[0])
            # No-op: the installed release again, engine and floor side by side.
            # `floor` only meets its install row's ON CONFLICT; `floor_checked` checks, in one
            # statement, every fact the engine's no-op rests on (the fair comparison).
            noop = await side_by_side(
                bench,
                {
                    "engine": (bench.by_engine, engine_orgs),
                    "floor": (bench.by_floor, floor_orgs),
                    "floor_checked": (bench.by_floor_noop, floor_orgs),
                },
                0,
            )
            row["noop_engine"], row["noop_floor"] = noop["engine"], noop["floor"]
            row["noop_floor_checked"] = noop["floor_checked"]
            row["noop_engine/floor"] = round(
                row["noop_engine"]["median_ms"] / row["noop_floor"]["median_ms"], 2
            )
            row["noop_engine/floor_checked"] = round(
                row["noop_engine"]["median_ms"] / row["noop_floor_checked"]["median_ms"], 2
            )
            row["noop_engine_xid"] = await _engine_noop_xid(bench, engine_orgs[0])
            row["noop_floor_xid"] = await floor_xid_taken(bench, floor_orgs[0])
            # Upgrade: a release changing one watcher's prompt, applied to installed orgs.
            async with transaction(bench.engine) as session:
                await publish(session, one_watcher_changed(doc), actor=SYSTEM, source="cli")
            await bench.refresh()
            upgrade = await side_by_side(bench, {"engine": (bench.by_engine, engine_orgs)}, 0)
            row["upgrade_engine"] = upgrade["engine"]
            row["upgrade_edited"] = await edited_upgrades(bench, doc, count)
        rows.append(row)
    return rows


EDITED_SHARES = (0, 10, 50, 100)


async def edited_upgrades(
    bench: Bench, doc: TemplateDocument, count: int
) -> dict[str, dict[str, Any]]:
    """Upgrades where N% of each org's entity types were edited locally (their icon) and the
    release changes every entity type's name: each edited row is merged field by field.
    Groups are interleaved install by install, like the other comparisons."""
    groups: dict[str, list[tuple[uuid.UUID, str]]] = {}
    for share in EDITED_SHARES:
        orgs = await bench.fresh_orgs(count)
        for org in orgs:
            await bench.by_engine(org)
        await bench.conn.execute(
            """UPDATE entity_types SET icon = 'local'
               WHERE organization_id = ANY($1::uuid[])
                 AND abs(hashtext(slug)) % 100 < $2""",
            [org_id for org_id, _ in orgs],
            share,
        )
        groups[f"{share}%"] = orgs
    renamed = [msgspec.structs.replace(e, name=e.name + " (2)") for e in doc.entity_types]
    async with transaction(bench.engine) as session:
        await publish(
            session,
            msgspec.structs.replace(one_watcher_changed(doc), entity_types=renamed),
            actor=SYSTEM,
            source="cli",
        )
    await bench.refresh()
    methods: dict[str, tuple[Method, list[tuple[uuid.UUID, str]]]] = {
        share: (bench.by_engine, orgs) for share, orgs in groups.items()
    }
    return await side_by_side(bench, methods, 0)


async def _engine_noop_xid(bench: Bench, org: tuple[uuid.UUID, str]) -> bool:
    """Whether the engine's no-op took a transaction id (none when answered outside one)."""
    if await installs.noop(bench.engine, SYSTEM, template=bench.slug, organization=org[1]):
        return False
    async with transaction(bench.engine) as session:
        await installs.install(session, SYSTEM, template=bench.slug, organization=org[1])
        return await session.scalar(text("SELECT txid_current_if_assigned()")) is not None


def one_watcher_changed(doc: TemplateDocument) -> TemplateDocument:
    watchers = list(doc.watchers)
    watchers[0] = msgspec.structs.replace(watchers[0], prompt="Changed.\n" + watchers[0].prompt)
    return msgspec.structs.replace(doc, watchers=watchers)


async def run(
    url: URL, count: int, latencies: list[float], factors: list[int]
) -> list[dict[str, Any]]:
    engine = create_engine(url)
    conn = await connect_floor(url)
    base = msgspec.to_builtins(personal_finance())
    results = []
    for factor in factors:
        doc = parse(base if factor == 1 else scaled_template(base, factor))
        async with transaction(engine) as session:
            await publish(session, doc, actor=SYSTEM, source="cli")
        bench = Bench(engine, conn, doc.slug)
        await bench.refresh()
        # Row by row only up to 10x: beyond, it takes seconds per install.
        for row in await measure_template(bench, doc, count, latencies, naive=factor <= 10):
            row["template"] = f"x{factor}"
            row["rows"] = sum(len(bench.release["snapshot"][k]) for k in KINDS)
            row["engine_ms_per_row"] = round(row["engine"]["median_ms"] / row["rows"], 3)
            row["floor_ms_per_row"] = round(row["floor"]["median_ms"] / row["rows"], 3)
            results.append(row)
    await conn.close()
    await engine.dispose()
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        "template | rows | RTT ms | engine med/p99 ms (round trips) | floor med ms (round trips)"
        " | row-by-row med ms (round trips) | engine/floor | rowbyrow/engine"
        " | engine ms per row"
    )
    for r in results:
        e, f = r["engine"], r["floor"]
        b = r.get("rowbyrow")
        naive = f"{b['median_ms']} ({b['round_trips']:g})" if b else "-"
        print(
            f"{r['template']} | {r['rows']} | {r['latency_ms']} | {e['median_ms']}/{e['p99_ms']} "
            f"({e['round_trips']:g}) | {f['median_ms']} ({f['round_trips']:g}) | "
            f"{naive} | {r['engine/floor']} | {r.get('rowbyrow/engine', '-')} | "
            f"{r['engine_ms_per_row']}"
        )
    print()
    print(
        "template | no-op engine ms (round trips, xid?) | no-op floor ms (xid?) | engine/floor"
        " | no-op floor checking the same facts ms | engine/that floor"
        " | upgrade, one watcher changed, ms (round trips) | floor rows equal engine's"
    )
    for r in results:
        if "noop_engine" not in r:
            continue
        n, nf, u = r["noop_engine"], r["noop_floor"], r["upgrade_engine"]
        print(
            f"{r['template']} | {n['median_ms']} ({n['round_trips']:g}, "
            f"{'xid' if r['noop_engine_xid'] else 'no xid'}) | {nf['median_ms']} "
            f"({'xid' if r['noop_floor_xid'] else 'no xid'}) | {r['noop_engine/floor']} | "
            f"{r['noop_floor_checked']['median_ms']} | {r['noop_engine/floor_checked']} | "
            f"{u['median_ms']} ({u['round_trips']:g}) | {r['floor_equals_engine']}"
        )


def print_edited(results: list[dict[str, Any]]) -> None:
    print()
    print(
        "template | upgrade with N% of entity types edited locally and every one renamed by "
        "the release: median ms (round trips) per share"
    )
    for r in results:
        if "upgrade_edited" not in r:
            continue
        cells = " | ".join(
            f"{share}: {v['median_ms']} ({v['round_trips']:g})"
            for share, v in r["upgrade_edited"].items()
        )
        print(f"{r['template']} | {cells}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--installs", type=int, default=30)
    parser.add_argument("--latency-ms", default="0,0.5,1")
    parser.add_argument("--factors", default="1,10", help="template sizes, e.g. 1,10,50")
    args = parser.parse_args()
    latencies = [float(x) for x in args.latency_ms.split(",")]
    factors = [int(x) for x in args.factors.split(",")]
    with tempfile.TemporaryDirectory() as tmp, bench_database(Path(tmp)) as url:
        results = asyncio.run(run(url, args.installs, latencies, factors))
    print_table(results)
    print_edited(results)
    write_results("install", results)


if __name__ == "__main__":
    main()
