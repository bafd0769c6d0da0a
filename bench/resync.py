"""Resync throughput: orgs/s and worker memory, one and two worker processes.

    uv run python -m bench.resync [--orgs 1000] [--concurrency 4]

Installs personal-finance into N fresh orgs, publishes a release that changes one watcher,
resyncs with one `install-service worker` process, publishes again and resyncs with two.
Prints a table and writes bench/results/resync.json. Uses INSTALL_SERVICE_DATABASE_URL's
server if set, else an embedded PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy.engine import URL

from bench import ROOT, bench_database, write_results
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.orgs.service import Actor
from install_service.resync import jobs
from install_service.resync import service as resync
from install_service.templates.documents import load_path
from install_service.templates.schemas import TemplateDocument
from install_service.templates.service import publish


def changed(doc: TemplateDocument, n: int) -> TemplateDocument:
    import msgspec

    watchers = list(doc.watchers)
    watchers[0] = msgspec.structs.replace(
        watchers[0], prompt=f"Release {n}.\n" + watchers[0].prompt
    )
    return msgspec.structs.replace(doc, watchers=watchers)


async def setup(url: URL, orgs: int) -> TemplateDocument:
    doc = load_path(ROOT / "templates" / "personal-finance")
    engine = create_engine(url)
    async with transaction(engine) as session:
        await publish(session, doc, actor=Actor.system(), source="cli")
    # Orgs and installs in bulk through the same engine, a few at a time.
    from install_service.installs.service import install
    from install_service.orgs.service import create_organization

    async def one(i: int) -> None:
        async with transaction(engine) as session:
            await create_organization(session, slug=f"bench-{i}", name=f"Bench {i}")
            await install(session, Actor.system(), template=doc.slug, organization=f"bench-{i}")

    for start in range(0, orgs, 8):
        await asyncio.gather(*(one(i) for i in range(start, min(start + 8, orgs))))
    await engine.dispose()
    return doc


def _spawn_worker(url: URL, concurrency: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "INSTALL_SERVICE_DATABASE_URL": url.render_as_string(hide_password=False)}
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "install_service", "worker", "--concurrency", str(concurrency)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def resync_with(
    url: URL, doc: TemplateDocument, release: int, workers: int, concurrency: int
) -> dict[str, Any]:
    engine = create_engine(url)
    async with transaction(engine) as session:
        await publish(session, changed(doc, release), actor=Actor.system(), source="cli")
    processes = [_spawn_worker(url, concurrency) for _ in range(workers)]
    await asyncio.sleep(2)  # workers up and idle before the clock starts
    rss_samples: list[tuple[float, int]] = []
    async with transaction(engine) as session:
        run = await resync.start_run(session, Actor.system(), doc.slug)
    async with jobs.opened(url) as queue:
        await jobs.defer_run(queue, run.id)
    started = time.perf_counter()
    while True:
        async with transaction(engine) as session:
            state = await resync.get_run(session, run.id)
        done = state.counts.total - state.counts.pending
        rss = sum(psutil.Process(p.pid).memory_info().rss for p in processes)
        rss_samples.append((done / max(state.counts.total, 1), rss))
        if state.status in resync.FINISHED:
            break
        await asyncio.sleep(0.1)
    elapsed = time.perf_counter() - started
    for p in processes:
        p.terminate()
        p.wait()
    await engine.dispose()

    def rss_at(fraction: float) -> float:
        return next(r for f, r in rss_samples if f >= fraction) / workers / 2**20

    return {
        "workers": workers,
        "concurrency": concurrency,
        "orgs": state.counts.total,
        "status": state.status,
        "seconds": round(elapsed, 2),
        "orgs_per_s": round(state.counts.total / elapsed, 1),
        "orgs_per_s_per_worker": round(state.counts.total / elapsed / workers, 1),
        "rss_mib_per_worker_at_25pct": round(rss_at(0.25), 1),
        "rss_mib_per_worker_at_100pct": round(rss_at(1.0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, bench_database(Path(tmp)) as url:
        doc = asyncio.run(setup(url, args.orgs))
        results = [
            asyncio.run(resync_with(url, doc, 2, 1, args.concurrency)),
            asyncio.run(resync_with(url, doc, 3, 2, args.concurrency)),
        ]
    keys = list(results[0])
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(str(r[k]) for k in keys))
    write_results("resync", results)


if __name__ == "__main__":
    main()
