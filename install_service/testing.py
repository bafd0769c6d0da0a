"""pytest plugin: a real, migrated PostgreSQL for tests of install-service and its users.

Registered as the `install_service` pytest11 entry point, so any project that installs
install-service as a test dependency gets these fixtures:

- `install_service_server_url`: one PostgreSQL server for the whole session: the one named by
  `INSTALL_SERVICE_DATABASE_URL`, or an embedded server in a temporary directory;
- `install_service_database_url`: a fresh database for each test, cloned from a database
  migrated once per session (`install_service_template_database`), so isolation costs a
  `CREATE DATABASE`, not a server start;
- `install_service_engine`: an async engine on that database;
- `install_service_app` and `install_service_client`: the HTTP app on that database and an
  async client that drives it in-process (no port, no server start).

`serving` runs the real `install-service serve` in its own process on a loopback port, for
end-to-end tests over HTTP. `seeded_database` builds data that many tests start from once:
override `install_service_template_database` in a module or class with it, and each test
gets its own copy of what was built.

Plain async factory functions create what a test needs, each committed in its own
transaction: `make_user`, `make_org`, `add_membership`, `publish_template` (from a path, plain
data or a document Struct) and `install_template`.

Add `install-service[testing]` to your test dependencies; set `asyncio_mode = "auto"` for
pytest-asyncio (or mark your tests) and use the fixtures by name.
"""

from __future__ import annotations

import asyncio
import copy
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import asyncpg
import httpx
import psutil
import pytest

try:
    import pytest_asyncio
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("install_service.testing needs install-service[testing]") from exc
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.db import embedded, migrate
from install_service.db.engine import async_url, asyncpg_dsn, create_engine, start_embedded
from install_service.db.session import transaction
from install_service.installs import service as installs
from install_service.installs.schemas import InstallResult
from install_service.orgs.schemas import Member, Organization, UserCreated
from install_service.orgs.service import add_member, create_organization, create_user
from install_service.templates.documents import load_path, parse
from install_service.templates.schemas import ITEM_KINDS, PublishResult, TemplateDocument
from install_service.templates.service import publish

_TEMPLATE_DB = f"install_service_test_template_{os.getpid()}"
# Data directories of the embedded servers this plugin started, for `leftover_postgres`.
started_data_dirs: list[Path] = []


async def _admin(server: URL, sql: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server.set(database="postgres")))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def install_service_server_url() -> Iterator[URL]:
    """A PostgreSQL server: `INSTALL_SERVICE_DATABASE_URL`'s, or an embedded one."""
    configured = os.environ.get("INSTALL_SERVICE_DATABASE_URL")
    if configured:
        yield async_url(configured)
        return
    with tempfile.TemporaryDirectory(prefix="install-service-test-") as data_dir:
        started_data_dirs.append(Path(data_dir))
        try:
            server = start_embedded(Path(data_dir))
            # A server thrown away with its data: no write waits for the disk (a test's
            # database is cloned, written and dropped in a fraction of the time).
            for setting in ("fsync", "full_page_writes", "synchronous_commit"):
                asyncio.run(_admin(server, f"ALTER SYSTEM SET {setting} = off"))
            asyncio.run(_admin(server, "SELECT pg_reload_conf()"))
            yield server
        finally:
            embedded.release(Path(data_dir))  # stop the server before its data is removed


@pytest.fixture(scope="session")
def install_service_template_database(install_service_server_url: URL) -> Iterator[str]:
    """A database migrated to head once per session; tests get clones of it."""
    server = install_service_server_url
    asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{_TEMPLATE_DB}" WITH (FORCE)'))
    asyncio.run(_admin(server, f'CREATE DATABASE "{_TEMPLATE_DB}"'))
    migrate.upgrade(server.set(database=_TEMPLATE_DB))
    yield _TEMPLATE_DB
    asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{_TEMPLATE_DB}" WITH (FORCE)'))


T = TypeVar("T")


def _clone(name: str, template: str) -> str:
    return f'CREATE DATABASE "{name}" TEMPLATE "{template}"'


