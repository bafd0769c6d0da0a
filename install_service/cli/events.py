"""`webhooks` and `events`: where the change feed is pushed, and following it from a terminal.
Commands act as the operator; arguments are validated exactly as the admin API validates its
request bodies."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import TYPE_CHECKING, Any

import click

from install_service.actor import SYSTEM
from install_service.cli.base import database_url, main, request, run
from install_service.cli.output import (
    Column,
    emit,
    json_option,
    secret,
    stderr,
    stdout,
    to_json,
    wants_json,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from install_service.events.schemas import Event

_ENDPOINT_COLUMNS: list[Column] = [
    "id",
    "url",
    ("event types", lambda e: ", ".join(e.event_types or ["all"])),
    ("organizations", lambda e: ", ".join(o.slug for o in e.organizations or []) or "all"),
    "enabled",
    ("failures", lambda e: e.consecutive_failures),
    ("disabled because", lambda e: e.disabled_reason),
]
_DELIVERY_COLUMNS: list[Column] = [
    "id",
    ("event", lambda d: d.event_type),
    ("organization", lambda d: d.organization.slug),
    "status",
    ("attempts", lambda d: len(d.attempts)),
    ("last", lambda d: (d.attempts[-1].error or d.attempts[-1].status_code) if d.attempts else ""),
]


@main.group("webhooks")
def webhooks_group() -> None:
    """Webhook endpoints and their deliveries."""


@webhooks_group.command("create")
@click.argument("url")
@click.option("--event-type", "event_types", multiple=True, help="Only this type. Repeatable.")
@click.option("--org", "organizations", multiple=True, help="Only this org. Repeatable.")
@json_option
def webhooks_create(url: str, event_types: tuple[str, ...], organizations: tuple[str, ...]) -> None:
    """Add an endpoint for URL; its signing secret is printed once."""
    from install_service.config import Settings
    from install_service.events import webhooks
    from install_service.events.schemas import WebhookCreate

    body = request(
        WebhookCreate,
        url=url,
        event_types=list(event_types) or None,
        organizations=list(organizations) or None,
    )
    settings = Settings.from_env().webhooks
    created = run(lambda s: webhooks.create_endpoint(s, SYSTEM, body, settings))
    emit(created, title="webhook", columns=_ENDPOINT_COLUMNS)
    secret("signing secret (shown once)", created.secret)


@webhooks_group.command("list")
@json_option
def webhooks_list() -> None:
    """Every endpoint, oldest first (never their secrets)."""
    from install_service.events import webhooks
    from install_service.pagination import walk

    found = run(lambda s: walk(lambda page: webhooks.list_endpoints(s, page)))
    emit(found, title="webhooks", columns=_ENDPOINT_COLUMNS)


@webhooks_group.command("disable")
@click.argument("webhook_id", type=click.UUID)
@json_option
def webhooks_disable(webhook_id: uuid.UUID) -> None:
    """Stop delivering to an endpoint; its deliveries wait."""
    from install_service.events import webhooks

    emit(
        run(lambda s: webhooks.set_enabled(s, SYSTEM, webhook_id, enabled=False)),
        title="webhook",
        columns=_ENDPOINT_COLUMNS,
    )


@webhooks_group.command("enable")
@click.argument("webhook_id", type=click.UUID)
@json_option
def webhooks_enable(webhook_id: uuid.UUID) -> None:
    """Deliver to an endpoint again, starting with what waited."""
    from install_service.events import webhooks

    emit(
        run(lambda s: webhooks.set_enabled(s, SYSTEM, webhook_id, enabled=True)),
        title="webhook",
        columns=_ENDPOINT_COLUMNS,
    )


@webhooks_group.command("delete")
@click.argument("webhook_id", type=click.UUID)
@json_option
def webhooks_delete(webhook_id: uuid.UUID) -> None:
    """Remove an endpoint, its deliveries and their log."""
    from install_service.events import webhooks

    emit(
        run(lambda s: webhooks.delete_endpoint(s, SYSTEM, webhook_id)),
        title="deleted webhook",
        columns=_ENDPOINT_COLUMNS,
    )


@webhooks_group.command("deliveries")
@click.argument("webhook_id", type=click.UUID)
@json_option
def webhooks_deliveries(webhook_id: uuid.UUID) -> None:
    """An endpoint's deliveries, newest first, with every attempt (--json)."""
    from install_service.events import webhooks
    from install_service.pagination import walk

    found = run(lambda s: walk(lambda page: webhooks.list_deliveries(s, webhook_id, page)))
    emit(found, title="deliveries (newest first)", columns=_DELIVERY_COLUMNS)


@webhooks_group.command("redeliver")
@click.argument("webhook_id", type=click.UUID)
@click.argument("delivery_id", type=click.UUID)
@json_option
def webhooks_redeliver(webhook_id: uuid.UUID, delivery_id: uuid.UUID) -> None:
    """Send a delivery again (a worker sends it)."""
    from install_service.events import webhooks

    emit(
        run(lambda s: webhooks.redeliver(s, SYSTEM, webhook_id, delivery_id)),
        title="delivery",
        columns=_DELIVERY_COLUMNS,
    )


@main.group("events")
def events_group() -> None:
    """The change feed."""


@events_group.command("tail")
@click.option("--org", "organization", help="One organization (slug or id); default: all.")
@click.option("--cursor", help="Start after this cursor (one printed before).")
@click.option("--follow", is_flag=True, help="Keep waiting for new events.")
@json_option
def events_tail(organization: str | None, cursor: str | None, follow: bool) -> None:
    """Print events oldest first, then (with --follow) each new one as it commits; with
    --json, one JSON event per line.

    The last line on stderr is the cursor to resume from."""
    from rich.text import Text

    from install_service.db.engine import asyncpg_dsn, create_engine
    from install_service.db.session import transaction
    from install_service.events import feed
    from install_service.events.listener import Listener
    from install_service.orgs.service import resolve_org
    from install_service.pagination import MAX_LIMIT, PageRequest

    url = database_url()

    async def tail() -> None:
        engine = create_engine(url, pool_size=2)
        listener = Listener(asyncpg_dsn(url))
        position = cursor
        try:
            async with transaction(engine) as session:
                org = await resolve_org(session, SYSTEM, organization) if organization else None
            org_id = org.id if org else None
            await listener.start()
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
                    _print_event(event)
                position = page.next_cursor
                if not follow and not page.items:
                    break
        finally:
            if position is not None:
                stderr().print(Text(f"cursor: {position}"))
            await listener.stop()
            await engine.dispose()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(tail())


def _print_event(event: Event) -> None:
    from rich.text import Text

    if wants_json():
        click.echo(to_json(event))
        return
    items = ", ".join(f"{i['kind']}:{i['slug']} {i['action']}" for i in event.data.get("items", []))
    stdout().print(
        Text.assemble(
            f"{event.occurred_at:%Y-%m-%d %H:%M:%S} {event.organization.slug} ",
            (event.type, "bold"),
            f" {items}",
        )
    )
