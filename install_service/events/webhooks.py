"""Webhook endpoints and their deliveries in the database.

Endpoints are managed by platform admins. Each event an endpoint wants becomes one delivery
(written by the database in the event's own transaction, see migration 0008). Deliveries of
one endpoint and organization form a *lane*, sent strictly in feed order: only the lane's
oldest pending delivery is ever attempted, and only once no transaction that could still add
an earlier event to the lane is running (the feed's horizon). A delivery is given up after
`max_attempts` attempts; an endpoint is disabled after `max_attempts` consecutive failures.

An attempt is *leased* (committed) before the request is sent and *recorded* after, so no
transaction stays open while a receiver answers; a worker that dies mid-attempt leaves the
lease to expire and the delivery to be sent again (at least once: receivers deduplicate on
`webhook-id`, the event id). Workers hear of a lane with something to send by a notification
on `LANES_CHANNEL` (sent at commit by the transaction that gave it something to send) and
work many lanes at once (see `events.dispatcher`).
"""

from __future__ import annotations

import base64
import secrets
import uuid
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.actor import Actor
from install_service.audit import service as audit
from install_service.config import WebhookSettings
from install_service.errors import Conflict, Invalid, NotFound
from install_service.events import addresses
from install_service.events.schemas import (
    Delivery,
    DeliveryAttempt,
    DeliveryPage,
    WebhookCreate,
    WebhookCreated,
    WebhookEndpoint,
    WebhookPage,
)
from install_service.orgs.schemas import OrgRef
from install_service.orgs.service import resolve_org_refs
from install_service.pagination import Keyset, PageRequest

QUEUE = "webhooks"
REDELIVER_TASK = "webhooks:redeliver"
# Notified with `<endpoint id> <organization id>` when a lane may have something to send:
# by the event's own transaction (migration 0011), and here when a delivery is due again.
LANES_CHANNEL = "install_service_webhooks"
# A claimed attempt is another worker's to take over this long after its own time is up.
LEASE_MARGIN_SECONDS = 5.0
MAX_RETRY_DELAY_SECONDS = 3600.0

_ENDPOINT = """
    SELECT w.id, w.url, w.event_types, w.enabled, w.disabled_reason, w.disabled_at,
           w.consecutive_failures, w.created_at,
           (SELECT jsonb_agg(jsonb_build_object('id', o.id, 'slug', o.slug) ORDER BY o.slug)
            FROM organizations o WHERE o.id = ANY (w.organization_ids)) AS organizations
    FROM webhook_endpoints w"""


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _endpoint(row: Any) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=row.id,
        url=row.url,
        event_types=row.event_types,
        organizations=None
        if row.organizations is None
        else [OrgRef(id=uuid.UUID(o["id"]), slug=o["slug"]) for o in row.organizations],
        enabled=row.enabled,
        disabled_reason=row.disabled_reason,
        disabled_at=row.disabled_at,
        consecutive_failures=row.consecutive_failures,
        created_at=row.created_at,
    )


async def create_endpoint(
    session: AsyncSession, actor: Actor, data: WebhookCreate, settings: WebhookSettings
) -> WebhookCreated:
    """A new endpoint, enabled, with its signing secret (returned this once)."""
    await addresses.check_new(data.url, allow_private=settings.allow_private)
    if data.event_types is not None and not data.event_types:
        raise Invalid(
            "event_types lists no type; omit it to receive every type", code="no_event_types"
        )
    if data.organizations is not None and not data.organizations:
        raise Invalid(
            "organizations lists none; omit it to receive every organization's events",
            code="no_organizations",
        )
    org_ids = None
    if data.organizations is not None:
        found = await resolve_org_refs(session, data.organizations)
        org_ids = list(dict.fromkeys(found[ref] for ref in data.organizations))
    secret = new_secret()
    endpoint_id = await session.scalar(
        text("""
            INSERT INTO webhook_endpoints (url, secret, event_types, organization_ids,
                                           created_by_user_id)
            VALUES (:url, :secret, :types, :orgs, :actor) RETURNING id"""),
        {
            "url": data.url,
            "secret": secret,
            "types": sorted(set(data.event_types)) if data.event_types else None,
            "orgs": org_ids,
            "actor": actor.user_id,
        },
    )
    await audit.record(
        session,
        actor=actor.user_id,
        action="webhook.created",
        target_type="webhook",
        target_id=endpoint_id,
        details={"url": data.url, "event_types": data.event_types},
    )
    endpoint = await get_endpoint(session, endpoint_id)
    return WebhookCreated(**msgspec.structs.asdict(endpoint), secret=secret)


