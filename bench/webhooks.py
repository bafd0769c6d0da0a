"""Webhook delivery and the change feed, against real receivers and a real server.

    uv run python -m bench.webhooks [--events 2000] [--lanes 1,50] [--installs 50]
                                    [--fleet-events 100000] [--fleet-orgs 1000]
                                    [--fleet-endpoints 3] [--cases lag,throughput,fleet,feed]

Receivers are HTTP/1.1 servers on loopback ports (asyncio and h11, in a thread of this
process) that verify every signature with the standardwebhooks library and note when each
message first arrives. One `install-service worker` process (4 jobs at a time) delivers.

- lag: personal-finance is installed into fresh orgs one at a time with the worker idle; for
  each install, the time from its commit to its event arriving at the receiver.
- throughput: N events are written across L organizations (lanes; each lane is sent in order,
  one request at a time) with no worker running; then a worker starts and the time from the
  first arrival to the last gives deliveries per second.
- fleet: the same at fleet scale, as a batched resync leaves it: E events (an upgrade's, one
  per organization per statement) over O organizations, each event wanted by every one of K
  endpoints (O x K lanes). Deliveries per second over the whole run and in its steady state
  (10% to 90% of the deliveries made), the CPU each delivery cost the worker, PostgreSQL (all
  its processes) and the receivers (this process) in the steady state, and the worker's
  resident memory at 25%, 50%, 75% and 100%.
- feed: `install-service serve` in its own process; a runner reads the whole admin feed
  (`GET /api/v1/admin/events`) and one organization's (`GET .../organizations/{org}/events`,
  the one-lane case's 2,000 events) in pages of 200, one request after another: events per
  second, and the CPU per event of the server, PostgreSQL and the runner.

Prints a table and writes bench/results/webhooks.json. Uses INSTALL_SERVICE_DATABASE_URL's
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
import threading
import time
from pathlib import Path
from typing import Any

import h11
import httpx
import psutil
from sqlalchemy import text
from sqlalchemy.engine import URL
from standardwebhooks.webhooks import Webhook

from bench import CpuMeter, bench_database, personal_finance, postmaster, write_results
from install_service.actor import Actor
from install_service.config import WebhookSettings
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.events import outbox, webhooks
from install_service.events.schemas import WebhookCreate
from install_service.installs.service import install
from install_service.orgs.service import create_organization
from install_service.templates.service import publish
from install_service.testing import serving

CONCURRENCY = 4
TOKEN = "bench-admin-token"  # noqa: S105
PAGE = 200
CASES = ("lag", "throughput", "fleet", "feed")


class Receiver:
    """An HTTP/1.1 receiver on a loopback port, in a thread of its own, keeping connections
    open; it verifies every signature and notes each message's first arrival."""

    def __init__(self) -> None:
        self.secret = ""
        self.arrived: dict[str, float] = {}
        self.bad = 0
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self.port = 0

        async def serve() -> None:
            server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            await server.serve_forever()

        threading.Thread(target=self._loop.run_until_complete, args=(serve(),), daemon=True).start()
        started.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def count(self) -> int:
        with self.lock:
            return len(self.arrived)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        signer = Webhook(self.secret)
        headers: dict[str, str] = {}
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    body = bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    at = time.monotonic()
                    try:
                        signer.verify(bytes(body), headers)
                        with self.lock:
                            self.arrived.setdefault(headers["webhook-id"], at)
                        status = 200
                    except Exception:
                        with self.lock:
                            self.bad += 1
                        status = 400
                    writer.write(
                        conn.send(
                            h11.Response(status_code=status, headers=[("content-length", "0")])
                        )
                        + conn.send(h11.EndOfMessage())
                    )
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                else:  # the client closed the connection
                    return
        except (OSError, h11.ProtocolError):
            return
        finally:
            writer.close()


