"""Shared fixtures and factories. The database fixtures come from install_service.testing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.cli import main
from install_service.db.engine import asyncpg_dsn
from install_service.db.session import transaction
from install_service.events import outbox
from install_service.installs import invariants
from install_service.testing import (
    leftover_postgres,
    make_user,
    scaled_template,
    serving,
    started_data_dirs,
)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "install_service" / "templates" / "bundled"

# Every table the service writes, for "the database is unchanged" checks.
TABLES = (
    "organizations",
    "users",
    "memberships",
    "api_tokens",
    "agents",
    "template_releases",
    "template_release_items",
    "install_events",
    "entity_types",
    "entity_relationship_types",
    "entity_relationship_type_rules",
    "watchers",
    "watcher_versions",
    "event_classifiers",
    "event_classifier_versions",
    "events",
    "webhook_endpoints",
    "webhook_deliveries",
    "webhook_attempts",
    "console_sessions",
    "audit_log",
)


@pytest.fixture
async def engine(
    install_service_engine: AsyncEngine, request: pytest.FixtureRequest
) -> AsyncIterator[AsyncEngine]:
    """The test's database; afterwards every invariant must still hold, whatever the test did
    (unless it breaks one on purpose and says so with `allow_violations`)."""
    yield install_service_engine
    if request.node.get_closest_marker("allow_violations"):
        return
    async with transaction(install_service_engine) as session:
        violations = await invariants.check(session)
    assert violations == [], violations


async def dump(engine: AsyncEngine) -> dict[str, list[str]]:
    """Every row of every table (with its xmin, so rewrites show), for before/after equality."""
    async with engine.connect() as conn:
        out = {}
        for table in TABLES:
            rows = await conn.execute(
                text(f"SELECT t.xmin::text || ' ' || to_jsonb(t)::text FROM {table} t ORDER BY 1")
            )
            out[table] = list(rows.scalars())
        return out


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def emit_event(session: Any, organization_id: uuid.UUID) -> uuid.UUID:
    """The smallest event there is (`install.reconciled`, nothing listed), in `session`'s
    transaction; its id."""
    return await outbox.emit(
        session,
        organization_id=organization_id,
        type="install.reconciled",
        template="starter",
        from_release=None,
        to_release=None,
        items=[],
    )


@contextlib.asynccontextmanager
async def older_transaction(url: URL) -> AsyncIterator[None]:
    """A transaction with an id, open on the database at `url` while the block runs."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_current_xact_id()")
            yield
    finally:
        await conn.close()


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def waits_for_a_lock(engine: AsyncEngine, task: asyncio.Future[Any]) -> None:
    """Return once a session on the test's database waits for a lock, as `task` is expected
    to (it must not have finished by then); fail after ten seconds."""
    deadline = time.monotonic() + 10
    while not await scalar(
        engine,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'",
    ):
        assert not task.done(), f"finished instead of waiting for a lock: {task}"
        assert time.monotonic() < deadline, "nothing waits for a lock"
        await asyncio.sleep(0.02)
    assert not task.done()


async def install_ids(engine: AsyncEngine, org: Any) -> dict[str, Any]:
    """The installs in `org`, by template slug."""
    found = await rows(
        engine,
        """SELECT q.slug, a.id FROM agents a JOIN agents t ON t.id = a.template_agent_id
           JOIN organizations q ON q.id = t.organization_id
           WHERE a.organization_id = :org""",
        org=org,
    )
    return {r.slug: r.id for r in found}


async def execute(engine: AsyncEngine, sql: str, **params: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(sql), params)


