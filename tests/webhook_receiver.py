"""A real HTTP receiver for webhook tests: a threaded server on a loopback port that verifies
Standard Webhooks signatures with the reference library, and can be down, fail or stall."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    webhook_id: str
    status: int
    payload: dict[str, Any] | None
    host: str
    at: float = field(default_factory=time.monotonic)
    # When the request arrived, and from which client port (one per connection).
    started: float = 0.0
    peer: int = 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # a dispatcher opens several connections at once


class Receiver:
    """`mode`: "ok" (`ok_status`, 200 unless set), "fail" (500), "stall" (hold the request
    `stall_seconds`, then `ok_status`). `stop()` takes it down (connections refused), `start()` brings it back on the same
    port. With `keep_alive`, it speaks HTTP/1.1 and keeps connections open between requests
    (else each response closes its connection)."""

    keep_alive = False

    def __init__(self) -> None:
        self.secret: str | None = None
        self.mode = "ok"
        self.ok_status = 200
        self.stall_seconds = 60.0
        self.requests: list[Received] = []
        # Every request's webhook-id as it arrives (before it is answered).
        self.arrivals: list[str] = []
        # Every request's raw body and headers, as received.
        self.raw: list[tuple[bytes, dict[str, str]]] = []
        self.bad_signatures = 0
        self.lock = threading.Lock()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if receiver.keep_alive else "HTTP/1.0"

            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                started = time.monotonic()
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.arrivals.append(self.headers.get("webhook-id", ""))
                    receiver.raw.append((body, dict(self.headers.items())))
                mode = receiver.mode
                if mode == "stall":
                    time.sleep(receiver.stall_seconds)
                payload = None
                try:
                    assert receiver.secret is not None
                    payload = Webhook(receiver.secret).verify(body, dict(self.headers.items()))
                    status = 500 if mode == "fail" else receiver.ok_status
                except (WebhookVerificationError, AssertionError, ValueError):
                    with receiver.lock:
                        receiver.bad_signatures += 1
                    status = 400
                with receiver.lock:
                    receiver.requests.append(
                        Received(
                            webhook_id=self.headers.get("webhook-id", ""),
                            status=status,
                            payload=payload,
                            host=self.headers.get("host", ""),
                            started=started,
                            peer=self.client_address[1],
                        )
                    )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def delivered(self) -> list[dict[str, Any]]:
        """The events received and answered with a 2xx, in arrival order."""
        with self.lock:
            return [r.payload["data"] for r in self.requests if 200 <= r.status < 300 and r.payload]

    def log(self) -> list[Received]:
        with self.lock:
            return list(self.requests)


def event_ids(delivered: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in delivered]


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
