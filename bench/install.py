"""Install cost: the engine beside a set-based floor and a row-by-row baseline, in one run.

    uv run python bench/install.py [--installs 30] [--latency-ms 0,0.5,1]

For personal-finance and for the same template ten times larger, each into fresh orgs:
median and p99 ms, installs/s and statements per install for

- engine: `installs.install` (authorize, plan, lock, apply, verify, history; commit included);
- floor: the same rows written by hand-tight set-based SQL (one INSERT ... SELECT per table,
  no plan, no locks, no verification, no provenance checks);
- row-by-row: a select-then-insert per template row, as a naive implementation would.

Then the engine's no-op re-install (and whether it took a transaction id). With
`--latency-ms`, each statement also waits that long before it is sent, as a network round trip
would. Prints a table and writes bench/results/install.json. Figures, not tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from install_service.db import migrate
from install_service.db.engine import async_url, create_engine, ensure_database, start_embedded
from install_service.db.session import transaction
from install_service.installs import service as installs
from install_service.orgs.service import Actor, create_organization
from install_service.templates.documents import load_path, parse
from install_service.templates.service import get_release, publish
from install_service.testing import scaled_template

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = Actor.system()

FLOOR = [
    """INSERT INTO entity_types (organization_id, slug, name, description, icon, color,
           metadata_schema, event_kinds)
       SELECT :org, i->>'slug', i->>'name', i->>'description', i->>'icon', i->>'color',
              i->'metadata_schema', i->'event_kinds'
       FROM template_releases r, jsonb_array_elements(r.snapshot->'entity_types') i
       WHERE r.id = :release""",
    """INSERT INTO watchers (organization_id, slug, name, description, schedule)
       SELECT :org, i->>'slug', i->>'name', i->>'description', i->>'schedule'
       FROM template_releases r, jsonb_array_elements(r.snapshot->'watchers') i
       WHERE r.id = :release""",
    """WITH v AS (
           INSERT INTO watcher_versions (organization_id, watcher_id, version, name, prompt,
                                         extraction_schema, sources_schema, reactions_guidance)
           SELECT :org, w.id, 1, i->>'name', i->>'prompt', i->'extraction_schema',
                  i->'sources_schema', i->>'reactions_guidance'
           FROM template_releases r, jsonb_array_elements(r.snapshot->'watchers') i
           JOIN watchers w ON w.organization_id = :org AND w.slug = i->>'slug'
           WHERE r.id = :release RETURNING id, watcher_id)
       UPDATE watchers w SET current_version_id = v.id FROM v WHERE w.id = v.watcher_id""",
    """INSERT INTO entity_relationship_types (organization_id, slug, name, description,
           metadata_schema, is_symmetric)
       SELECT :org, i->>'slug', i->>'name', i->>'description', i->'metadata_schema',
              (i->>'is_symmetric')::boolean
       FROM template_releases r, jsonb_array_elements(r.snapshot->'relationship_types') i
       WHERE r.id = :release""",
    """UPDATE entity_relationship_types t SET inverse_type_id = x.id
       FROM template_releases r, jsonb_array_elements(r.snapshot->'relationship_types') i,
            entity_relationship_types x
       WHERE r.id = :release AND t.organization_id = :org AND t.slug = i->>'slug'
         AND x.organization_id = :org AND x.slug = i->>'inverse'""",
    """INSERT INTO entity_relationship_type_rules (organization_id, relationship_type_id,
           source_entity_type_id, target_entity_type_id)
       SELECT :org, t.id, s.id, g.id
       FROM template_releases r, jsonb_array_elements(r.snapshot->'relationship_types') i
       JOIN entity_relationship_types t ON t.organization_id = :org AND t.slug = i->>'slug'
       CROSS JOIN LATERAL jsonb_array_elements(i->'rules') rule
       JOIN entity_types s ON s.organization_id = :org AND s.slug = rule->>'source'
       JOIN entity_types g ON g.organization_id = :org AND g.slug = rule->>'target'
       WHERE r.id = :release""",
    """INSERT INTO event_classifiers (organization_id, slug, name, description, attribute_key,
           entity_type_id, watcher_id)
       SELECT :org, i->>'slug', i->>'name', i->>'description', i->>'attribute_key', e.id, w.id
       FROM template_releases r, jsonb_array_elements(r.snapshot->'classifiers') i
       LEFT JOIN entity_types e ON e.organization_id = :org AND e.slug = i->>'entity_type'
       LEFT JOIN watchers w ON w.organization_id = :org AND w.slug = i->>'watcher'
       WHERE r.id = :release""",
    """WITH v AS (
           INSERT INTO event_classifier_versions (organization_id, classifier_id, version,
                                                  attribute_values, fallback_value,
                                                  extraction_config)
           SELECT :org, c.id, 1, i->'attribute_values', i->>'fallback_value',
                  i->'extraction_config'
           FROM template_releases r, jsonb_array_elements(r.snapshot->'classifiers') i
           JOIN event_classifiers c ON c.organization_id = :org AND c.slug = i->>'slug'
           WHERE r.id = :release RETURNING id, classifier_id)
       UPDATE event_classifiers c SET current_version_id = v.id FROM v
       WHERE c.id = v.classifier_id""",
]


async def engine_install(session: AsyncSession, slug: str, org: str, _: Any) -> None:
    await installs.install(session, SYSTEM, template=slug, organization=org)


async def floor_install(session: AsyncSession, slug: str, org: str, release: Any) -> None:
    params = {"org": release["org_id"], "release": release["id"]}
    for sql in FLOOR:
        await session.execute(text(sql), params)


async def row_by_row_install(session: AsyncSession, slug: str, org: str, release: Any) -> None:
    org_id, snap = release["org_id"], release["snapshot"]

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


Install = Callable[[AsyncSession, str, str, Any], Awaitable[None]]


async def measure(
    engine: AsyncEngine, slug: str, install: Install, count: int, latency_ms: float
) -> dict[str, Any]:
    """`count` installs into fresh orgs; statements counted, optional per-statement delay."""
    async with transaction(engine) as session:
        release = await get_release(session, SYSTEM, slug, with_snapshot=True)
    statements = 0

    def before(*_: Any) -> None:
        nonlocal statements
        statements += 1
        if latency_ms:
            time.sleep(latency_ms / 1000)  # a round trip on a real network, in this process

    timings = []
    for _ in range(count):
        org_slug = f"o-{uuid.uuid4().hex[:10]}"
        async with transaction(engine) as session:
            org = await create_organization(session, slug=org_slug, name=org_slug)
        release_for_org = {**release, "org_id": org.id}
        event.listen(engine.sync_engine, "before_cursor_execute", before)
        started = time.perf_counter()
        async with transaction(engine) as session:
            await install(session, slug, org_slug, release_for_org)
        timings.append((time.perf_counter() - started) * 1000)
        event.remove(engine.sync_engine, "before_cursor_execute", before)
    timings.sort()
    return {
        "median_ms": round(statistics.median(timings), 2),
        "p99_ms": round(timings[min(len(timings) - 1, int(len(timings) * 0.99))], 2),
        "installs_per_s": round(1000 / statistics.mean(timings), 1),
        "statements": statements / count,
    }


async def noop(engine: AsyncEngine, slug: str, count: int) -> dict[str, Any]:
    """Re-installing the installed release: cost, and whether a transaction id was taken."""
    org_slug = f"o-{uuid.uuid4().hex[:10]}"
    async with transaction(engine) as session:
        await create_organization(session, slug=org_slug, name=org_slug)
        await installs.install(session, SYSTEM, template=slug, organization=org_slug)
    timings, xids = [], set()
    for _ in range(count):
        started = time.perf_counter()
        async with transaction(engine) as session:
            await installs.install(session, SYSTEM, template=slug, organization=org_slug)
            xids.add(await session.scalar(text("SELECT txid_current_if_assigned()")))
        timings.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(timings), 2), "xid_assigned": xids != {None}}


async def run(url: URL, count: int, latencies: list[float]) -> list[dict[str, Any]]:
    engine = create_engine(url)
    base = msgspec.to_builtins(load_path(ROOT / "templates" / "personal-finance"))
    results = []
    for factor in (1, 10):
        doc = parse(base if factor == 1 else scaled_template(base, factor))
        async with transaction(engine) as session:
            await publish(session, doc, actor=SYSTEM)
        for latency in latencies:
            row: dict[str, Any] = {"template": f"x{factor}", "latency_ms": latency}
            for name, install in (
                ("engine", engine_install),
                ("floor", floor_install),
                ("rowbyrow", row_by_row_install),
            ):
                row[name] = await measure(engine, doc.slug, install, count, latency)
            row["engine/floor"] = round(row["engine"]["median_ms"] / row["floor"]["median_ms"], 2)
            row["rowbyrow/engine"] = round(
                row["rowbyrow"]["median_ms"] / row["engine"]["median_ms"], 2
            )
            if latency == 0:
                row["noop"] = await noop(engine, doc.slug, count)
            results.append(row)
    await engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--installs", type=int, default=30)
    parser.add_argument("--latency-ms", default="0,0.5,1")
    args = parser.parse_args()
    latencies = [float(x) for x in args.latency_ms.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        configured = os.environ.get("INSTALL_SERVICE_DATABASE_URL")
        server = async_url(configured) if configured else start_embedded(Path(tmp))
        url = server.set(database=f"bench_{uuid.uuid4().hex[:8]}")
        asyncio.run(ensure_database(server, url.database or ""))
        migrate.upgrade(url)
        results = asyncio.run(run(url, args.installs, latencies))
    print(
        "template | latency ms | engine med/p99 ms (stmts) | floor med (stmts) | "
        "row-by-row med (stmts) | engine/floor | rowbyrow/engine | no-op ms (xid?)"
    )
    for r in results:
        e, f, b = r["engine"], r["floor"], r["rowbyrow"]
        no = r.get("noop")
        print(
            f"{r['template']} | {r['latency_ms']} | {e['median_ms']}/{e['p99_ms']} "
            f"({e['statements']:.0f}) | {f['median_ms']} ({f['statements']:.0f}) | "
            f"{b['median_ms']} ({b['statements']:.0f}) | {r['engine/floor']} | "
            f"{r['rowbyrow/engine']} | "
            + (f"{no['median_ms']} ({no['xid_assigned']})" if no else "-")
        )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "install.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
