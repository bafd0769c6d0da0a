"""The RFC 9457 problem body every error response carries, for the OpenAPI schema."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec


class Problem(msgspec.Struct, kw_only=True):
    """application/problem+json: `code` is stable for machines, `detail` is for people."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str
    request_id: str | None = None
    # 409 install_conflict: every conflicting item.
    conflicts: list[dict[str, str]] | None = None
    # 422 invalid_template_document: every problem of the document.
    problems: list[dict[str, str]] | None = None
    # 400 invalid_request: what failed to validate.
    errors: list[dict[str, Any]] | None = None
    # 422 unknown_organizations: every organization named that does not exist.
    organizations: list[str] | None = None


_MEANINGS = {
    400: "Malformed body, unknown field or bad parameter",
    401: "Missing, malformed, unknown or revoked bearer token",
    403: "Signed in, but the role is too low",
    404: "Unknown, or not visible to the caller",
    409: "Conflict: nothing was written",
    413: "Request body over the size limit",
    422: "Well-formed but semantically invalid",
    503: "Database unavailable; retry shortly",
}

PROBLEMS = {
    status: ResponseSpec(
        data_container=Problem,
        description=meaning,
        media_type="application/problem+json",
        generate_examples=False,
    )
    for status, meaning in _MEANINGS.items()
}
