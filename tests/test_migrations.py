"""Migrations: round trip on a populated database, and models equal to migrations."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.engine import URL

from install_service.db import migrate
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.installs import invariants
from install_service.installs import service as installs
from install_service.testing import make_user, publish_template
from tests.conftest import TABLES, small_doc


async def _populate(url: URL) -> None:
    engine = create_engine(url)
    try:
        await publish_template(engine, small_doc())
        actor, _, _ = await make_user(engine)
        async with transaction(engine) as session:
            await installs.install(session, actor, template="starter")
    finally:
        await engine.dispose()


async def _tables(url: URL) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            )
            return set(result.scalars())
    finally:
        await engine.dispose()


def test_round_trip_on_populated_database(install_service_database_url: URL) -> None:
    url = install_service_database_url
    asyncio.run(_populate(url))
    migrate.downgrade(url, "base")
    assert asyncio.run(_tables(url)) <= {"alembic_version"}
    migrate.upgrade(url)
    assert set(TABLES) <= asyncio.run(_tables(url))
    asyncio.run(_populate(url))
    migrate.check(url)


async def _release_items(url: URL) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Every release item (kind, slug, hash) and every invariant violation."""
    engine = create_engine(url)
    try:
        async with transaction(engine) as session:
            rows = await session.execute(
                text("SELECT kind, slug, content_hash FROM template_release_items ORDER BY 1, 2")
            )
            items = [tuple(row) for row in rows]
            found = [v.detail for v in await invariants.check(session)]
        return items, found
    finally:
        await engine.dispose()


def test_release_items_are_backfilled_from_snapshots(install_service_database_url: URL) -> None:
    url = install_service_database_url
    asyncio.run(_populate(url))
    written, _ = asyncio.run(_release_items(url))
    assert len(written) == 7  # small_doc: 2 entity types, 3 relationship types, 1 + 1
    migrate.downgrade(url, "0002")
    migrate.upgrade(url)
    assert asyncio.run(_release_items(url)) == (written, [])


def test_models_match_migrations(install_service_database_url: URL) -> None:
    migrate.check(install_service_database_url)