def small_doc(slug: str = "starter", **overrides: Any) -> dict[str, Any]:
    """A complete little template: every kind and every kind of reference."""
    doc: dict[str, Any] = {
        "slug": slug,
        "name": f"{slug.title()} template",
        "description": "A template for tests.",
        "entity_types": [
            {
                "slug": "person",
                "name": "Person",
                "metadata_schema": {"type": "object", "properties": {"age": {"type": "integer"}}},
                "event_kinds": ["met"],
            },
            {"slug": "company", "name": "Company", "icon": "building", "color": "#123456"},
        ],
        "relationship_types": [
            {
                "slug": "employed_by",
                "name": "Employed by",
                "inverse": "employs",
                "rules": [{"source": "person", "target": "company"}],
            },
            {
                "slug": "employs",
                "name": "Employs",
                "inverse": "employed_by",
                "rules": [{"source": "company", "target": "person"}],
            },
            {
                "slug": "knows",
                "name": "Knows",
                "is_symmetric": True,
                "rules": [{"source": "person", "target": "person"}],
            },
        ],
        "watchers": [
            {
                "slug": "inbox",
                "name": "Inbox",
                "schedule": "*/30 * * * *",
                "prompt": "Find people and companies.",
                "extraction_schema": {"type": "object"},
                "sources_schema": {"type": "object"},
                "reactions_guidance": "Link people to companies.",
            }
        ],
        "classifiers": [
            {
                "slug": "seniority",
                "name": "Seniority",
                "attribute_key": "seniority",
                "entity_type": "person",
                "watcher": "inbox",
                "attribute_values": {"junior": "Early career", "senior": "Experienced"},
                "fallback_value": "junior",
                "extraction_config": {"instructions": "Judge from the title."},
            }
        ],
    }
    doc.update(overrides)
    return doc


def scaled_doc(factor: int, slug: str = "scaled") -> dict[str, Any]:
    """`small_doc` repeated `factor` times with suffixed slugs: the same shape, more rows."""
    return scaled_template(small_doc(slug), factor, slug)


@pytest.fixture
def url(install_service_database_url: URL) -> URL:
    return install_service_database_url


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; whichever still runs is stopped afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=20)


@pytest.fixture
async def owner(engine: AsyncEngine) -> Any:
    """A user and their personal org (where installs land by default)."""
    actor, _user, _token = await make_user(engine)
    return actor


SERVER_TOKEN = "server-test-admin-token"  # noqa: S105


@pytest.fixture
def server(install_service_database_url: URL, tmp_path: Path) -> Iterator[str]:
    """`install-service serve` on a loopback port, on this test's database."""
    with serving(
        install_service_database_url, admin_token=SERVER_TOKEN, log=tmp_path / "serve.log"
    ) as base:
        yield base


Cli = Callable[..., Any]


class Ran:
    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr

    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture
def cli(install_service_database_url: URL, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """Run `install-service ARGS...` in-process on this test's database, printing as into a
    pipe (a test that wants a terminal's width sets COLUMNS itself: parallel workers set it)."""
    monkeypatch.setenv(
        "INSTALL_SERVICE_DATABASE_URL",
        install_service_database_url.render_as_string(hide_password=False),
    )
    monkeypatch.delenv("COLUMNS", raising=False)
    runner = CliRunner()
    sigterm = signal.getsignal(signal.SIGTERM)

    def invoke(*args: str) -> Ran:
        result = runner.invoke(main, list(args), catch_exceptions=False)
        return Ran(result.exit_code, result.stdout, result.stderr)

    yield invoke
    signal.signal(signal.SIGTERM, sigterm)


# Where this run created PostgreSQL data directories, besides the plugin's own.
_DATA_ROOTS: list[Path] = []


@pytest.fixture
def data_root() -> Iterator[Path]:
    """A directory for an embedded PostgreSQL's data. Not under tmp_path: as root the server
    runs as another user, and a pytest session starting meanwhile (any project's) closes
    the permissions of the shared pytest temporary root again."""
    with tempfile.TemporaryDirectory(prefix="install-service-test-") as directory:
        _DATA_ROOTS.append(Path(directory))
        yield Path(directory)


# Servers that parallel workers reported still running at their end (see below).
_LEFT_BY_WORKERS: list[str] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """A parallel worker ended: keep what it found still running, for the session's end."""
    _LEFT_BY_WORKERS.extend(node.workeroutput.get("leftover_postgres", []))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The run fails if a PostgreSQL whose data directory it created outlives it (a server
    that is stopping gets a few seconds). A parallel worker checks its own servers and hands
    what it found to the controlling process, which fails the run."""
    roots = [*_DATA_ROOTS, *started_data_dirs]
    deadline = time.monotonic() + 5
    while (left := leftover_postgres(roots)) and time.monotonic() < deadline:
        time.sleep(0.2)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["leftover_postgres"] = left
        return
    left += _LEFT_BY_WORKERS
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(
                "PostgreSQL servers started by this run are still running:\n  " + "\n  ".join(left),
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
