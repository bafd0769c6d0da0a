"""The webhook sender's HTTP/1.1 client against receivers on loopback ports whose every answer
a test writes byte by byte: connections reused only while the response allows it, response
bodies read to their end or cut at the bound, a request sent again on a fresh connection
only when a reused one was closed before a byte of its response came, one deadline for a
receiver that never answers, TLS with the URL's name verified, and nothing left open once
the sender stops (the worker's dispatcher included)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import subprocess
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from install_service.config import WebhookSettings
from install_service.events import delivery, webhooks
from install_service.events.schemas import Event
from install_service.orgs.schemas import OrgRef
from tests.conftest import rows
from tests.test_webhook_lanes import emit, endpoint_for, orgs, start
from tests.test_webhooks import until, worker
from tests.webhook_receiver import Receiver

SECRET = webhooks.new_secret()
SETTINGS = WebhookSettings(allow_private=True, timeout_seconds=2.0)
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


@dataclass
class Request:
    connection: int  # the receiver's count of connections when this one was accepted
    webhook_id: str
    host: str
    verified: bool


# What a receiver does with a request: write its answer; False closes the connection.
Answer = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]


async def ok(_request: Request, writer: asyncio.StreamWriter) -> bool:
    writer.write(OK)
    return True


@dataclass
class Scripted:
    """A receiver that reads each request whole (verifying its signature) and answers as
    `answer` writes. `closed_by_client` counts the connections whose client hung up."""

    answer: Answer
    tls: ssl.SSLContext | None = None
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    closed_by_client: int = 0
    port: int = 0
    _serving: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hooks?x=1"

    @property
    def open(self) -> int:
        return self.connections - self.closed_by_client

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        task = asyncio.current_task()
        assert task is not None
        self._serving.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                lines = head.decode("latin-1").split("\r\n")
                assert lines[0] == "POST /hooks?x=1 HTTP/1.1", lines[0]
                headers = {
                    name.strip().lower(): value.strip()
                    for name, value in (line.split(":", 1) for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers["content-length"]))
                try:
                    Webhook(SECRET).verify(body, headers)
                    verified = True
                except WebhookVerificationError:
                    verified = False
                request = Request(number, headers["webhook-id"], headers["host"], verified)
                self.requests.append(request)
                if not await self.answer(request, writer):
                    return
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            self.closed_by_client += 1
        except asyncio.CancelledError:
            pass  # the receiver stopping
        finally:
            self._serving.discard(task)
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Scripted]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for task in list(self._serving):
                task.cancel()
            await asyncio.gather(*self._serving, return_exceptions=True)
            await server.wait_closed()


def event() -> Event:
    return Event(
        id=uuid.uuid4(),
        type="install.reconciled",
        organization=OrgRef(id=uuid.uuid4(), slug="acme"),
        install_id=None,
        occurred_at=datetime.now(UTC),
        data={"template": "starter", "items": []},
    )


async def send(connections: delivery.Connections, url: str, sent: Event | None = None) -> bool:
    """One attempt; whether it succeeded."""
    outcome = await delivery.send(connections, url, SECRET, sent or event(), SETTINGS)
    return outcome.succeeded


@contextlib.contextmanager
def closed_by_their_owner() -> Iterator[None]:
    """Fails if a connection is found open by the garbage collector (which closes it, with a
    warning) rather than closed by the code that kept it."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    unclosed = [str(w.message) for w in warned if "unclosed <StreamWriter" in str(w.message)]
    assert unclosed == []


def our_sockets_to(port: int) -> list[str]:
    """This process's TCP sockets connected to `port`, with their states."""
    return [
        c.status
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port
    ]