async def get_endpoint(session: AsyncSession, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    row = (
        await session.execute(text(_ENDPOINT + " WHERE w.id = :id"), {"id": endpoint_id})
    ).first()
    if row is None:
        raise NotFound(f"webhook {endpoint_id} not found", code="webhook_not_found")
    return _endpoint(row)


_ENDPOINTS = Keyset("webhooks", (datetime, uuid.UUID))


async def list_endpoints(session: AsyncSession, page: PageRequest) -> WebhookPage:
    """Every endpoint, oldest first (no secrets)."""
    rows = await session.execute(
        text(
            _ENDPOINT
            + """
            WHERE CAST(:after_0 AS timestamptz) IS NULL
               OR (w.created_at, w.id) > (:after_0, CAST(:after_1 AS uuid))
            ORDER BY w.created_at, w.id LIMIT :limit_plus_one"""
        ),
        _ENDPOINTS.params(page),
    )
    found = [_endpoint(r) for r in rows]
    return _ENDPOINTS.page(WebhookPage, found, page, lambda e: (e.created_at, e.id))


async def set_enabled(
    session: AsyncSession, actor: Actor, endpoint_id: uuid.UUID, *, enabled: bool
) -> WebhookEndpoint:
    """Enable or disable an endpoint (a repeat changes nothing). Enabling clears the failure
    count and sends the deliveries that waited: the workers hear of every lane again."""
    changed = await session.scalar(
        text("""
            UPDATE webhook_endpoints SET enabled = :enabled,
                   consecutive_failures = CASE WHEN :enabled THEN 0 ELSE consecutive_failures END,
                   disabled_at = CASE WHEN :enabled THEN NULL ELSE now() END,
                   disabled_reason = CASE WHEN :enabled THEN NULL ELSE :reason END
            WHERE id = :id AND enabled <> :enabled RETURNING id"""),
        {
            "id": endpoint_id,
            "enabled": enabled,
            "reason": f"disabled by {'an admin' if actor.user_id else 'the operator'}",
        },
    )
    if changed is not None:
        await audit.record(
            session,
            actor=actor.user_id,
            action="webhook.enabled" if enabled else "webhook.disabled",
            target_type="webhook",
            target_id=endpoint_id,
        )
        if enabled:
            await session.execute(
                text(f"""
                    SELECT {NOTIFY_LANE}
                    FROM (SELECT DISTINCT endpoint_id, organization_id FROM webhook_deliveries
                          WHERE endpoint_id = :id AND status = 'pending') lane"""),  # noqa: S608
                {"id": endpoint_id},
            )
    return await get_endpoint(session, endpoint_id)


async def delete_endpoint(
    session: AsyncSession, actor: Actor, endpoint_id: uuid.UUID
) -> WebhookEndpoint:
    """Remove an endpoint with its deliveries and their log."""
    endpoint = await get_endpoint(session, endpoint_id)
    await session.execute(text("DELETE FROM webhook_endpoints WHERE id = :id"), {"id": endpoint_id})
    await audit.record(
        session,
        actor=actor.user_id,
        action="webhook.deleted",
        target_type="webhook",
        target_id=endpoint_id,
        details={"url": endpoint.url},
    )
    return endpoint


# Selected from rows naming `endpoint_id` and `organization_id` (a lane): tells the workers,
# when the caller's transaction commits, to look at the lane again.
NOTIFY_LANE = f"pg_notify('{LANES_CHANNEL}', endpoint_id || ' ' || organization_id)"
# One job per row of the query it is selected from: queued in the caller's transaction, so it
# exists exactly when what it works on was committed. `redeliver` rows name a `delivery_id`.
_DEFER = """procrastinate_defer_jobs_v1(ARRAY[ROW(
    'webhooks', 'webhooks:{task}', 0, NULL, NULL, {args}, NULL)::procrastinate_job_to_defer_v1])"""
DEFER_REDELIVER = _DEFER.format(
    task="redeliver", args="jsonb_build_object('delivery_id', delivery_id)"
)


_DELIVERY = """
    SELECT d.id, d.event_id, e.type AS event_type, d.organization_id, o.slug, d.status,
           CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
           d.created_at, d.finished_at,
           coalesce((SELECT jsonb_agg(jsonb_build_object(
                         'attempted_at', a.attempted_at, 'duration_ms', a.duration_ms,
                         'status_code', a.status_code, 'error', a.error,
                         'succeeded', a.succeeded, 'redelivery', a.redelivery)
                         ORDER BY a.attempted_at, a.id)
                     FROM webhook_attempts a WHERE a.delivery_id = d.id), '[]') AS attempts
    FROM webhook_deliveries d
    JOIN events e ON e.id = d.event_id
    JOIN organizations o ON o.id = d.organization_id
    WHERE d.endpoint_id = :endpoint"""


def _delivery(r: Any) -> Delivery:
    return Delivery(
        id=r.id,
        event_id=r.event_id,
        event_type=r.event_type,
        organization=OrgRef(id=r.organization_id, slug=r.slug),
        status=r.status,
        next_attempt_at=r.next_attempt_at,
        created_at=r.created_at,
        finished_at=r.finished_at,
        attempts=msgspec.convert(r.attempts, list[DeliveryAttempt]),
    )


_DELIVERIES = Keyset("deliveries", (datetime, uuid.UUID))


async def list_deliveries(
    session: AsyncSession, endpoint_id: uuid.UUID, page: PageRequest
) -> DeliveryPage:
    """An endpoint's deliveries, newest first, each with every attempt."""
    await get_endpoint(session, endpoint_id)
    rows = await session.execute(
        text(
            _DELIVERY
            + """
              AND (CAST(:after_0 AS timestamptz) IS NULL
                   OR (d.created_at, d.id) < (:after_0, CAST(:after_1 AS uuid)))
            ORDER BY d.created_at DESC, d.id DESC LIMIT :limit_plus_one"""
        ),
        {"endpoint": endpoint_id, **_DELIVERIES.params(page)},
    )
    found = [_delivery(r) for r in rows]
    return _DELIVERIES.page(DeliveryPage, found, page, lambda d: (d.created_at, d.id))


async def get_delivery(
    session: AsyncSession, endpoint_id: uuid.UUID, delivery_id: uuid.UUID
) -> Delivery:
    row = (
        await session.execute(
            text(_DELIVERY + " AND d.id = :delivery"),
            {"endpoint": endpoint_id, "delivery": delivery_id},
        )
    ).first()
    if row is None:
        raise NotFound(f"delivery {delivery_id} not found", code="delivery_not_found")
    return _delivery(row)


async def redeliver(
    session: AsyncSession, actor: Actor, endpoint_id: uuid.UUID, delivery_id: uuid.UUID
) -> Delivery:
    """Send a delivery again. A pending one is retried now, in its place in the lane; one
    that succeeded or was given up is sent once more on its own, outside the lane's order."""
    endpoint = await get_endpoint(session, endpoint_id)
    if not endpoint.enabled:
        raise Conflict(
            f"webhook {endpoint_id} is disabled; enable it first", code="webhook_disabled"
        )
    status = await session.scalar(
        text("""
            SELECT status FROM webhook_deliveries
            WHERE id = :delivery AND endpoint_id = :endpoint FOR UPDATE"""),
        {"delivery": delivery_id, "endpoint": endpoint_id},
    )
    if status is None:
        raise NotFound(f"delivery {delivery_id} not found", code="delivery_not_found")
    if status == "pending":
        await session.execute(
            text(f"""
                WITH due AS (
                    UPDATE webhook_deliveries SET next_attempt_at = now()
                    WHERE id = :delivery RETURNING endpoint_id, organization_id)
                SELECT {NOTIFY_LANE} FROM due"""),  # noqa: S608
            {"delivery": delivery_id},
        )
    else:
        await session.execute(
            text(f"""
                SELECT {DEFER_REDELIVER}
                FROM (SELECT CAST(:delivery AS uuid) AS delivery_id) d"""),  # noqa: S608
            {"delivery": delivery_id},
        )
    await audit.record(
        session,
        actor=actor.user_id,
        action="webhook.redelivered",
        target_type="webhook_delivery",
        target_id=delivery_id,
        details={"webhook": str(endpoint_id)},
    )
    return await get_delivery(session, endpoint_id, delivery_id)
