"""`audit`: the append-only record of admin and install lifecycle actions."""

from __future__ import annotations

import uuid

import click

from install_service.cli.base import main, run
from install_service.cli.output import emit, json_option
from install_service.pagination import DEFAULT_LIMIT


@main.command("audit")
@click.option("--action", help="Only this action (e.g. install.upgraded).")
@click.option("--org", "organization_id", type=click.UUID, help="Only this organization (id).")
@click.option("--limit", type=click.IntRange(1, 200), default=DEFAULT_LIMIT, show_default=True)
@json_option
def audit_list(action: str | None, organization_id: uuid.UUID | None, limit: int) -> None:
    """The newest audit entries: who did what, to what, in which request, when."""
    from install_service.audit import service as audit
    from install_service.pagination import PageRequest

    found = run(
        lambda s: audit.list_entries(
            s, PageRequest(limit=limit), action=action, organization_id=organization_id
        )
    )
    emit(
        found.items,
        title="audit log (newest first)",
        columns=["occurred_at", "actor_email", "action", "target_type", "target_id", "request_id"],
    )
