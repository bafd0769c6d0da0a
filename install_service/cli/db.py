"""`db`: migrations and the invariant check."""

from __future__ import annotations

import click

from install_service.cli.base import database_url, main, run
from install_service.cli.output import emit, json_option


@main.group()
def db() -> None:
    """Database migrations and checks."""


@db.command("upgrade")
@click.argument("revision", default="head")
@json_option
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from install_service.db import migrate

    url = database_url()
    migrate.upgrade(url, revision)
    emit({"revision": migrate.current_revision(url)}, title="database", columns=["revision"])


@db.command("downgrade")
@click.argument("revision")
@json_option
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes everything)."""
    from install_service.db import migrate

    url = database_url()
    migrate.downgrade(url, revision)
    emit({"revision": migrate.current_revision(url)}, title="database", columns=["revision"])


@db.command("current")
@json_option
def db_current() -> None:
    """Show the database's revision and the one this code expects."""
    from install_service.db import migrate

    revision = migrate.current_revision(database_url())
    emit(
        {"revision": revision, "head": migrate.head_revision()},
        title="database",
        columns=["revision", "head"],
    )


@db.command("check")
@json_option
def db_check() -> None:
    """Check installed data against the service's invariants; exit 1 on any violation."""
    from install_service.installs.invariants import check

    violations = run(check)
    emit(
        violations,
        title=f"{len(violations)} violation(s)",
        columns=["check", ("organization", lambda v: v.organization_id), "detail"],
    )
    if violations:
        raise SystemExit(1)
