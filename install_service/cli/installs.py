"""`install` and `installs`: install, upgrade or roll back, uninstall, and read an install's
history and drift. Commands act as the operator (a platform admin) unless `--as EMAIL`."""

from __future__ import annotations

import uuid
from typing import Any

import click
from rich.console import RenderableType
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.cli.base import main, request, run
from install_service.cli.output import emit, json_option, table
from install_service.cli.templates import changes_table
from install_service.installs import service as installs
from install_service.installs.schemas import InstallRequest, UpgradeRequest
from install_service.orgs.service import actor_for_email

as_option = click.option("--as", "as_email", help="Act as this user (default: the operator).")


def _result(r: Any) -> RenderableType:
    title = f"{r.template.slug} v{r.version} -> {r.organization.slug}: {r.action}"
    if r.dry_run:
        return table(title + " (dry run)", ["kind", "slug", "action", "reason"], r.items or [])
    return changes_table(title, r.changes)


@main.command("install")
@click.argument("template")
@click.option("--org", "organization", help="Organization slug or id (default: your personal org).")
@click.option("--version", type=int, help="Release to install (default: latest).")
@click.option("--dry-run", is_flag=True, help="Show the plan; write nothing.")
@click.option("--force", is_flag=True, help="Let the template win over local edits.")
@as_option
@json_option
def install_command(
    template: str,
    organization: str | None,
    version: int | None,
    dry_run: bool,
    force: bool,
    as_email: str | None,
) -> None:
    """Install TEMPLATE into an organization (or upgrade / roll back its install)."""
    body = request(
        InstallRequest,
        template=template,
        organization=organization,
        version=version,
        dry_run=dry_run,
        force=force,
    )

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for_email(session, as_email)
        return await installs.install(
            session,
            actor,
            template=body.template,
            organization=body.organization,
            version=body.version,
            dry_run=body.dry_run,
            force=body.force,
        )

    emit(run(work), view=_result)


@main.group("installs")
def installs_group() -> None:
    """Read and change existing installs (by id)."""


@installs_group.command("list")
@click.argument("org")
@as_option
@json_option
def installs_list(org: str, as_email: str | None) -> None:
    """The installs in an organization (slug or id)."""

    async def work(session: AsyncSession) -> Any:
        return await installs.list_installs(session, await actor_for_email(session, as_email), org)

    emit(
        run(work),
        title=f"installs in {org}",
        columns=[
            "id",
            ("template", lambda i: i.template.slug),
            "version",
            "status",
            "last_synced_at",
        ],
    )


@installs_group.command("show")
@click.argument("install_id", type=click.UUID)
@as_option
@json_option
def installs_show(install_id: uuid.UUID, as_email: str | None) -> None:
    """One install."""

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for_email(session, as_email)
        return await installs.get_install(session, actor, install_id)

    emit(
        run(work),
        title="install",
        columns=[
            "id",
            ("organization", lambda i: i.organization.slug),
            ("template", lambda i: i.template.slug),
            "version",
            "status",
            "installed_at",
            "last_synced_at",
        ],
    )


@installs_group.command("history")
@click.argument("install_id", type=click.UUID)
@as_option
@json_option
def installs_history(install_id: uuid.UUID, as_email: str | None) -> None:
    """An install's history, oldest first."""

    async def work(session: AsyncSession) -> Any:
        return await installs.history(session, await actor_for_email(session, as_email), install_id)

    emit(
        run(work),
        title=f"history of {install_id}",
        columns=[
            "created_at",
            "action",
            ("from", lambda e: e.from_version),
            ("to", lambda e: e.to_version),
            ("actor", lambda e: e.actor_user_id),
        ],
    )


@installs_group.command("drift")
@click.argument("install_id", type=click.UUID)
@as_option
@json_option
def installs_drift(install_id: uuid.UUID, as_email: str | None) -> None:
    """Managed rows edited, archived or deleted in the organization since they were mirrored."""

    async def work(session: AsyncSession) -> Any:
        return await installs.drift(session, await actor_for_email(session, as_email), install_id)

    emit(
        run(work),
        view=lambda r: table(
            f"drift of {r.install.template.slug} in {r.install.organization.slug}: "
            f"{len(r.drift)} item(s)",
            ["kind", "slug", "drift"],
            r.drift,
        ),
    )


@installs_group.command("upgrade")
@click.argument("install_id", type=click.UUID)
@click.option("--version", type=int, help="Release to move to (default: latest).")
@click.option("--dry-run", is_flag=True, help="Show the plan; write nothing.")
@click.option("--force", is_flag=True, help="Let the template win over local edits.")
@as_option
@json_option
def installs_upgrade(
    install_id: uuid.UUID, version: int | None, dry_run: bool, force: bool, as_email: str | None
) -> None:
    """Upgrade an install, or roll it back with an older --version."""
    body = request(UpgradeRequest, version=version, dry_run=dry_run, force=force)

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for_email(session, as_email)
        return await installs.upgrade(
            session,
            actor,
            install_id,
            version=body.version,
            dry_run=body.dry_run,
            force=body.force,
        )

    emit(run(work), view=_result)


@installs_group.command("uninstall")
@click.argument("install_id", type=click.UUID)
@as_option
@json_option
def installs_uninstall(install_id: uuid.UUID, as_email: str | None) -> None:
    """Archive every row the install manages; versions and history stay. Installing the
    template again brings the same rows back."""

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for_email(session, as_email)
        return await installs.uninstall(session, actor, install_id)

    emit(run(work), view=_result)