class TestKeepAlive:
    async def test_one_connection_carries_request_after_request(self) -> None:
        connections = delivery.Connections()
        async with Scripted(ok).serving() as receiver:
            sent = [event() for _ in range(3)]
            assert [await send(connections, receiver.url(), e) for e in sent] == [True] * 3
            assert [(r.connection, r.webhook_id, r.verified) for r in receiver.requests] == [
                (1, str(e.id), True) for e in sent
            ]
            assert receiver.requests[0].host == f"127.0.0.1:{receiver.port}"
            await connections.aclose()
            assert our_sockets_to(receiver.port) == []
            await until(lambda: receiver.open == 0, seconds=5, what="the connection closed")

    @pytest.mark.parametrize(
        "answer",
        [
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
        ],
        ids=["connection-close", "http-1.0"],
    )
    async def test_not_reused_when_the_response_says_it_closes(self, answer: bytes) -> None:
        async def closing(_request: Request, writer: asyncio.StreamWriter) -> bool:
            writer.write(answer)
            return True  # and keep it open: the client must hang up

        connections = delivery.Connections()
        async with Scripted(closing).serving() as receiver:
            assert [await send(connections, receiver.url()) for _ in range(3)] == [True] * 3
            assert [r.connection for r in receiver.requests] == [1, 2, 3]
            await until(lambda: receiver.open == 0, seconds=5, what="the client hanging up")
            assert our_sockets_to(receiver.port) == []

    async def test_a_body_is_read_to_its_end_and_the_connection_reused(self) -> None:
        async def chunked(_request: Request, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 202 Accepted\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(5):
                writer.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            return True

        connections = delivery.Connections()
        async with Scripted(chunked).serving() as receiver:
            assert [await send(connections, receiver.url()) for _ in range(3)] == [True] * 3
            assert [r.connection for r in receiver.requests] == [1, 1, 1]
            await connections.aclose()

    async def test_an_endless_body_is_cut_at_the_bound(self) -> None:
        async def endless(_request: Request, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(100_000):  # 800 MB: far more than any client should read
                writer.write(b"2000\r\n" + b"x" * 8192 + b"\r\n")
                await writer.drain()
            return False

        connections = delivery.Connections()
        async with Scripted(endless).serving() as receiver:
            outcome = await delivery.send(connections, receiver.url(), SECRET, event(), SETTINGS)
            assert (outcome.status_code, outcome.error) == (200, None)
            assert outcome.duration_ms < 1000 * SETTINGS.timeout_seconds / 2
            assert await send(connections, receiver.url())
            assert [r.connection for r in receiver.requests] == [1, 2]  # not reused
            await until(lambda: receiver.closed_by_client >= 1, seconds=5, what="a hang-up")
            await connections.aclose()


class TestSentAgain:
    async def test_once_afresh_when_a_reused_connection_closes_before_answering(self) -> None:
        async def second_on_a_connection_unanswered(
            request: Request, writer: asyncio.StreamWriter
        ) -> bool:
            if sum(r.connection == request.connection for r in receiver.requests) == 2:
                return False  # closed as the idle connection was reused
            writer.write(OK)
            return True

        connections = delivery.Connections()
        receiver = Scripted(second_on_a_connection_unanswered)
        async with receiver.serving():
            first, second = event(), event()
            assert await send(connections, receiver.url(), first)
            assert await send(connections, receiver.url(), second)
            assert [(r.connection, r.webhook_id) for r in receiver.requests] == [
                (1, str(first.id)),
                (1, str(second.id)),
                (2, str(second.id)),
            ]
            await connections.aclose()

    @pytest.mark.parametrize(
        "begun",
        [b"HTTP/1.1 2", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345"],
        ids=["part-of-the-status-line", "part-of-the-body"],
    )
    async def test_never_once_a_byte_of_the_response_came(self, begun: bytes) -> None:
        async def second_cut_short(request: Request, writer: asyncio.StreamWriter) -> bool:
            if len(receiver.requests) == 2:
                writer.write(begun)
                return False
            writer.write(OK)
            return True

        connections = delivery.Connections()
        receiver = Scripted(second_cut_short)
        async with receiver.serving():
            assert await send(connections, receiver.url())
            outcome = await delivery.send(connections, receiver.url(), SECRET, event(), SETTINGS)
            assert outcome.status_code is None
            assert "Error" in (outcome.error or "")
            # The receiver had the request: the lane's retry sends it again, not the client.
            assert [r.connection for r in receiver.requests] == [1, 1]
            assert await send(connections, receiver.url())
            assert [r.connection for r in receiver.requests] == [1, 1, 2]
            await connections.aclose()

    async def test_never_on_a_connection_just_opened(self) -> None:
        async def unanswered(_request: Request, _writer: asyncio.StreamWriter) -> bool:
            return False

        connections = delivery.Connections()
        async with Scripted(unanswered).serving() as receiver:
            assert not await send(connections, receiver.url())
            assert len(receiver.requests) == 1
            await connections.aclose()


class TestDeadline:
    @pytest.mark.parametrize(
        "said", [b"", b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12"], ids=["nothing", "half"]
    )
    async def test_a_receiver_that_stops_answering_is_hung_up_on(self, said: bytes) -> None:
        async def stalls(_request: Request, writer: asyncio.StreamWriter) -> bool:
            writer.write(said)
            await writer.drain()
            await asyncio.sleep(30)
            return False

        connections = delivery.Connections()
        async with Scripted(stalls).serving() as receiver:
            outcome = await delivery.send(connections, receiver.url(), SECRET, event(), SETTINGS)
            assert (outcome.status_code, outcome.error) == (None, "no answer within 2 s")
            assert 2000 <= outcome.duration_ms < 5000  # the deadline, and a busy machine
            # Hung up on (the receiver, still asleep, has not read since).
            await until(lambda: our_sockets_to(receiver.port) == [], seconds=5, what="hang-up")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Self-signed certificates: `ip.pem` for 127.0.0.1 and `elsewhere.pem` for another
    name, each beside its key."""
    folder = tmp_path_factory.mktemp("tls")
    for name, names in [("ip", "IP:127.0.0.1"), ("elsewhere", "DNS:elsewhere.example")]:
        subprocess.run(  # noqa: S603 (a fixed command)
            [  # noqa: S607 (openssl from the PATH)
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-days", "2", "-subj", "/CN=receiver",
                "-addext", f"subjectAltName={names}",
                "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.pem"),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
    return folder


def serving_tls(certificates: Path, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates / f"{name}.pem", certificates / f"{name}.key")
    return context


def trusting(certificates: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certificates / "ip.pem")
    context.load_verify_locations(certificates / "elsewhere.pem")
    return context


class TestTls:
    async def test_https_is_spoken_over_tls_to_the_urls_address(self, certificates: Path) -> None:
        connections = delivery.Connections(tls=trusting(certificates))
        async with Scripted(ok, tls=serving_tls(certificates, "ip")).serving() as receiver:
            assert receiver.url().startswith("https://")
            assert [await send(connections, receiver.url()) for _ in range(2)] == [True, True]
            assert [(r.connection, r.verified) for r in receiver.requests] == [(1, True)] * 2
            await connections.aclose()
            assert our_sockets_to(receiver.port) == []

    async def test_a_certificate_for_another_name_is_refused(self, certificates: Path) -> None:
        connections = delivery.Connections(tls=trusting(certificates))
        receiver = Scripted(ok, tls=serving_tls(certificates, "elsewhere"))
        async with receiver.serving():
            outcome = await delivery.send(connections, receiver.url(), SECRET, event(), SETTINGS)
            assert outcome.status_code is None
            assert "SSLCertVerificationError" in (outcome.error or "")
            assert receiver.requests == []
            # The name the certificate is for, asked of the same address, is accepted.
            headers = delivery.signed_headers(SECRET, event(), b"{}", datetime.now(UTC))
            headers |= {"host": "elsewhere.example", "content-length": "2"}
            origin = ("127.0.0.1", receiver.port, True)
            post = connections.post(
                origin, "elsewhere.example", b"/hooks?x=1", list(headers.items()), b"{}"
            )
            assert await asyncio.wait_for(post, 5) == 200
            assert [r.host for r in receiver.requests] == ["elsewhere.example"]
            await connections.aclose()

    async def test_plain_http_urls_are_not_tls(self, certificates: Path) -> None:
        connections = delivery.Connections(tls=trusting(certificates))
        async with Scripted(ok).serving() as receiver:
            assert await send(connections, receiver.url())
            await connections.aclose()


class TestIdle:
    async def test_idle_connections_are_closed_after_their_time(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(delivery, "KEEPALIVE_SECONDS", 0.5)
        connections = delivery.Connections(keep=4)

        async def slow(_request: Request, writer: asyncio.StreamWriter) -> bool:
            await asyncio.sleep(0.2)
            writer.write(OK)
            return True

        with closed_by_their_owner():
            async with Scripted(slow).serving() as receiver:
                # Three at once: three connections, then idle.
                assert await asyncio.gather(*(send(connections, receiver.url()) for _ in range(3)))
                assert receiver.open == 3
                await asyncio.sleep(0.6)
                connections.close_stale()
                await until(lambda: receiver.open == 0, seconds=5, what="idle ones closed")
                assert await send(connections, receiver.url())
                assert receiver.open == 1
                await connections.aclose()


class TestWorkerStops:
    async def test_no_connection_to_a_receiver_outlives_the_worker(
        self,
        engine: AsyncEngine,
        install_service_database_url: URL,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        for name, value in {
            "INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE": "true",
            "INSTALL_SERVICE_WEBHOOK_CONNECTIONS_PER_ENDPOINT": "3",
        }.items():
            monkeypatch.setenv(name, value)
        settings = WebhookSettings.from_env()
        made: list[Receiver] = []
        try:
            receiver = start(made, keep_alive=True)
            await endpoint_for(engine, receiver, settings)
            lanes = await emit(engine, await orgs(engine, 6), per_org=2)
            with closed_by_their_owner():
                async with worker(engine, install_service_database_url):
                    await until(lambda: len(receiver.delivered()) >= 12, what="every event")
                    assert our_sockets_to(receiver.port) != []  # kept open between requests
                assert our_sockets_to(receiver.port) == []
        finally:
            for found in made:
                found.stop()
        succeeded = await rows(
            engine, "SELECT count(*) AS n FROM webhook_deliveries WHERE status = 'succeeded'"
        )
        assert succeeded[0].n == sum(len(ids) for ids in lanes.values())
