"""Running Alembic migrations from code (CLI, start-up, tests).

The migrations ship inside the package (`install_service/migrations`), so an installed wheel
migrates a database as a checkout does; `alembic.ini` at the top of a checkout points the
`alembic` command at the same directory for writing new ones."""

from __future__ import annotations

import importlib.util
from importlib.resources import files
from pathlib import Path
from types import ModuleType

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL

from install_service.db.engine import async_url

# Installed packages are plain files (wheels are unpacked), so the resource is a directory
# Alembic can read.
MIGRATIONS = Path(str(files("install_service").joinpath("migrations")))


def alembic_config(url: str | URL) -> Config:
    """Alembic configuration pointing at the package's migrations and the given database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["database_url"] = async_url(url)
    return cfg


def upgrade(url: str | URL, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | URL, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def check(url: str | URL) -> None:
    """Raise if the models and the migrated database differ."""
    command.check(alembic_config(url))


def head_revision() -> str | None:
    """The revision the code expects the database to be at."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("postgresql:///")).get_current_head()


def current_revision(url: str | URL) -> str | None:
    """The database's revision (None before the first migration)."""
    import asyncio

    from alembic.runtime.migration import MigrationContext
    from sqlalchemy.ext.asyncio import create_async_engine

    async def read() -> str | None:
        engine = create_async_engine(async_url(url))
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: MigrationContext.configure(sync).get_current_revision()
                )
        finally:
            await engine.dispose()

    return asyncio.run(read())


def revision_module(filename: str) -> ModuleType:
    """The module of an earlier revision (its file in the versions folder), for a revision
    that replaces the SQL functions it made with ones built by the same code."""
    path = Path(str(files("install_service") / "migrations" / "versions" / filename))
    spec = importlib.util.spec_from_file_location(f"install_service_revision_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
