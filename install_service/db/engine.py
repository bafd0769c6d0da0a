"""Choosing the PostgreSQL server and building the async engine for it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from install_service.config import Settings
from install_service.db import embedded

log = logging.getLogger(__name__)

DATABASE_NAME = "install_service"
CONNECT_TIMEOUT_SECONDS = 5
POOL_TIMEOUT_SECONDS = 10
POOL_RECYCLE_SECONDS = 1800
_SYNC_DRIVERS = {"postgres", "postgresql", "postgresql+asyncpg", "postgresql+psycopg"}


def async_url(url: str | URL) -> URL:
    """Accept `postgresql://` (TCP or `?host=/socket/dir`) and return the asyncpg form."""
    parsed = make_url(url)
    if parsed.drivername not in _SYNC_DRIVERS:
        raise ValueError(
            f"unsupported database URL scheme {parsed.drivername!r}: use postgresql://"
        )
    return parsed.set(drivername="postgresql+asyncpg")


def asyncpg_dsn(url: str | URL) -> str:
    """The same server as a plain libpq-style DSN, for direct asyncpg connections."""
    return async_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def start_embedded(data_dir: Path) -> URL:
    """Start (or join) the embedded PostgreSQL under `data_dir` and return the service's URL.

    The server is shared with every other process using `data_dir` and stops when the last
    of them exits (see `install_service.db.embedded`). The service's database is created on
    first use.
    """
    base = async_url(embedded.start(data_dir))
    asyncio.run(ensure_database(base, DATABASE_NAME))
    return base.set(database=DATABASE_NAME)


async def ensure_database(server_url: URL, name: str, *, template: str | None = None) -> None:
    """Create database `name` on the server if it does not exist yet."""
    conn = await asyncpg.connect(asyncpg_dsn(server_url.set(database="postgres")))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            ident = '"' + name.replace('"', '""') + '"'
            clause = ' TEMPLATE "' + template.replace('"', '""') + '"' if template else ""
            await conn.execute(f"CREATE DATABASE {ident}{clause}")
            log.info("created database %s", name)
    finally:
        await conn.close()


def resolve_database_url(settings: Settings) -> URL:
    """`INSTALL_SERVICE_DATABASE_URL` if set, else the embedded server's URL."""
    if settings.database_url:
        return async_url(settings.database_url)
    return start_embedded(settings.data_dir)


def connect_args() -> dict[str, Any]:
    """asyncpg's settings for every connection of the service's pools (direct connections,
    such as the benchmarks' floor, use the same)."""
    return {
        "timeout": CONNECT_TIMEOUT_SECONDS,
        "command_timeout": 60,
        # No JIT compilation: the service's statements run for milliseconds, while the plans
        # of many orgs at once (whose row estimates multiply through their joins) looked
        # costly enough to compile on every run, which took seconds (a fleet dry run over
        # 10,000 installs on a server built with JIT: 4.1 to 4.5 s, against 1.9 to 2.0 s
        # without).
        "server_settings": {"jit": "off"},
    }


def create_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """An asyncpg engine with the pool settings the service uses everywhere.

    Connecting and waiting for a pooled connection are bounded, so a request fails fast when
    the database is down instead of hanging; statements are bounded by `command_timeout`.
    """
    options: dict[str, Any] = {
        "pool_size": 10,
        "max_overflow": 5,
        "pool_timeout": POOL_TIMEOUT_SECONDS,
        # No ping per checkout (a round trip on every transaction): a connection found dead
        # fails its request with a 503 and SQLAlchemy then replaces every pooled connection.
        "pool_recycle": POOL_RECYCLE_SECONDS,
        "connect_args": connect_args(),
    }
    options.update(kwargs)
    return create_async_engine(async_url(url), **options)
