"""`install-service serve` as an operator runs it: restarts revert nothing, several processes
start together, and the embedded PostgreSQL lives exactly as long as the processes using it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.db.engine import create_engine, ensure_database
from install_service.db.migrate import head_revision
from install_service.db.session import transaction
from install_service.orgs.service import ensure_admin
from install_service.templates import documents
from install_service.templates import service as templates
from install_service.testing import bearer, leftover_postgres, publish_template, serving
from tests.conftest import SERVER_TOKEN, TEMPLATES, rows, scalar

BUNDLED = sorted(path.name for path in TEMPLATES.iterdir() if path.is_dir())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Serve:
    """One `install-service serve` process, its port and its output."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(  # noqa: S603 (our own entry point)
                [sys.executable, "-m", "install_service", "serve", "--port", str(self.port)],
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, within: float = 90) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready within {within} s:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=30)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def embedded_env(data_root: Path) -> dict[str, str]:
    """`serve` on an embedded PostgreSQL of its own (even when the suite runs on another
    server), its data under `data_root`."""
    return {
        "INSTALL_SERVICE_DATABASE_URL": "",
        "INSTALL_SERVICE_DATA_DIR": str(data_root),
        "INSTALL_SERVICE_ADMIN_TOKEN": SERVER_TOKEN,
    }


def _wait_for_no_postgres(root: Path, within: float) -> float:
    started = time.monotonic()
    while leftover_postgres([root]):
        assert time.monotonic() - started < within, leftover_postgres([root])
        time.sleep(0.05)
    return time.monotonic() - started


class TestSeeding:
    def test_restart_keeps_a_release_published_through_the_api(
        self, install_service_database_url: URL, tmp_path: Path
    ) -> None:
        url = install_service_database_url
        edited = yaml.safe_load((TEMPLATES / "personal-finance" / "template.yaml").read_text())
        edited["description"] = "Published by an admin after the first start."
        with serving(url, admin_token=SERVER_TOKEN, log=tmp_path / "first.log") as base:
            published = httpx.put(
                f"{base}/api/v1/admin/templates/personal-finance",
                json=edited,
                headers=bearer(SERVER_TOKEN),
            )
            assert published.status_code == 201, published.text
            assert published.json()["version"] == 2
        with serving(url, admin_token=SERVER_TOKEN, log=tmp_path / "second.log") as base:
            releases = httpx.get(f"{base}/api/v1/templates/personal-finance/releases").json()[
                "items"
            ]
            manifest = httpx.get(f"{base}/api/v1/templates/personal-finance").json()
        assert [(r["version"], r["source"]) for r in releases] == [(1, "seed"), (2, "api")]
        assert manifest["description"] == edited["description"]
        said = [json.loads(line) for line in (tmp_path / "second.log").read_text().splitlines()]
        kept = [line for line in said if line.get("template") == "personal-finance"]
        assert kept[0]["source"] == "api"
        assert "not applied" in kept[0]["event"]

    async def test_bundled_content_is_followed_until_someone_else_publishes(
        self, engine: AsyncEngine
    ) -> None:
        bundled = documents.load_path(TEMPLATES / "sales-crm")

        async def seed(description: str) -> Any:
            changed = documents.parse(
                {
                    **yaml.safe_load((TEMPLATES / "sales-crm" / "template.yaml").read_text()),
                    "description": description,
                }
            )
            async with transaction(engine) as session:
                return await templates.seed(session, changed)

        # sales-crm builds on business-core, which is seeded first (as `serve` does).
        async with transaction(engine) as session:
            core = await templates.seed(session, documents.load_path(TEMPLATES / "business-core"))
        assert (core.action, core.version) == ("published", 1)
        async with transaction(engine) as session:
            first = await templates.seed(session, bundled)
        assert (first.action, first.version) == ("published", 1)
        async with transaction(engine) as session:
            again = await templates.seed(session, bundled)
        assert (again.action, again.version) == ("unchanged", 1)
        assert (await seed("A newer bundled copy")).action == "published"

        await publish_template(
            engine,
            {
                **yaml.safe_load((TEMPLATES / "sales-crm" / "template.yaml").read_text()),
                "description": "Published from the command line",
            },
            source="cli",
        )
        kept = await seed("An even newer bundled copy")
        assert (kept.action, kept.version, kept.source) == ("kept", 3, "cli")
        assert await rows(
            engine,
            """SELECT r.version, r.source FROM template_releases r
               JOIN agents a ON a.id = r.template_agent_id
               JOIN organizations o ON o.id = a.organization_id
               WHERE o.slug = 'sales-crm' ORDER BY r.version""",
        ) == [(1, "seed"), (2, "seed"), (3, "cli")]
        assert (
            await scalar(
                engine,
                "SELECT a.description FROM agents a JOIN organizations o "
                "ON o.id = a.organization_id WHERE o.slug = 'sales-crm' AND a.is_template",
            )
            == "Published from the command line"
        )


