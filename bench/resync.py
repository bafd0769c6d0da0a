"""Resync throughput, bulk install, the fleet dry run, and the cost of a batch.

    uv run python -m bench.resync [--orgs 1000] [--concurrency 4] [--fleet 10000]
                                  [--batch 200] [--bulk-jobs 2] [--throughput-only]

Installs personal-finance into N fresh orgs with one bulk install (a resync with `install:
true`, worked through in-process by `--bulk-jobs` loops of batches at once, as a worker's
jobs on one run are: its rate is reported; on a 2-core machine two loops moved the most),
publishes a release that changes one
watcher, resyncs with one `install-service worker` process, publishes again and resyncs with
two; at the end (after the fleet steps below) once more with one worker over every `--fleet`
install. Each resync reports its whole run and its steady state (from 10% to 90% of the items
done): orgs/s, CPU per org of PostgreSQL (every server process, from /proc) and of the
workers, and WAL bytes per org. Progress is read every 0.25 s over a connection of its own,
whose backend's CPU is reported apart (`steady_cpu_ms_per_org_poller_backend`), not in
PostgreSQL's figure. Workers move `--batch` items at a time (INSTALL_SERVICE_RESYNC_BATCH).

Then the fleet dry run of a release that renames an entity type and changes a watcher, where
2% of the orgs renamed that entity type themselves (conflicts) and 2% edited its description
(merged): timed at N installs, then at `--fleet` installs (bulk-installed into more orgs
first). Then a run over all `--fleet` installs is worked through in-process by one loop of
batches, each timed on its own and its statements counted: the median batch (and claim) at
the start and at the end of the run, which must be the same (a claim reads an index of
pending items, not the finished ones).

Prints tables and writes bench/results/resync.json. Uses INSTALL_SERVICE_DATABASE_URL's
server if set, else an embedded PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil
from sqlalchemy import event, text
from sqlalchemy.engine import URL

from bench import (
    CpuMeter,
    backend_pid,
    bench_database,
    per_unit_ms,
    personal_finance,
    postmaster,
    write_results,
)
from install_service.actor import Actor
from install_service.cli.serve import freeze_startup
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.pagination import PageRequest
from install_service.resync import execution, fleet, jobs
from install_service.resync import service as resync
from install_service.resync.schemas import FleetPlan, ResyncRequest, Wave
from install_service.templates.schemas import TemplateDocument
from install_service.templates.service import publish

# How often the run's progress is read while workers run (its cost is reported apart).
POLL_SECONDS = 0.25


def changed(doc: TemplateDocument, n: int) -> TemplateDocument:
    watchers = list(doc.watchers)
    watchers[0] = msgspec.structs.replace(
        watchers[0], prompt=f"Release {n}.\n" + watchers[0].prompt
    )
    return msgspec.structs.replace(doc, watchers=watchers)


async def setup(
    url: URL, orgs: int, first: int = 0, batch: int = 200, jobs: int = 1
) -> dict[str, Any]:
    """Orgs `bench-<first>` .. `bench-<orgs - 1>`, made set-based, with personal-finance
    installed (published first if it is not yet) by one bulk install: a resync with `install:
    true`, worked through in-process by `jobs` loops of batches at once, as a worker's jobs
    on one run do. Its rate is returned, with the CPU per org of PostgreSQL and of this
    process (the worker), the WAL per org, the statements sent per batch and the cost of the
    first and the last batches."""
    doc = personal_finance()
    engine = create_engine(url)
    if first == 0:
        async with transaction(engine) as session:
            await publish(session, doc, actor=Actor.system(), source="cli")
    async with transaction(engine) as session:
        await session.execute(
            text("""
                INSERT INTO organizations (slug, name)
                SELECT 'bench-' || g, 'Bench ' || g
                FROM generate_series(CAST(:first AS int), CAST(:last AS int)) g"""),
            {"first": first, "last": orgs - 1},
        )
        latest = await session.scalar(
            text("""SELECT max(r.version) FROM template_releases r
                    JOIN agents a ON a.id = r.template_agent_id
                    JOIN organizations o ON o.id = a.organization_id WHERE o.slug = :t"""),
            {"t": doc.slug},
        )
    meter = CpuMeter(
        {"postgres": (await postmaster(url), True), "worker": (psutil.Process(), False)}
    )
    async with engine.connect() as conn:
        wal_before = await conn.scalar(text("SELECT pg_current_wal_lsn()"))
    started = time.perf_counter()
    async with transaction(engine) as session:
        run = await resync.start_run(
            session,
            Actor.system(),
            doc.slug,
            ResyncRequest(
                version=latest,
                install=True,
                orgs=[f"bench-{i}" for i in range(first, orgs)],
            ),
        )
    created = time.perf_counter()
    async with transaction(engine) as session:
        await execution.start(session, run.id)
    sent = {"statements": 0}

    def count(*_: Any) -> None:
        sent["statements"] += 1

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    batches: list[float] = []

    async def work() -> None:
        while True:
            began = time.perf_counter()
            async with transaction(engine) as session:
                if not await execution.process_next_batch(
                    session, run.id, worker="bench", batch=batch
                ):
                    break
            batches.append(time.perf_counter() - began)

    await asyncio.gather(*(work() for _ in range(jobs)))
    event.remove(engine.sync_engine, "before_cursor_execute", count)
    async with transaction(engine) as session:
        await execution.close_wave(session, run.id)
        state = await resync.get_run(session, run.id)
    elapsed = time.perf_counter() - started
    spent = meter.since()
    async with engine.connect() as conn:
        wal = await conn.scalar(
            text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), CAST(:before AS pg_lsn))"),
            {"before": wal_before},
        )
    await engine.dispose()
    installed = orgs - first
    if state.counts.succeeded != installed:
        raise RuntimeError(f"bulk install did not install every org: {state.counts}")
    edge = max(1, min(5, len(batches) // 4))
    return {
        "bulk_install_orgs": installed,
        "bulk_install_s": round(elapsed, 2),
        "bulk_install_run_created_s": round(created - started, 2),
        "bulk_install_orgs_per_s": round(installed / elapsed, 1),
        "bulk_install_batch": batch,
        "bulk_install_jobs": jobs,
        "bulk_install_batches": len(batches),
        # Statements per batch (the claim, the plan, the apply, its verification, the record
        # and the items' outcomes, ...; the final empty claim included), not BEGIN or COMMIT.
        "bulk_install_statements_per_batch": round(sent["statements"] / max(len(batches), 1), 1),
        "bulk_install_cpu_ms_per_org_postgres": round(spent["postgres"] * 1000 / installed, 2),
        "bulk_install_cpu_ms_per_org_worker": round(spent["worker"] * 1000 / installed, 2),
        "bulk_install_wal_bytes_per_org": round(float(wal) / installed),
        "bulk_install_ms_per_org_first": round(statistics.median(batches[:edge]) * 1000 / batch, 3),
        "bulk_install_ms_per_org_last": round(statistics.median(batches[-edge:]) * 1000 / batch, 3),
    }


def _spawn_worker(url: URL, concurrency: int, batch: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "INSTALL_SERVICE_DATABASE_URL": url.render_as_string(hide_password=False),
        "INSTALL_SERVICE_RESYNC_BATCH": str(batch),
    }
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "install_service", "worker", "--concurrency", str(concurrency)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def resync_with(
    url: URL, doc: TemplateDocument, release: int, workers: int, concurrency: int, batch: int
) -> dict[str, Any]:
    engine = create_engine(url)
    async with transaction(engine) as session:
        await publish(session, changed(doc, release), actor=Actor.system(), source="cli")
    async with engine.connect() as conn:
        registered = await conn.scalar(text("SELECT count(*) FROM procrastinate_workers"))
    processes = [_spawn_worker(url, concurrency, batch) for _ in range(workers)]
    # Workers up and idle (registered with the queue) before the clock starts.
    while True:
        async with engine.connect() as conn:
            now = await conn.scalar(text("SELECT count(*) FROM procrastinate_workers"))
        if now >= registered + workers:
            break
        await asyncio.sleep(0.2)
    rss_samples: list[tuple[float, int]] = []
    # The poller below reads the run's counts over one connection of its own; its backend's
    # CPU is reported apart, not counted as the workers' PostgreSQL cost.
    poller = create_engine(url, pool_size=1, max_overflow=0)
    async with poller.connect() as conn:
        poller_pid = await backend_pid(conn)
    meter = CpuMeter(
        {
            "postgres": (await postmaster(url), True),
            "worker": (psutil.Process(processes[0].pid), True),
            **{f"worker_{n}": (psutil.Process(p.pid), True) for n, p in enumerate(processes[1:])},
        },
        exclude=[poller_pid],
    )
    async with transaction(engine) as session:
        run = await resync.start_run(session, Actor.system(), doc.slug)
    async with engine.connect() as conn:
        wal_before = await conn.scalar(text("SELECT pg_current_wal_lsn()"))
    async with jobs.opened(url) as queue:
        await jobs.wake(queue, run)
    started = time.perf_counter()
    # Steady state: from the first reading with 10% of the items done to the first with 90%,
    # so neither the first claims nor the last stragglers weigh in.
    window: dict[str, tuple[float, int, dict[str, float]]] = {}
    while True:
        async with transaction(poller) as session:
            state = await resync.get_run(session, run.id)
        done = state.counts.total - state.counts.pending
        fraction = done / max(state.counts.total, 1)
        for edge, at in (("start", 0.1), ("end", 0.9)):
            if fraction >= at and edge not in window:
                window[edge] = (time.perf_counter(), done, meter.read())
        rss = sum(psutil.Process(p.pid).memory_info().rss for p in processes)
        rss_samples.append((fraction, rss))
        if state.status in resync.FINISHED:
            break
        await asyncio.sleep(POLL_SECONDS)
    elapsed = time.perf_counter() - started
    whole_run = meter.since()
    async with engine.connect() as conn:
        wal = await conn.scalar(
            text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), CAST(:before AS pg_lsn))"),
            {"before": wal_before},
        )
    for p in processes:
        p.terminate()
        p.wait()
    await engine.dispose()
    await poller.dispose()

    def rss_at(fraction: float) -> float:
        return next(r for f, r in rss_samples if f >= fraction) / workers / 2**20

    (t0, done0, cpu0), (t1, done1, cpu1) = window["start"], window["end"]
    steady_orgs = max(done1 - done0, 1)
    steady = {k: cpu1[k] - cpu0[k] for k in cpu1}
    steady["postgres"] -= steady["postgres_excluded"]
    workers_cpu = {k: v for k, v in steady.items() if k.startswith("worker")}
    return {
        "workers": workers,
        "concurrency": concurrency,
        "batch": batch,
        "orgs": state.counts.total,
        "status": state.status,
        "seconds": round(elapsed, 2),
        "orgs_per_s": round(state.counts.total / elapsed, 1),
        "orgs_per_s_per_worker": round(state.counts.total / elapsed / workers, 1),
        "rss_mib_per_worker_at_25pct": round(rss_at(0.25), 1),
        "rss_mib_per_worker_at_100pct": round(rss_at(1.0), 1),
        "steady_orgs": steady_orgs,
        "steady_orgs_per_s": round(steady_orgs / (t1 - t0), 1),
        "steady_cpu_ms_per_org_postgres": round(steady["postgres"] * 1000 / steady_orgs, 2),
        "steady_cpu_ms_per_org_workers": round(sum(workers_cpu.values()) * 1000 / steady_orgs, 2),
        "steady_cpu_ms_per_org_poller_backend": round(
            steady["postgres_excluded"] * 1000 / steady_orgs, 2
        ),
        "run_cpu_ms_per_org": per_unit_ms(whole_run, state.counts.total),
        "wal_bytes_per_org": round(float(wal) / state.counts.total),
    }


def renamed(doc: TemplateDocument, n: int) -> TemplateDocument:
    """`changed`, and the first entity type renamed too."""
    doc = changed(doc, n)
    entity_types = list(doc.entity_types)
    entity_types[0] = msgspec.structs.replace(entity_types[0], name=f"{entity_types[0].name} {n}")
    return msgspec.structs.replace(doc, entity_types=entity_types)


async def customize(url: URL, doc: TemplateDocument) -> None:
    """2% of the orgs rename the entity type the next release renames (a conflict), 2% edit
    its description (merged); all set-based, as the orgs' own edits would leave them."""
    engine = create_engine(url)
    slug = doc.entity_types[0].slug
    async with transaction(engine) as session:
        await session.execute(
            text("""
                UPDATE entity_types t
                SET name = CASE WHEN n % 50 = 0 THEN 'Our own name' ELSE t.name END,
                    description = CASE WHEN n % 50 = 1 THEN 'Our own words' ELSE t.description END
                FROM (SELECT id, CAST(substr(slug, 7) AS int) AS n FROM organizations
                      WHERE slug LIKE 'bench-%') o
                WHERE t.organization_id = o.id AND t.slug = :slug AND o.n % 50 IN (0, 1)
                  AND t.name NOT LIKE 'Our own%' AND t.description NOT LIKE 'Our own%'"""),
            {"slug": slug},
        )
    await engine.dispose()