class Seeded(str, Generic[T]):
    """The name of a database `seeded_database` built, with what its build returned."""

    value: T

    def __new__(cls, name: str, value: T) -> Seeded[T]:
        seeded = super().__new__(cls, name)
        seeded.value = value
        return seeded


@contextmanager
def seeded_database(
    server: URL, template: str, build: Callable[[AsyncEngine], Awaitable[T]]
) -> Iterator[Seeded[T]]:
    """A copy of database `template` on `server` with `build` run on it once, dropped when the
    block ends. Given as a module's (or class's) `install_service_template_database`, every
    test there starts from its own copy of what `build` made, which `.value` returns:

        @pytest.fixture(scope="module")
        def install_service_template_database(
            install_service_server_url, install_service_template_database
        ):
            server, template = install_service_server_url, install_service_template_database
            with seeded_database(server, template, build) as seeded:
                yield seeded
    """
    name = f"install_service_seed_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server, _clone(name, template)))

    async def run() -> T:
        engine = create_engine(server.set(database=name))
        try:
            return await build(engine)
        finally:
            await engine.dispose()

    try:
        yield Seeded(name, asyncio.run(run()))
    finally:
        asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest_asyncio.fixture
async def install_service_database_url(
    install_service_server_url: URL, install_service_template_database: str
) -> AsyncIterator[URL]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"install_service_test_{uuid.uuid4().hex[:12]}"
    server = install_service_server_url
    await _admin(server, _clone(name, install_service_template_database))
    yield server.set(database=name)
    await _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest_asyncio.fixture
async def install_service_engine(install_service_database_url: URL) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(install_service_database_url, pool_size=20, max_overflow=40)
    yield engine
    await engine.dispose()


class _Database:
    """Which database the session's app starts on: the running test's."""

    url: URL | None = None

    def __call__(self) -> URL:
        if self.url is None:
            raise RuntimeError("the app is started outside a test's database")
        return self.url


@pytest.fixture(scope="session")
def _install_service_session_app() -> tuple[Litestar, _Database]:
    """One app per session (building one costs a quarter of a second); each test starts it
    on its own database."""
    from install_service.app import create_app

    database = _Database()
    return create_app(database), database


@pytest.fixture
def install_service_app(
    install_service_database_url: URL, _install_service_session_app: tuple[Litestar, _Database]
) -> Litestar:
    """The service's HTTP app, started on this test's database (by `install_service_client`,
    or any client that runs its start-up)."""
    app, database = _install_service_session_app
    database.url = install_service_database_url
    return app


@pytest_asyncio.fixture
async def install_service_client(
    install_service_app: Litestar,
) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """An HTTP client for the app, running its start-up and shut-down."""
    async with AsyncTestClient(app=install_service_app) as client:
        yield client


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(
    database_url: URL, *, admin_token: str, log: Path, ready_within: float = 60
) -> Iterator[str]:
    """`install-service serve` in its own process on a free loopback port and on
    `database_url`, with `admin_token` as the platform admin's token and its output in `log`.
    Yields the base URL once `/readyz` answers 200; stops the server when the block ends."""
    env = {
        **os.environ,
        "INSTALL_SERVICE_DATABASE_URL": database_url.render_as_string(hide_password=False),
        "INSTALL_SERVICE_ADMIN_TOKEN": admin_token,
    }
    port = _free_port()
    with log.open("w") as out:
        process = subprocess.Popen(  # noqa: S603 (our own entry point)
            [sys.executable, "-m", "install_service", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server was not ready within {ready_within:g} s:\n{log.read_text()}"
                )
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)


def leftover_postgres(roots: Iterable[Path]) -> list[str]:
    """Command lines of PostgreSQL servers still running with a data directory under one of
    `roots` (for a session-end check that a test run stopped every server it started)."""
    resolved = [root.resolve() for root in roots]
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if "-D" not in command[:-1] or not Path(command[0]).name.startswith("postgres"):
            continue
        data = Path(command[command.index("-D") + 1]).resolve()
        if any(data.is_relative_to(root) for root in resolved):
            found.append(" ".join(command))
    return found


