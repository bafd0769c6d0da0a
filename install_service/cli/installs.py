"""`install` and `installs`: install, upgrade or roll back, uninstall, and read an install's
history and drift. Commands act as the operator (a platform admin) unless `--as EMAIL`."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import click

from install_service.cli.base import BadRequest, actor_for, main, request, run
from install_service.cli.output import Column, emit, json_option, table, with_diffs
from install_service.cli.templates import BELOW, changes_table

if TYPE_CHECKING:
    from rich.console import RenderableType
    from sqlalchemy.ext.asyncio import AsyncSession

as_option = click.option("--as", "as_email", help="Act as this user (default: the operator).")
pin_option = click.option(
    "--pin", is_flag=True, help="Pin the install where it lands: resyncs leave it there."
)
requirements_option = click.option(
    "--with-requirements",
    is_flag=True,
    help="Install or upgrade the templates it requires first, in the same transaction.",
)

_INSTALL_COLUMNS: list[Column] = [
    "id",
    ("organization", lambda i: i.organization.slug),
    ("template", lambda i: i.template.slug),
    "version",
    "status",
    "pinned",
    "pinned_until",
    "pin_reason",
    ("requires", lambda i: ", ".join(_link(x) for x in i.requires)),
    ("required_by", lambda i: ", ".join(_link(x) for x in i.required_by)),
]


def _link(link: Any) -> str:
    """Another install in the org, as `template vN (status)`, or `template (not installed)`."""
    if link.install_id is None:
        return f"{link.template} (not installed)"
    return f"{link.template} v{link.version} ({link.status})"


def _merge_options(command: Any) -> Any:
    """The options that say how an install treats the org's own changes."""
    for option in reversed(
        (
            click.option(
                "--force",
                is_flag=True,
                help="Take the template's value at every "
                "conflicting path (never over tenant fields).",
            ),
            click.option(
                "--resolve",
                "resolutions",
                multiple=True,
                metavar="KIND:SLUG[/PATH]=template|local",
                help="Settle a conflict: take the template's or the org's value at PATH "
                "(a JSON Pointer; omitted, the whole item). Repeatable.",
            ),
            click.option(
                "--adopt",
                "adopt",
                multiple=True,
                metavar="KIND:SLUG",
                help="Take over the org's own row with this slug. Repeatable.",
            ),
            click.option(
                "--adopt-all", is_flag=True, help="Take over every colliding row of the org."
            ),
        )
    ):
        command = option(command)
    return command


def _parse_merge_options(
    resolutions: tuple[str, ...], adopt: tuple[str, ...], adopt_all: bool
) -> dict[str, Any]:
    """`--resolve` and `--adopt` as the API's request fields."""
    parsed = []
    for text in resolutions:
        target, sep, take = text.rpartition("=")
        kind, colon, rest = target.partition(":")
        slug, slash, path = rest.partition("/")
        if not (sep and colon and slug):
            raise BadRequest(f"--resolve {text!r}: expected KIND:SLUG[/PATH]=template|local")
        parsed.append(
            {"kind": kind, "slug": slug, "path": slash + path if slash else None, "take": take}
        )
    adopted: list[dict[str, str]] = []
    for text in adopt:
        kind, colon, slug = text.partition(":")
        if not colon:
            raise BadRequest(f"--adopt {text!r}: expected KIND:SLUG")
        adopted.append({"kind": kind, "slug": slug})
    return {"resolutions": parsed, "adopt": True if adopt_all else adopted}


def _fields(item: Any) -> str:
    return ", ".join(f"{f.path} {f.outcome}" for f in item.fields or [])