async def time_dry_run(url: URL, doc: TemplateDocument, repeats: int = 3) -> dict[str, Any]:
    """The fleet dry run as the API answers it (first page of 50 items), median of repeats."""
    engine = create_engine(url)
    seconds = []
    plan: FleetPlan | None = None
    for _ in range(repeats):
        started = time.perf_counter()
        async with transaction(engine) as session:
            plan = await fleet.dry_run(
                session,
                Actor.system(),
                doc.slug,
                ResyncRequest(waves=[Wave(count=10), Wave(percent=50)]),
                PageRequest(limit=50),
            )
        seconds.append(time.perf_counter() - started)
    await engine.dispose()
    if plan is None:
        raise ValueError("repeats must be at least 1")
    return {
        "installs": sum(msgspec.structs.asdict(plan.totals).values()),
        "dry_run_s": round(statistics.median(seconds), 2),
        **{f"predicted_{k}": v for k, v in msgspec.structs.asdict(plan.totals).items()},
    }


async def claim_costs(url: URL, doc: TemplateDocument, batch: int) -> dict[str, Any]:
    """Work a run over every install in-process, one batch after another, timing each batch
    and its claim on their own and counting the statements each sends."""
    engine = create_engine(url, pool_size=2)
    async with transaction(engine) as session:
        run = await resync.start_run(session, Actor.system(), doc.slug)
    async with transaction(engine) as session:
        await execution.start(session, run.id)
    claims: list[float] = []
    batches: list[float] = []
    sizes: list[int] = []
    sent = {"statements": 0}

    def count(*_: Any) -> None:
        sent["statements"] += 1

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    started = time.perf_counter()
    while True:
        async with transaction(engine) as session:
            began = time.perf_counter()
            items = await execution.claim_batch(session, run.id, batch)
            claimed = time.perf_counter()
            if not items:
                break
            await execution.process_batch(session, items, worker="bench")
        batches.append(time.perf_counter() - began)
        claims.append(claimed - began)
        sizes.append(len(items))
    elapsed = time.perf_counter() - started
    event.remove(engine.sync_engine, "before_cursor_execute", count)
    async with transaction(engine) as session:
        await execution.close_wave(session, run.id)
        state = await resync.get_run(session, run.id)
    await engine.dispose()
    edge = max(1, min(5, len(batches) // 4))
    done = sum(sizes)
    return {
        "items": done,
        "status": state.status,
        "counts": msgspec.structs.asdict(state.counts),
        "orgs_per_s": round(done / elapsed, 1),
        "claim_ms_first": round(statistics.median(claims[:edge]) * 1000, 2),
        "claim_ms_last": round(statistics.median(claims[-edge:]) * 1000, 2),
        "edge": edge,
        "batch": batch,
        "batches": len(batches),
        # Statements sent per batch (the claim, the row locks, the plan, the apply, its
        # verification, the record and the items' outcomes; the final empty claims
        # included), not counting BEGIN and COMMIT.
        "statements_per_batch": round(sent["statements"] / max(len(batches), 1), 1),
        "batch_ms_first": round(statistics.median(batches[:edge]) * 1000, 1),
        "batch_ms_last": round(statistics.median(batches[-edge:]) * 1000, 1),
        "ms_per_org_first": round(statistics.median(batches[:edge]) * 1000 / batch, 3),
        "ms_per_org_last": round(statistics.median(batches[-edge:]) * 1000 / batch, 3),
    }


def table(results: list[dict[str, Any]]) -> None:
    keys = list(results[0])
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(str(r[k]) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--fleet", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=200, help="items a worker moves at once")
    parser.add_argument(
        "--bulk-jobs",
        type=int,
        default=2,
        help="batches of the bulk installs worked at once (a worker's jobs on one run)",
    )
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="only the resyncs at --orgs (and at --fleet when larger), no dry runs or claims",
    )
    args = parser.parse_args()
    # Measured in-process, so this process starts as the service's processes do.
    freeze_startup()
    doc = personal_finance()
    with tempfile.TemporaryDirectory() as tmp, bench_database(Path(tmp)) as url:
        installs = [asyncio.run(setup(url, args.orgs, batch=args.batch, jobs=args.bulk_jobs))]
        table(installs)
        throughput = [
            asyncio.run(resync_with(url, doc, 2, 1, args.concurrency, args.batch)),
            asyncio.run(resync_with(url, doc, 3, 2, args.concurrency, args.batch)),
        ]
        table(throughput)
        if args.throughput_only:
            if args.fleet > args.orgs:
                installs.append(
                    asyncio.run(
                        setup(
                            url, args.fleet, first=args.orgs, batch=args.batch, jobs=args.bulk_jobs
                        )
                    )
                )
                throughput.append(
                    asyncio.run(resync_with(url, doc, 4, 1, args.concurrency, args.batch))
                )
            table(installs)
            table(throughput)
            write_results("resync", [*installs, *throughput])
            return
        asyncio.run(customize(url, renamed(doc, 4)))
        asyncio.run(_publish(url, renamed(doc, 4)))
        dry_runs = [asyncio.run(time_dry_run(url, doc))]
        table(dry_runs)
        installs.append(
            asyncio.run(
                setup(url, args.fleet, first=args.orgs, batch=args.batch, jobs=args.bulk_jobs)
            )
        )
        table(installs)
        asyncio.run(customize(url, renamed(doc, 4)))
        dry_runs.append(asyncio.run(time_dry_run(url, doc)))
        table(dry_runs)
        claims = asyncio.run(claim_costs(url, doc, args.batch))
        table([claims])
        # The same one-worker resync as above, now over every install of the fleet.
        throughput.append(asyncio.run(resync_with(url, doc, 5, 1, args.concurrency, args.batch)))
    table(installs)
    table(throughput)
    table(dry_runs)
    table([claims])
    write_results("resync", [*installs, *throughput, *dry_runs, claims])


async def _publish(url: URL, doc: TemplateDocument) -> None:
    engine = create_engine(url)
    async with transaction(engine) as session:
        await publish(session, doc, actor=Actor.system(), source="cli")
    await engine.dispose()


if __name__ == "__main__":
    main()
