"""Sending webhooks: the signed request over connections kept open to each receiver, and the
job that sends one delivery again on request.

Requests follow the Standard Webhooks specification, signed by its reference library:
`webhook-id` (the event id, the same on every attempt, for receivers to deduplicate),
`webhook-timestamp`, `webhook-signature` (`v1,` + base64 HMAC-SHA256 of
`id.timestamp.body` under the endpoint's secret). The body is
`{"type", "timestamp", "data"}` with the event, as the feed shows it, in `data`.

Each attempt connects to an address its host resolves to at that moment, after every
resolved address was checked (see `events.addresses`), with the URL's name kept for the
`Host` header and for TLS (server name and certificate); a connection kept open from an
earlier attempt is reused only when it goes to the address this attempt checked. No proxy
from the environment, no redirects (a 3xx is a failure like any status outside 2xx), one
overall deadline.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
import uuid
from datetime import UTC, datetime

import httpx
import msgspec
import procrastinate
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import Webhook

from install_service.config import WebhookSettings
from install_service.db.session import transaction
from install_service.events import addresses, lanes
from install_service.events.schemas import Event
from install_service.events.webhooks import QUEUE

blueprint = procrastinate.Blueprint()
USER_AGENT = "install-service-webhooks/1"
# A response body is read (so its connection can carry the next request) up to this much;
# past it the connection is closed instead.
MAX_RESPONSE_BYTES = 64 * 1024
# An idle connection to a receiver is kept this long for the next request.
KEEPALIVE_SECONDS = 30.0


def payload(event: Event) -> bytes:
    """The request body for an event."""
    return msgspec.json.encode({"type": event.type, "timestamp": event.occurred_at, "data": event})


@functools.lru_cache(maxsize=1024)
def _signer(secret: str) -> Webhook:
    # Decoding the secret is half the cost of a signature: once per endpoint, not per attempt.
    return Webhook(secret)


def signed_headers(secret: str, event: Event, body: bytes, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, sent at `at` (UTC)."""
    at = at.astimezone(UTC).replace(microsecond=0)
    signature = _signer(secret).sign(msg_id=str(event.id), timestamp=at, data=body.decode())
    return {
        "webhook-id": str(event.id),
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def client(
    settings: WebhookSettings, *, connections: int = 1, tls: ssl.SSLContext | None = None
) -> httpx.AsyncClient:
    """A client for one endpoint: at most `connections` open at once, kept open between
    requests."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.timeout_seconds, connect=min(settings.timeout_seconds, 5)),
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=KEEPALIVE_SECONDS,
        ),
        verify=tls or httpx.create_ssl_context(trust_env=False),
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
            try:
                status_code = response.status_code
                # Read to the end, so the connection is free for the lane's next request.
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read > MAX_RESPONSE_BYTES:
                        break
            finally:
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


async def redeliver_one(
    engine: AsyncEngine, delivery_id: uuid.UUID, settings: WebhookSettings
) -> None:
    """Send a delivery once more on request, outside its lane's order, and log the attempt."""
    async with transaction(engine) as session:
        found = await lanes.load_for_redelivery(session, delivery_id)
    if found is None:
        return
    async with client(settings) as http:
        outcome = await send(http, found.url, found.secret, found.event, settings)
    async with transaction(engine) as session:
        await lanes.record(
            session,
            [lanes.Attempt(delivery_id=delivery_id, attempt=0, outcome=outcome, redelivery=True)],
            settings,
        )


@blueprint.task(name="redeliver", queue=QUEUE, pass_context=True)
async def redeliver(context: procrastinate.JobContext, delivery_id: str) -> None:
    await redeliver_one(
        context.additional_context["engine"], uuid.UUID(delivery_id), WebhookSettings.from_env()
    )