def _result(r: Any) -> RenderableType:
    title = f"{r.template.slug} v{r.version} -> {r.organization.slug}: {r.action}"
    if r.dry_run or r.action in ("reconcile", "detach"):
        changed = [i for i in r.items or [] if i.action != "unchanged" or i.fields]
        if r.dry_run:
            title += f" (dry run; {r.conflicts} conflict{'' if r.conflicts == 1 else 's'})"
        diffs = [
            (f"{i.kind} {i.slug} {f.path} ({f.outcome})", f.diff)
            for i in changed
            for f in i.fields or []
            if f.diff
        ]
        return with_diffs(
            table(title, ["kind", "slug", "action", "reason", ("fields", _fields)], changed),
            diffs,
        )
    return changes_table(title, r.changes)


@main.command("install")
@click.argument("template")
@click.option("--org", "organization", help="Organization slug or id (default: your personal org).")
@click.option("--version", type=int, help="Release to install (default: latest).")
@click.option("--dry-run", is_flag=True, help="Show the plan; write nothing.")
@_merge_options
@pin_option
@requirements_option
@as_option
@json_option
def install_command(
    template: str,
    organization: str | None,
    version: int | None,
    dry_run: bool,
    force: bool,
    resolutions: tuple[str, ...],
    adopt: tuple[str, ...],
    adopt_all: bool,
    pin: bool,
    with_requirements: bool,
    as_email: str | None,
) -> None:
    """Install TEMPLATE into an organization (or upgrade / roll back its install)."""
    import msgspec

    from install_service.installs import service as installs
    from install_service.installs.schemas import InstallRequest

    body = request(
        InstallRequest,
        template=template,
        organization=organization,
        version=version,
        dry_run=dry_run,
        force=force,
        pin=pin,
        with_requirements=with_requirements,
        **_parse_merge_options(resolutions, adopt, adopt_all),
    )

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await installs.install(session, actor, **msgspec.structs.asdict(body))

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
    from install_service.installs import service as installs
    from install_service.pagination import walk

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await walk(lambda page: installs.list_installs(session, actor, org, page))

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
    from install_service.installs import service as installs

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await installs.get_install(session, actor, install_id)

    emit(
        run(work),
        title="install",
        columns=[*_INSTALL_COLUMNS, "installed_at", "last_synced_at"],
    )


@installs_group.command("history")
@click.argument("install_id", type=click.UUID)
@as_option
@json_option
def installs_history(install_id: uuid.UUID, as_email: str | None) -> None:
    """An install's history, oldest first."""
    from install_service.installs import service as installs
    from install_service.pagination import walk

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await walk(lambda page: installs.history(session, actor, install_id, page))

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
    """Managed rows edited, archived or deleted in the organization since they were mirrored,
    path by path."""
    from install_service.installs import repair

    async def work(session: AsyncSession) -> Any:
        return await repair.drift(session, await actor_for(session, as_email), install_id)

    emit(run(work), view=_drift_view)


def _drift_view(r: Any) -> RenderableType:
    rows = [
        {"kind": d.kind, "slug": d.slug, "drift": d.drift, **vars_of(f)}
        for d in r.drift
        for f in d.fields or [None]
    ]
    diffs = [(f"{d.kind} {d.slug} {f.path}", f.diff) for d in r.drift for f in d.fields if f.diff]
    title = (
        f"drift of {r.install.template.slug} in {r.install.organization.slug}: "
        f"{len(r.drift)} item(s)"
    )
    return with_diffs(
        table(title, ["kind", "slug", "drift", "path", "mirrored", "current"], rows), diffs
    )


def vars_of(field: Any) -> dict[str, Any]:
    if field is None:
        return {"path": None, "mirrored": None, "current": None}
    if field.diff:
        return {"path": field.path, "mirrored": BELOW, "current": BELOW}
    return {"path": field.path, "mirrored": field.mirrored, "current": field.current}


