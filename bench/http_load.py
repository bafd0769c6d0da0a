"""HTTP install throughput: the real server under 1, 8 and 32 concurrent clients.

    uv run python -m bench.http_load [--installs 200] [--clients 1,8,32]

Starts `install-service serve` as its own process on a fresh database, then from this process
(the load generator) installs personal-finance into fresh orgs through `POST /api/v1/installs`
with N clients at once, after warming every connection: installs/s, p50 and p99 ms, and the
CPU each install cost PostgreSQL (all its processes), the server process and the load
generator, read from /proc before and after. Beside
each figure, the single-statement floor from `bench.install` doing the same installs over N
direct database connections. Every request must answer 201 and every org must end up
installed; the run fails otherwise.
Prints a table and writes bench/results/http.json. Figures, not tests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import text
from sqlalchemy.engine import URL

from bench import (
    CpuMeter,
    bench_database,
    per_unit_ms,
    personal_finance,
    postmaster,
    write_results,
)
from bench.install import FLOOR_SQL, connect_floor, floor_args
from install_service.actor import Actor
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.orgs.service import create_organization
from install_service.releases import get_release
from install_service.templates.service import publish
from install_service.testing import serving

TOKEN = "bench-admin-token"  # noqa: S105
TEMPLATE = "personal-finance"
WARM_UP_PER_CONNECTION = 6
SERVER_POOL = 15  # pool_size + max_overflow of install_service.db.engine.create_engine


async def publish_standalone(url: URL) -> None:
    """personal-finance's next release: one template of its own (`bench.personal_finance`),
    so an install over HTTP and the floor's copy of the release write the same rows."""
    engine = create_engine(url)
    async with transaction(engine) as session:
        await publish(session, personal_finance(), actor=Actor.system(), source="cli")
    await engine.dispose()


async def fresh_orgs(url: URL, count: int) -> list[tuple[uuid.UUID, str]]:
    engine = create_engine(url)
    orgs = []
    async with transaction(engine) as session:
        for _ in range(count):
            slug = f"h-{uuid.uuid4().hex[:12]}"
            orgs.append(((await create_organization(session, slug=slug, name=slug)).id, slug))
    await engine.dispose()
    return orgs


async def drive(
    clients: int,
    orgs: list[tuple[uuid.UUID, str]],
    install: Callable[[int, tuple[uuid.UUID, str]], Awaitable[None]],
) -> dict[str, Any]:
    """Install into every org with `clients` concurrent workers; throughput and latency."""
    queue = list(orgs)
    latencies: list[float] = []

    async def worker(n: int) -> None:
        while queue:
            org = queue.pop()
            started = time.perf_counter()
            await install(n, org)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "installs_per_s": round(len(orgs) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
    }


def meter_for(server: psutil.Process | None, postgres: psutil.Process) -> CpuMeter:
    """CPU of PostgreSQL (every backend), the service's process (with its children) and this
    load-generating process, from /proc."""
    groups = {"postgres": (postgres, True), "load_generator": (psutil.Process(), False)}
    if server is not None:
        groups["server"] = (server, True)
    return CpuMeter(groups)


def server_process(base: str) -> psutil.Process:
    """The `install-service serve` process this run started for `base`."""
    port = base.rsplit(":", 1)[1]
    for child in psutil.Process().children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "serve" in command and port in command:
            return child
    raise RuntimeError(f"no server of this run listens on port {port}")


