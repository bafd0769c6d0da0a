"""Alembic environment: async engine, URL from the service's own settings."""

import asyncio

from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from install_service.config import Settings
from install_service.db.engine import resolve_database_url
from install_service.db.models import Base

config = context.config
target_metadata = Base.metadata


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """procrastinate's own tables are created by a migration but are not our models."""
    return not (type_ == "table" and name is not None and name.startswith("procrastinate_"))


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=include_name,
        transaction_per_migration=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


# Held for the whole run, so processes migrating one database at the same time (several
# `serve` starting together) take turns: the first migrates, the others find it at head.
MIGRATION_LOCK = text("SELECT pg_advisory_lock(hashtext('install-service:migrations'))")
MIGRATION_UNLOCK = text("SELECT pg_advisory_unlock(hashtext('install-service:migrations'))")


async def run_async_migrations() -> None:
    url = config.attributes.get("database_url") or resolve_database_url(Settings.from_env())
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execute(MIGRATION_LOCK)
            await connection.commit()  # a session lock: it outlives this transaction
            try:
                await connection.run_sync(do_run_migrations)
            finally:
                await connection.rollback()  # whatever a failed migration left open
                await connection.execute(MIGRATION_UNLOCK)
                await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported")
asyncio.run(run_async_migrations())