class TestConcurrentStart:
    async def test_admin_bootstrap_run_at_once_makes_one_admin_and_one_token(
        self, engine: AsyncEngine
    ) -> None:
        async def bootstrap() -> str | None:
            async with transaction(engine) as session:
                return await ensure_admin(session, None)

        shown = await asyncio.gather(*(bootstrap() for _ in range(8)))
        assert len([token for token in shown if token]) == 1
        assert await scalar(engine, "SELECT count(*) FROM users") == 1
        assert await scalar(engine, "SELECT count(*) FROM api_tokens") == 1

    def test_three_processes_on_one_empty_database_all_become_ready(
        self, install_service_server_url: URL, tmp_path: Path
    ) -> None:
        name = f"install_service_empty_{os.getpid()}_{time.monotonic_ns()}"
        asyncio.run(ensure_database(install_service_server_url, name))
        url = install_service_server_url.set(database=name)
        env = {
            "INSTALL_SERVICE_DATABASE_URL": url.render_as_string(hide_password=False),
            "INSTALL_SERVICE_ADMIN_TOKEN": SERVER_TOKEN,
        }
        servers = [Serve(env, tmp_path / f"serve-{n}.log") for n in range(3)]
        try:
            for server in servers:
                server.wait_ready()
            for server in servers:
                answer = httpx.get(f"{server.base}/api/v1/templates", headers=bearer(SERVER_TOKEN))
                assert answer.status_code == 200
        finally:
            codes = [server.stop() for server in servers]
        assert codes == [0, 0, 0]
        for server in servers:
            assert "Traceback" not in server.log.read_text()

        async def facts() -> tuple[Any, ...]:
            engine = create_engine(url)
            try:
                return (
                    await scalar(engine, "SELECT version_num FROM alembic_version"),
                    await rows(
                        engine,
                        """SELECT o.slug, count(*) FROM template_releases r
                           JOIN agents a ON a.id = r.template_agent_id
                           JOIN organizations o ON o.id = a.organization_id
                           GROUP BY o.slug ORDER BY o.slug""",
                    ),
                    await scalar(engine, "SELECT count(*) FROM users"),
                )
            finally:
                await engine.dispose()

        revision, releases, users = asyncio.run(facts())
        assert revision == head_revision()
        assert releases == [(slug, 1) for slug in BUNDLED]
        assert users == 1


class TestEmbeddedDatabaseLifetime:
    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
    def test_a_signal_stops_serve_and_its_database(
        self, embedded_env: dict[str, str], data_root: Path, tmp_path: Path, sig: int
    ) -> None:
        server = Serve(embedded_env, tmp_path / "serve.log")
        try:
            server.wait_ready()
            assert leftover_postgres([data_root])
            server.process.send_signal(sig)
            seconds = _wait_for_no_postgres(data_root, within=30)
        finally:
            code = server.stop()
        output = server.log.read_text()
        assert code == 0, output
        assert "Traceback" not in output
        assert all(json.loads(line)["level"] for line in output.splitlines())
        print(f"{signal.Signals(sig).name}: no postgres left after {seconds:.2f} s")

    def test_processes_sharing_a_data_directory_share_its_server(
        self, embedded_env: dict[str, str], data_root: Path, tmp_path: Path
    ) -> None:
        first = Serve(embedded_env, tmp_path / "first.log")
        second = third = None
        try:
            first.wait_ready()
            second = Serve(embedded_env, tmp_path / "second.log")
            second.wait_ready()
            third = Serve(embedded_env, tmp_path / "third.log")
            third.wait_ready()
            servers = leftover_postgres([data_root])
            assert len(servers) == 1

            # One user dies without a word; one leaves properly: the server stays up for the
            # third, which still answers.
            first.process.kill()
            first.process.wait(timeout=10)
            assert second.stop() == 0
            assert leftover_postgres([data_root]) == servers
            answer = httpx.get(f"{third.base}/api/v1/templates", timeout=10)
            assert answer.status_code == 200

            # The last one to leave stops it.
            assert third.stop() == 0
            _wait_for_no_postgres(data_root, within=30)
        finally:
            for server in (first, second, third):
                if server is not None:
                    server.stop()