async def over_http(
    url: URL, base: str, clients: int, orgs: list[tuple[uuid.UUID, str]]
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    # A generous timeout: under overload a request's wait is the figure, not a failure.
    async with httpx.AsyncClient(
        base_url=base, limits=limits, headers=headers, timeout=120
    ) as client:

        async def install(_: int, org: tuple[uuid.UUID, str]) -> None:
            response = await client.post(
                "/api/v1/installs", json={"template": TEMPLATE, "organization": org[1]}
            )
            if response.status_code != 201:
                raise RuntimeError(f"install into {org[1]}: {response.status_code} {response.text}")

        meter = meter_for(server_process(base), await postmaster(url))
        return await drive(clients, orgs, install) | {
            "cpu_ms_per_install": per_unit_ms(meter.since(), len(orgs))
        }


async def floor(url: URL, clients: int, orgs: list[tuple[uuid.UUID, str]]) -> dict[str, Any]:
    engine = create_engine(url)
    async with transaction(engine) as session:
        release = await get_release(session, Actor.system(), TEMPLATE)
    await engine.dispose()
    connections = [await connect_floor(url) for _ in range(clients)]

    async def install(n: int, org: tuple[uuid.UUID, str]) -> None:
        await connections[n].execute(FLOOR_SQL, *floor_args(org[0], release))

    try:
        # Each connection plans a prepared statement afresh for its first five executions
        # (PostgreSQL's rule) before settling on a generic plan: warm them all, untimed.
        await drive(clients, await fresh_orgs(url, clients * WARM_UP_PER_CONNECTION), install)
        meter = meter_for(None, await postmaster(url))
        return await drive(clients, orgs, install) | {
            "cpu_ms_per_install": per_unit_ms(meter.since(), len(orgs))
        }
    finally:
        for conn in connections:
            await conn.close()


async def installed(url: URL, orgs: list[tuple[uuid.UUID, str]]) -> int:
    engine = create_engine(url)
    async with transaction(engine) as session:
        count = await session.scalar(
            text("""
                SELECT count(DISTINCT a.organization_id) FROM agents a
                WHERE a.organization_id = ANY(:orgs) AND a.template_agent_id IS NOT NULL
                  AND a.installed_release_id IS NOT NULL"""),
            {"orgs": [org_id for org_id, _ in orgs]},
        )
    await engine.dispose()
    return int(count or 0)


async def measure(url: URL, base: str, clients: int, count: int) -> dict[str, Any]:
    row: dict[str, Any] = {"clients": clients, "installs": count}
    for name, run in (("http", lambda o: over_http(url, base, clients, o)), ("floor", None)):
        orgs = await fresh_orgs(url, count)
        row[name] = await (run(orgs) if run else floor(url, clients, orgs))
        done = await installed(url, orgs)
        if done != count:
            raise RuntimeError(f"{name}: {done} of {count} orgs installed")
    row["http/floor"] = round(row["http"]["installs_per_s"] / row["floor"]["installs_per_s"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--installs", type=int, default=200)
    parser.add_argument("--clients", default="1,8,32")
    args = parser.parse_args()
    levels = [int(x) for x in args.clients.split(",")]
    results = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        bench_database(Path(tmp)) as url,
        serving(url, admin_token=TOKEN, log=Path(tmp) / "serve.log") as base,
    ):
        asyncio.run(publish_standalone(url))
        # Warm every pooled connection of the server the same way, untimed.
        warm = asyncio.run(fresh_orgs(url, SERVER_POOL * WARM_UP_PER_CONNECTION * 2))
        asyncio.run(over_http(url, base, SERVER_POOL, warm))
        for clients in levels:
            count = max(args.installs // 4, 25) if clients == 1 else args.installs
            results.append(asyncio.run(measure(url, base, clients, count)))
    print(
        "clients | installs | HTTP installs/s | HTTP p50/p99 ms | floor installs/s | "
        "floor p50/p99 ms | HTTP/floor | HTTP CPU ms per install: PostgreSQL / server / load "
        "generator | floor CPU ms per install: PostgreSQL / load generator"
    )
    for r in results:
        h, f = r["http"], r["floor"]
        hc, fc = h["cpu_ms_per_install"], f["cpu_ms_per_install"]
        print(
            f"{r['clients']} | {r['installs']} | {h['installs_per_s']} | {h['p50_ms']}/"
            f"{h['p99_ms']} | {f['installs_per_s']} | {f['p50_ms']}/{f['p99_ms']} | "
            f"{r['http/floor']} | {hc['postgres']} / {hc['server']} / {hc['load_generator']} | "
            f"{fc['postgres']} / {fc['load_generator']}"
        )
    write_results("http", results)


if __name__ == "__main__":
    main()