def bearer(token: str) -> dict[str, str]:
    """The `Authorization` header for a token."""
    return {"Authorization": f"Bearer {token}"}


async def make_user(
    engine: AsyncEngine, email: str | None = None, *, admin: bool = False, **kw: Any
) -> tuple[Actor, UserCreated, str]:
    """A committed user with a personal org: (actor, the created user, API token)."""
    email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
    async with transaction(engine) as session:
        user = await create_user(session, email=email, is_platform_admin=admin, **kw)
    return Actor(user_id=user.id, is_platform_admin=admin), user, user.token


async def make_org(
    engine: AsyncEngine, *, owner: Actor | None = None, slug: str | None = None, **kw: Any
) -> Organization:
    """A committed team org, owned by `owner` if given."""
    async with transaction(engine) as session:
        return await create_organization(
            session,
            slug=slug or f"org-{uuid.uuid4().hex[:10]}",
            name=kw.pop("name", "Test org"),
            owner_id=owner.user_id if owner else None,
            **kw,
        )


async def publish_template(
    engine: AsyncEngine, document: TemplateDocument | dict[str, Any] | Path, **kw: Any
) -> PublishResult:
    """Publish a document (a Struct, plain data, or a path) as a platform admin; committed.
    The release records the API as its source unless `source=` says otherwise."""
    if isinstance(document, Path):
        document = load_path(document)
    elif isinstance(document, dict):
        document = parse(document)
    async with transaction(engine) as session:
        return await publish(session, document, actor=Actor.system(), **{"source": "api", **kw})


async def add_membership(
    engine: AsyncEngine, org: Organization, actor: Actor, role: str = "member"
) -> Member:
    """Make the user a member of `org` with `role` (owner, admin or member)."""
    if actor.user_id is None:
        raise ValueError("the system actor cannot be a member")
    async with transaction(engine) as session:
        return await add_member(session, organization_id=org.id, user_id=actor.user_id, role=role)


async def install_template(
    engine: AsyncEngine, actor: Actor, template: str, organization: str | None = None, **kw: Any
) -> InstallResult:
    """Install (or upgrade, with `version=`) through the same engine the API uses; committed.

    `organization` is a slug or id; omitted, the actor's personal organization. Installing the
    installed release again is answered in one round trip, with no transaction."""
    request = {"template": template, "organization": organization, **kw}
    unchanged = await installs.noop(engine, actor, **request)
    if unchanged is not None:
        return unchanged
    async with transaction(engine) as session:
        return await installs.install(session, actor, **request)


def scaled_template(doc: dict[str, Any], factor: int, slug: str | None = None) -> dict[str, Any]:
    """`doc` repeated `factor` times, slugs and every reference suffixed `-0`, `-1`, ...: the
    same shape with `factor` times the rows (for cost-against-size tests and benchmarks)."""
    out = copy.deepcopy(doc)
    out["slug"] = slug or f"{doc['slug']}-x{factor}"
    for kind in ITEM_KINDS:
        out[kind] = []
    for n in range(factor):

        def s(value: str | None, n: int = n) -> str | None:
            return None if value is None else f"{value}-{n}"

        part = copy.deepcopy(doc)
        for item in part.get("entity_types", []) + part.get("watchers", []):
            item["slug"] = s(item["slug"])
        for item in part.get("relationship_types", []):
            item["slug"], item["inverse"] = s(item["slug"]), s(item.get("inverse"))
            item["rules"] = [
                {"source": s(r["source"]), "target": s(r["target"])} for r in item["rules"]
            ]
        for item in part.get("classifiers", []):
            item["slug"] = s(item["slug"])
            item["entity_type"] = s(item.get("entity_type"))
            item["watcher"] = s(item.get("watcher"))
        for kind in ITEM_KINDS:
            out[kind] += part.get(kind, [])
    return out
