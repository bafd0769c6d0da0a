"""Sending webhooks: the procrastinate jobs that work through lanes, and the signed request.

Requests follow the Standard Webhooks specification, signed by its reference library:
`webhook-id` (the event id, the same on every attempt, for receivers to deduplicate),
`webhook-timestamp`, `webhook-signature` (`v1,` + base64 HMAC-SHA256 of
`id.timestamp.body` under the endpoint's secret). The body is
`{"type", "timestamp", "data"}` with the event, as the feed shows it, in `data`.

Each attempt connects to an address its host resolves to at that moment, after every
resolved address was checked (see `events.addresses`), with the URL's name kept for the
`Host` header and for TLS (server name and certificate). No proxy from the environment, no
redirects, one overall deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import procrastinate
import procrastinate.exceptions
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import Webhook

from install_service.config import WebhookSettings
from install_service.db.session import transaction
from install_service.events import addresses, lanes
from install_service.events.schemas import Event
from install_service.events.webhooks import QUEUE

log = logging.getLogger("install_service.webhooks")

blueprint = procrastinate.Blueprint()
# A lane whose next event may still be preceded by one not yet committed is looked at again
# this often, this many times, before its job hands over to a later one.
_UNSETTLED_PAUSES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
USER_AGENT = "install-service-webhooks/1"


def payload(event: Event) -> bytes:
    """The request body for an event."""
    return msgspec.json.encode({"type": event.type, "timestamp": event.occurred_at, "data": event})


def signed_headers(secret: str, event: Event, body: bytes, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, sent at `at` (UTC)."""
    at = at.astimezone(UTC).replace(microsecond=0)
    signature = Webhook(secret).sign(msg_id=str(event.id), timestamp=at, data=body.decode())
    return {
        "webhook-id": str(event.id),
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def client(settings: WebhookSettings) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.timeout_seconds, connect=min(settings.timeout_seconds, 5)),
        follow_redirects=False,
        trust_env=False,
    )


async def send(
    http: httpx.AsyncClient, url: str, secret: str, event: Event, settings: WebhookSettings
) -> lanes.Outcome:
    """One attempt; never raises for anything the receiver or the network does."""
    at = datetime.now(UTC)
    started = time.perf_counter()
    status_code: int | None = None
    error: str | None = None
    try:
        async with asyncio.timeout(settings.timeout_seconds):
            target = addresses.parse_url(url)
            address = await addresses.pinned_address(target, allow_private=settings.allow_private)
            body = payload(event)
            headers = signed_headers(secret, event, body, at)
            headers["host"] = target.netloc.decode("ascii")
            pinned = target.copy_with(host=str(address))
            extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
            request = http.build_request(
                "POST", pinned, content=body, headers=headers, extensions=extensions
            )
            response = await http.send(request, stream=True)
            status_code = response.status_code
            await response.aclose()
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
    except TimeoutError:
        error = f"no answer within {settings.timeout_seconds:g} s"
    except addresses.AddressRefused as exc:
        error = f"refused: {exc.detail}"
    except (httpx.HTTPError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return lanes.Outcome(
        attempted_at=at,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        status_code=status_code,
        error=error,
    )


async def work_lane(
    engine: AsyncEngine,
    app: procrastinate.App,
    endpoint_id: uuid.UUID,
    organization_id: uuid.UUID,
    settings: WebhookSettings,
) -> int:
    """Send a lane's deliveries in order until it has none that may go now; returns how many
    were attempted. Leaves a job behind for the lane's next retry."""
    attempted = 0
    pauses = iter(_UNSETTLED_PAUSES)
    async with client(settings) as http:
        while True:
            async with transaction(engine) as session:
                claimed = await lanes.claim(
                    session, endpoint_id, organization_id, lanes.lease_seconds(settings)
                )
            if claimed is None or claimed.leased:
                # Nothing to send, or another job is sending the lane and goes on with it (if
                # it dies, its lease runs out and `resume` queues the lane again).
                return attempted
            if claimed.unsettled:
                pause = next(pauses, None)
                if pause is None:
                    await _deliver_later(app, endpoint_id, organization_id, None)
                    return attempted
                await asyncio.sleep(pause)
                continue
            if claimed.delivery_id is None or claimed.event is None:
                await _deliver_later(app, endpoint_id, organization_id, claimed.not_before)
                return attempted
            outcome = await send(http, claimed.url, claimed.secret, claimed.event, settings)
            attempted += 1
            async with transaction(engine) as session:
                recorded = await lanes.record(
                    session, claimed.delivery_id, outcome, settings, attempt=claimed.attempt
                )
            if recorded.disabled_endpoint is not None:
                log.warning("webhook %s disabled: %s", endpoint_id, outcome.error)
            if recorded.retry_at is not None:
                await _deliver_later(app, endpoint_id, organization_id, recorded.retry_at)
                return attempted


async def _deliver_later(
    app: procrastinate.App,
    endpoint_id: uuid.UUID,
    organization_id: uuid.UUID,
    at: datetime | None,
) -> None:
    """Queue the lane's job for `at` (None: in a second); one waiting job per lane."""
    when = at or datetime.now(UTC) + timedelta(seconds=1)
    with contextlib.suppress(procrastinate.exceptions.AlreadyEnqueued):
        await (
            app.tasks["webhooks:deliver"]
            .configure(
                queueing_lock=f"webhooks:{endpoint_id}:{organization_id}",
                schedule_at=when,
            )
            .defer_async(endpoint_id=str(endpoint_id), organization_id=str(organization_id))
        )


async def redeliver_one(
    engine: AsyncEngine, delivery_id: uuid.UUID, settings: WebhookSettings
) -> None:
    """Send a delivery once more on request, outside its lane's order, and log the attempt."""
    async with transaction(engine) as session:
        found = await lanes.load_for_redelivery(session, delivery_id)
    if found is None or found.event is None:
        return
    async with client(settings) as http:
        outcome = await send(http, found.url, found.secret, found.event, settings)
    async with transaction(engine) as session:
        await lanes.record(session, delivery_id, outcome, settings, redelivery=True)


async def resume(engine: AsyncEngine, app: procrastinate.App) -> int:
    """Queue a job for every lane with deliveries waiting (at a worker's start and every
    minute): nothing waits forever on a lost job or a dead worker's lease."""
    async with transaction(engine) as session:
        found = await lanes.lanes_to_resume(session)
    for lane in found:
        await _deliver_later(app, lane["endpoint_id"], lane["organization_id"], lane["not_before"])
    return len(found)


@blueprint.task(name="deliver", queue=QUEUE, pass_context=True)
async def deliver(
    context: procrastinate.JobContext, endpoint_id: str, organization_id: str
) -> None:
    await work_lane(
        context.additional_context["engine"],
        context.app,
        uuid.UUID(endpoint_id),
        uuid.UUID(organization_id),
        WebhookSettings.from_env(),
    )


@blueprint.task(name="redeliver", queue=QUEUE, pass_context=True)
async def redeliver(context: procrastinate.JobContext, delivery_id: str) -> None:
    await redeliver_one(
        context.additional_context["engine"], uuid.UUID(delivery_id), WebhookSettings.from_env()
    )


@blueprint.periodic(cron="* * * * *")
@blueprint.task(name="resume", queue=QUEUE, queueing_lock="webhooks-resume", pass_context=True)
async def resume_task(context: procrastinate.JobContext, timestamp: int) -> None:
    await resume(context.additional_context["engine"], context.app)