@installs_group.command("upgrade")
@click.argument("install_id", type=click.UUID)
@click.option("--version", type=int, help="Release to move to (default: latest).")
@click.option("--dry-run", is_flag=True, help="Show the plan; write nothing.")
@_merge_options
@pin_option
@requirements_option
@as_option
@json_option
def installs_upgrade(
    install_id: uuid.UUID,
    version: int | None,
    dry_run: bool,
    force: bool,
    resolutions: tuple[str, ...],
    adopt: tuple[str, ...],
    adopt_all: bool,
    pin: bool,
    with_requirements: bool,
    as_email: str | None,
) -> None:
    """Upgrade an install, or roll it back with an older --version."""
    import msgspec

    from install_service.installs import service as installs
    from install_service.installs.schemas import UpgradeRequest

    body = request(
        UpgradeRequest,
        version=version,
        dry_run=dry_run,
        force=force,
        pin=pin,
        with_requirements=with_requirements,
        **_parse_merge_options(resolutions, adopt, adopt_all),
    )

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await installs.upgrade(session, actor, install_id, **msgspec.structs.asdict(body))

    emit(run(work), view=_result)


@installs_group.command("pin")
@click.argument("install_id", type=click.UUID)
@click.option("--until", help="When the pin ends (ISO 8601 with a time zone; default: never).")
@click.option("--reason", help="Why, for whoever wonders why a resync skipped it.")
@as_option
@json_option
def installs_pin(
    install_id: uuid.UUID, until: str | None, reason: str | None, as_email: str | None
) -> None:
    """Hold an install at its release: resyncs skip it (the org's own upgrades do not)."""
    from install_service.installs import service as installs
    from install_service.installs.schemas import PinRequest

    body = request(PinRequest, until=until, reason=reason)

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await installs.pin(session, actor, install_id, until=body.until, reason=body.reason)

    emit(run(work), title="install", columns=_INSTALL_COLUMNS)


@installs_group.command("unpin")
@click.argument("install_id", type=click.UUID)
@as_option
@json_option
def installs_unpin(install_id: uuid.UUID, as_email: str | None) -> None:
    """Let resyncs move an install again."""
    from install_service.installs import service as installs

    async def work(session: AsyncSession) -> Any:
        return await installs.unpin(session, await actor_for(session, as_email), install_id)

    emit(run(work), title="install", columns=_INSTALL_COLUMNS)


@installs_group.command("reconcile")
@click.argument("install_id", type=click.UUID)
@click.option("--dry-run", is_flag=True, help="Show what would be overwritten; write nothing.")
@as_option
@json_option
def installs_reconcile(install_id: uuid.UUID, dry_run: bool, as_email: str | None) -> None:
    """Make drifted managed rows equal the installed release again (tenant fields stay);
    lists every local value overwritten."""
    from install_service.installs import repair
    from install_service.installs.schemas import ReconcileRequest

    body = request(ReconcileRequest, dry_run=dry_run)

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await repair.reconcile(session, actor, install_id, dry_run=body.dry_run)

    emit(run(work), view=_result)


@installs_group.command("detach")
@click.argument("install_id", type=click.UUID)
@click.argument("item", metavar="KIND:SLUG")
@as_option
@json_option
def installs_detach(install_id: uuid.UUID, item: str, as_email: str | None) -> None:
    """Take one managed row over: later upgrades leave it alone until it is adopted."""
    from install_service.installs import repair
    from install_service.installs.schemas import DetachRequest

    kind, _, slug = item.partition(":")
    body = request(DetachRequest, kind=kind, slug=slug)

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await repair.detach(session, actor, install_id, kind=body.kind, slug=body.slug)

    emit(run(work), view=_result)


@installs_group.command("uninstall")
@click.argument("install_id", type=click.UUID)
@click.option(
    "--cascade",
    is_flag=True,
    help="Also uninstall the installs in the organization that require this one (first).",
)
@as_option
@json_option
def installs_uninstall(install_id: uuid.UUID, cascade: bool, as_email: str | None) -> None:
    """Archive every row the install manages; versions and history stay. Installing the
    template again brings the same rows back. Refused while installs in the organization
    require it, unless --cascade."""
    from install_service.installs import service as installs

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await installs.uninstall(session, actor, install_id, cascade=cascade)

    emit(run(work), view=_result)
