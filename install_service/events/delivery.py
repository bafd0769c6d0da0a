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
earlier attempt is reused only when it goes to the address this attempt checked. No proxy,
no redirects (a 3xx is a failure like any status outside 2xx), one overall deadline.

HTTP/1.1 is spoken with h11 (the protocol engine under httpx) over asyncio's streams: a
client library's pool and request models cost several times the rest of a delivery
together, in a process that sends a thousand a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import h11
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
_READ_BYTES = 64 * 1024
# How long closing the idle connections waits for them to close (a TLS one says goodbye).
_CLOSE_SECONDS = 1.0


@functools.cache
def default_tls() -> ssl.SSLContext:
    """The certificates trusted for https receivers (certifi's, as httpx has them): loaded
    once per process, not on every connection."""
    return httpx.create_ssl_context(trust_env=False)


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


Origin = tuple[str, int, bool]  # (address, port, TLS)


@dataclass(eq=False)
class _Connection:
    origin: Origin
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0
    # A byte of this request's response came: whatever goes wrong after that, the receiver
    # had the request, so it is not sent again on another connection.
    answered: bool = False

    def close(self) -> None:
        self.writer.close()


class Connections:
    """Connections to one endpoint's receiver, kept open between requests: at most `keep`
    idle ones (the dispatcher bounds how many requests an endpoint has in flight)."""

    def __init__(self, *, keep: int = 1, tls: ssl.SSLContext | None = None) -> None:
        self.keep = keep
        self.tls = tls
        self._idle: list[_Connection] = []

    async def post(
        self,
        origin: Origin,
        server_name: str,
        target: bytes,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> int:
        """POST `body` and read the response; its status code. Raises for what the network
        or the receiver's HTTP does wrong."""
        reused = self._take(origin)
        connection = reused or await self._open(origin, server_name)
        try:
            status = await self._exchange(connection, target, headers, body)
        except (OSError, h11.ProtocolError):
            connection.close()
            if reused is None or connection.answered:
                raise
            # The receiver closed an idle connection as it was reused, before answering a
            # byte (it may have closed it as the request was on its way): once more, afresh.
            connection = await self._open(origin, server_name)
            try:
                status = await self._exchange(connection, target, headers, body)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise
        self._give_back(connection)
        return status

    def _take(self, origin: Origin) -> _Connection | None:
        self.close_stale(origin)
        return self._idle.pop() if self._idle else None

    def close_stale(self, origin: Origin | None = None) -> None:
        """Close the idle connections idle too long or closed by the receiver, and (given
        `origin`) those to another address than the one an attempt now checked."""
        stale = time.monotonic() - KEEPALIVE_SECONDS
        kept = []
        for connection in self._idle:
            if (
                (origin is None or connection.origin == origin)
                and connection.idle_since > stale
                and not connection.reader.at_eof()
                and not connection.writer.is_closing()
            ):
                kept.append(connection)
            else:
                connection.close()
        self._idle = kept

    async def _open(self, origin: Origin, server_name: str) -> _Connection:
        address, port, tls = origin
        reader, writer = await asyncio.open_connection(
            address,
            port,
            ssl=(self.tls or default_tls()) if tls else None,
            server_hostname=server_name if tls else None,
        )
        return _Connection(origin=origin, reader=reader, writer=writer)

    async def _exchange(
        self, connection: _Connection, target: bytes, headers: list[tuple[str, str]], body: bytes
    ) -> int:
        protocol = connection.protocol
        connection.answered = False
        connection.writer.write(
            protocol.send(h11.Request(method="POST", target=target, headers=headers))
            + protocol.send(h11.Data(data=body))
            + protocol.send(h11.EndOfMessage())
        )
        await connection.writer.drain()
        status, read = 0, 0
        while True:
            event = protocol.next_event()
            if event is h11.NEED_DATA:
                data = await connection.reader.read(_READ_BYTES)
                connection.answered = connection.answered or bool(data)
                protocol.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                read += len(event.data)
                if read > MAX_RESPONSE_BYTES:
                    connection.close()  # not worth reading to the end
                    return status
            elif isinstance(event, h11.EndOfMessage):
                return status
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the receiver closed the connection")
            # An informational (1xx) response: the final one follows.

    def _give_back(self, connection: _Connection) -> None:
        protocol = connection.protocol
        if (
            connection.writer.is_closing()
            or protocol.our_state is not h11.DONE
            or protocol.their_state is not h11.DONE
            or len(self._idle) >= self.keep
        ):
            connection.close()
            return
        protocol.start_next_cycle()
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    async def aclose(self) -> None:
        """Close the idle connections, and wait (briefly) until they are."""
        closing, self._idle = self._idle, []
        for connection in closing:
            connection.close()
        if closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_SECONDS):
                    await asyncio.gather(
                        *(c.writer.wait_closed() for c in closing), return_exceptions=True
                    )


async def send(
    connections: Connections, url: str, secret: str, event: Event, settings: WebhookSettings
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
            headers["content-length"] = str(len(body))
            tls = target.scheme == "https"
            status_code = await connections.post(
                (str(address), target.port or (443 if tls else 80), tls),
                target.host,
                target.raw_path,
                list(headers.items()),
                body,
            )
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
    except TimeoutError:
        error = f"no answer within {settings.timeout_seconds:g} s"
    except addresses.AddressRefused as exc:
        error = f"refused: {exc.detail}"
    except h11.ProtocolError as exc:
        error = f"{type(exc).__name__}: {exc}"
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
    connections = Connections()
    try:
        outcome = await send(connections, found.url, found.secret, found.event, settings)
    finally:
        await connections.aclose()
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
