"""What the current unit of work is part of, for records that outlive it (audit rows).

Set by the edge that owns the unit of work (the request middleware, a job); read by domain code
that records it, so no domain function needs an HTTP type to know its request id.
"""

from __future__ import annotations

from contextvars import ContextVar

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