def _worker(url: URL) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "INSTALL_SERVICE_DATABASE_URL": url.render_as_string(hide_password=False),
        "INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE": "true",
    }
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "install_service", "worker", "--concurrency", str(CONCURRENCY)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(worker: subprocess.Popen[bytes]) -> None:
    worker.terminate()
    worker.wait()


async def _wait_for(receiver: Receiver, ids: set[str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with receiver.lock:
            if ids <= receiver.arrived.keys():
                return
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{len(ids - receiver.arrived.keys())} event(s) never arrived")


async def _first_of(receiver: Receiver, ids: set[str]) -> None:
    while True:
        with receiver.lock:
            if receiver.arrived.keys() & ids:
                return
        await asyncio.sleep(0.005)


async def add_endpoint(url: URL, receiver: Receiver) -> None:
    engine = create_engine(url)
    async with transaction(engine) as session:
        endpoint = await webhooks.create_endpoint(
            session,
            Actor.system(),
            WebhookCreate(url=receiver.url),
            WebhookSettings(allow_private=True),
        )
    receiver.secret = endpoint.secret
    await engine.dispose()


async def setup(url: URL, receiver: Receiver) -> None:
    engine = create_engine(url)
    async with transaction(engine) as session:
        await publish(
            session,
            personal_finance(),
            actor=Actor.system(),
            source="cli",
        )
    await engine.dispose()
    await add_endpoint(url, receiver)


async def lag(url: URL, receiver: Receiver, installs: int) -> dict[str, Any]:
    engine = create_engine(url)
    worker = _worker(url)
    try:
        await asyncio.sleep(3)  # the worker up and idle
        lags: list[float] = []
        for n in range(installs):
            async with transaction(engine) as session:
                await create_organization(session, slug=f"lag-{n}", name=f"Lag {n}")
            async with transaction(engine) as session:
                await install(
                    session, Actor.system(), template="personal-finance", organization=f"lag-{n}"
                )
                event = str(
                    await session.scalar(
                        text("SELECT id FROM events ORDER BY txid DESC, seq DESC LIMIT 1")
                    )
                )
            committed = time.monotonic()
            await _wait_for(receiver, {event}, 30)
            lags.append((receiver.arrived[event] - committed) * 1000)
            await asyncio.sleep(0.05)
    finally:
        _stop(worker)
        await engine.dispose()
    lags.sort()
    return {
        "measure": "commit to delivery",
        "installs": installs,
        "lag_ms_p50": round(statistics.median(lags), 1),
        "lag_ms_p95": round(lags[int(len(lags) * 0.95) - 1], 1),
        "lag_ms_max": round(lags[-1], 1),
    }


async def _orgs(url: URL, prefix: str, count: int) -> list[Any]:
    engine = create_engine(url)
    async with transaction(engine) as session:
        found = [
            (await create_organization(session, slug=f"{prefix}-{n}", name=f"{prefix} {n}")).id
            for n in range(count)
        ]
    await engine.dispose()
    return found


async def throughput(url: URL, receiver: Receiver, events: int, lanes: int) -> dict[str, Any]:
    orgs = await _orgs(url, f"lane-{lanes}", lanes)
    engine = create_engine(url)
    ids: set[str] = set()
    for start in range(0, events, 100):
        async with transaction(engine) as session:
            for n in range(start, min(start + 100, events)):
                event = await outbox.emit(
                    session,
                    organization_id=orgs[n % lanes],
                    type="install.reconciled",
                    template="personal-finance",
                    from_release=None,
                    to_release=None,
                    items=[],
                )
                ids.add(str(event))
    await engine.dispose()
    worker = _worker(url)
    try:
        await _first_of(receiver, ids)
        # From the first arrival: the worker's start-up is not the deliveries' cost.
        meter = CpuMeter(
            {
                "postgres": (await postmaster(url), True),
                "worker": (psutil.Process(worker.pid), False),
            }
        )
        with receiver.lock:
            first = len(receiver.arrived.keys() & ids)
        await _wait_for(receiver, ids, 1200)
        spent = meter.since()
    finally:
        _stop(worker)
    arrivals = sorted(receiver.arrived[i] for i in ids)
    seconds = arrivals[-1] - arrivals[0]
    measured = events - first
    return {
        "measure": "throughput",
        "events": events,
        "lanes": lanes,
        "worker_jobs": CONCURRENCY,
        "seconds": round(seconds, 2),
        "deliveries_per_s": round((events - 1) / seconds, 1),
        "cpu_ms_per_delivery_worker": round(spent["worker"] * 1000 / measured, 3),
        "cpu_ms_per_delivery_postgres": round(spent["postgres"] * 1000 / measured, 3),
    }


# An upgrade's event (its shape as `events.outbox` writes it: the template, the releases, two
# changed items), one per organization, in one statement as a batched resync would.
_FLEET_EVENTS = """
    INSERT INTO events (type, organization_id, data)
    SELECT 'install.upgraded', o, jsonb_build_object(
        'template', 'personal-finance',
        'from_release', jsonb_build_object('id', r.id, 'version', r.version),
        'to_release', jsonb_build_object('id', r.id, 'version', r.version),
        'items', jsonb_build_array(
            jsonb_build_object('kind', 'watchers', 'slug', 'gmail-tx', 'action', 'updated',
                               'version_id', gen_random_uuid(), 'version', 2),
            jsonb_build_object('kind', 'entity_types', 'slug', 'transaction',
                               'action', 'updated')))
    FROM unnest(CAST(:orgs AS uuid[])) AS o, template_releases r
    WHERE r.id = :release"""


async def fleet(
    url: URL, receivers: list[Receiver], events: int, organizations: int
) -> dict[str, Any]:
    orgs = await _orgs(url, "fleet", organizations)
    engine = create_engine(url)
    async with transaction(engine) as session:
        release = await session.scalar(text("SELECT id FROM template_releases LIMIT 1"))
    rounds = -(-events // organizations)
    for start in range(0, rounds, 10):
        async with transaction(engine) as session:
            for _ in range(start, min(start + 10, rounds)):
                await session.execute(text(_FLEET_EVENTS), {"orgs": orgs, "release": release})
    await engine.dispose()
    written = rounds * organizations
    total = written * len(receivers)
    before = sum(r.count() for r in receivers)

    def done() -> int:
        return sum(r.count() for r in receivers) - before

    meter = CpuMeter(
        {"postgres": (await postmaster(url), True), "receivers": (psutil.Process(), False)}
    )
    worker = _worker(url)
    process = psutil.Process(worker.pid)
    meter.groups["worker"] = (process, False)
    started = time.monotonic()
    marks: dict[float, tuple[float, int, dict[str, float]]] = {}
    rss: dict[float, float] = {}
    try:
        while (made := done()) < total:
            fraction = made / total
            for mark in (0.1, 0.9):
                if fraction >= mark and mark not in marks:
                    marks[mark] = (time.monotonic(), made, meter.read())
            for mark in (0.25, 0.5, 0.75):
                if fraction >= mark and mark not in rss:
                    rss[mark] = process.memory_info().rss / 2**20
            if time.monotonic() - started > 7200:
                raise RuntimeError(f"{total - made} deliveries never arrived")
            await asyncio.sleep(0.05)
        rss[1.0] = process.memory_info().rss / 2**20
        elapsed = time.monotonic() - started
    finally:
        _stop(worker)
    (t0, n0, cpu0), (t1, n1, cpu1) = marks[0.1], marks[0.9]
    steady = n1 - n0
    spent = {k: cpu1[k] - cpu0[k] for k in cpu1}
    return {
        "measure": "fleet",
        "events": written,
        "organizations": organizations,
        "endpoints": len(receivers),
        "deliveries": total,
        "seconds": round(elapsed, 1),
        "deliveries_per_s": round(total / elapsed, 1),
        "steady_deliveries_per_s": round(steady / (t1 - t0), 1),
        "steady_cpu_ms_per_delivery_worker": round(spent["worker"] * 1000 / steady, 3),
        "steady_cpu_ms_per_delivery_postgres": round(spent["postgres"] * 1000 / steady, 3),
        "steady_cpu_ms_per_delivery_receivers": round(spent["receivers"] * 1000 / steady, 3),
        **{f"worker_rss_mib_at_{int(k * 100)}pct": round(v, 1) for k, v in sorted(rss.items())},
    }


def _server_process(base: str) -> psutil.Process:
    port = base.rsplit(":", 1)[1]
    for child in psutil.Process().children(recursive=True):
        try:
            if "serve" in child.cmdline() and port in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    raise RuntimeError(f"no server of this run listens on port {port}")


def feed(url: URL, tmp: Path, organization: str) -> list[dict[str, Any]]:
    results = []
    with serving(url, admin_token=TOKEN, log=tmp / "serve.log") as base:
        server = _server_process(base)
        paths = {
            "admin feed": "/api/v1/admin/events",
            "one organization's feed": f"/api/v1/organizations/{organization}/events",
        }
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as runner:
            runner.get("/api/v1/admin/events", params={"limit": PAGE}).raise_for_status()  # warm
            for name, path in paths.items():
                meter = CpuMeter(
                    {
                        "postgres": (asyncio.run(postmaster(url)), True),
                        "server": (server, True),
                        "runner": (psutil.Process(), False),
                    }
                )
                read, pages, cursor = 0, 0, None
                started = time.perf_counter()
                while True:
                    params: dict[str, Any] = {"limit": PAGE} | (
                        {"cursor": cursor} if cursor else {}
                    )
                    page = runner.get(path, params=params)
                    page.raise_for_status()
                    body = page.json()
                    pages += 1
                    if not body["items"]:
                        break
                    read += len(body["items"])
                    cursor = body["next_cursor"]
                elapsed = time.perf_counter() - started
                spent = meter.since()
                results.append(
                    {
                        "measure": "feed read",
                        "feed": name,
                        "events": read,
                        "page_size": PAGE,
                        "pages": pages,
                        "seconds": round(elapsed, 2),
                        "events_per_s": round(read / elapsed, 1),
                        **{
                            f"cpu_us_per_event_{k}": round(v * 1e6 / read, 1)
                            for k, v in spent.items()
                            if not k.endswith("_excluded")
                        },
                    }
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--lanes", default="1,50")
    parser.add_argument("--installs", type=int, default=50)
    parser.add_argument("--fleet-events", type=int, default=100_000)
    parser.add_argument("--fleet-orgs", type=int, default=1000)
    parser.add_argument("--fleet-endpoints", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    receivers = [Receiver()]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, bench_database(Path(tmp)) as url:
        asyncio.run(setup(url, receivers[0]))
        if "lag" in cases:
            results.append(asyncio.run(lag(url, receivers[0], args.installs)))
        lanes = [int(n) for n in args.lanes.split(",")]
        if "throughput" in cases or "feed" in cases:
            for n in lanes:
                results.append(asyncio.run(throughput(url, receivers[0], args.events, n)))
        if "fleet" in cases:
            while len(receivers) < args.fleet_endpoints:
                receivers.append(Receiver())
                asyncio.run(add_endpoint(url, receivers[-1]))
            results.append(asyncio.run(fleet(url, receivers, args.fleet_events, args.fleet_orgs)))
        if "feed" in cases:
            results += feed(url, Path(tmp), f"lane-{lanes[0]}-0")
    if any(r.bad for r in receivers):
        raise SystemExit("some requests failed signature verification")
    for r in results:
        print(" | ".join(f"{k}={v}" for k, v in r.items()))
    write_results("webhooks", results)


if __name__ == "__main__":
    main()
