"""Webhook delivery: throughput and the lag from commit to delivery, against a real receiver.

    uv run python -m bench.webhooks [--events 2000] [--lanes 1,50] [--installs 50]

A threaded HTTP receiver on a loopback port verifies every signature (the standardwebhooks
library) and notes when each message arrives. One `install-service worker` process (4 jobs at
a time) delivers.

- Lag: personal-finance is installed into fresh orgs one at a time with the worker idle; for
  each install, the time from its commit to its event arriving at the receiver.
- Throughput: N events are written across L organizations (lanes; each lane is sent in order,
  one at a time) with no worker running; then a worker starts and the time from the first
  arrival to the last gives deliveries per second.

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import URL
from standardwebhooks.webhooks import Webhook

from bench import ROOT, bench_database, write_results
from install_service.actor import Actor
from install_service.config import WebhookSettings
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.events import outbox, webhooks
from install_service.events.schemas import WebhookCreate
from install_service.installs.service import install
from install_service.orgs.service import create_organization
from install_service.templates.documents import load_path
from install_service.templates.service import publish

CONCURRENCY = 4


class Receiver:
    def __init__(self) -> None:
        self.secret = ""
        self.arrived: dict[str, float] = {}
        self.bad = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                at = time.monotonic()
                try:
                    Webhook(receiver.secret).verify(body, dict(self.headers.items()))
                    with receiver.lock:
                        receiver.arrived.setdefault(self.headers["webhook-id"], at)
                    status = 200
                except Exception:
                    with receiver.lock:
                        receiver.bad += 1
                    status = 400
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"


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


async def _wait_for(receiver: Receiver, ids: set[str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with receiver.lock:
            if ids <= receiver.arrived.keys():
                return
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{len(ids - receiver.arrived.keys())} event(s) never arrived")


async def setup(url: URL, receiver: Receiver) -> None:
    engine = create_engine(url)
    async with transaction(engine) as session:
        await publish(
            session,
            load_path(ROOT / "templates" / "personal-finance"),
            actor=Actor.system(),
            source="cli",
        )
        endpoint = await webhooks.create_endpoint(
            session,
            Actor.system(),
            WebhookCreate(url=receiver.url),
            WebhookSettings(allow_private=True),
        )
    receiver.secret = endpoint.secret
    await engine.dispose()


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
        worker.terminate()
        worker.wait()
        await engine.dispose()
    lags.sort()
    return {
        "measure": "commit to delivery",
        "installs": installs,
        "lag_ms_p50": round(statistics.median(lags), 1),
        "lag_ms_p95": round(lags[int(len(lags) * 0.95) - 1], 1),
        "lag_ms_max": round(lags[-1], 1),
    }


async def throughput(url: URL, receiver: Receiver, events: int, lanes: int) -> dict[str, Any]:
    engine = create_engine(url)
    orgs = []
    async with transaction(engine) as session:
        for n in range(lanes):
            org = await create_organization(session, slug=f"lane-{lanes}-{n}", name=f"Lane {n}")
            orgs.append(org.id)
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
        await _wait_for(receiver, ids, 600)
    finally:
        worker.terminate()
        worker.wait()
    arrivals = sorted(receiver.arrived[i] for i in ids)
    seconds = arrivals[-1] - arrivals[0]
    return {
        "measure": "throughput",
        "events": events,
        "lanes": lanes,
        "worker_jobs": CONCURRENCY,
        "seconds": round(seconds, 2),
        "deliveries_per_s": round((events - 1) / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--lanes", default="1,50")
    parser.add_argument("--installs", type=int, default=50)
    args = parser.parse_args()
    receiver = Receiver()
    results = []
    with tempfile.TemporaryDirectory() as tmp, bench_database(Path(tmp)) as url:
        asyncio.run(setup(url, receiver))
        results.append(asyncio.run(lag(url, receiver, args.installs)))
        for lanes in (int(n) for n in args.lanes.split(",")):
            results.append(asyncio.run(throughput(url, receiver, args.events, lanes)))
    receiver.server.shutdown()
    if receiver.bad:
        raise SystemExit(f"{receiver.bad} request(s) failed signature verification")
    for r in results:
        print(" | ".join(f"{k}={v}" for k, v in r.items()))
    write_results("webhooks", results)


if __name__ == "__main__":
    main()
