"""The RFC 9457 problem body every error response carries, for the OpenAPI schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation


class Problem(msgspec.Struct, kw_only=True):
    """application/problem+json: `code` is stable for machines, `detail` is for people."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str
    request_id: str | None = None
    # 409 install_conflict: every conflicting item, with its conflicting paths (`fields`).
    conflicts: list[dict[str, Any]] | None = None
    # 422 invalid_template_document: every problem of the document.
    problems: list[dict[str, str]] | None = None
    # 400 invalid_request: what failed to validate.
    errors: list[dict[str, Any]] | None = None
    # 422 unknown_organizations / organizations_not_selected: every organization named.
    organizations: list[str] | None = None
    # 409 resync_run_in_progress: the unfinished run of the template.
    run_id: str | None = None


_MEANINGS = {
    400: "Malformed body, unknown field or bad parameter",
    401: "Missing, malformed, unknown or revoked bearer token",
    403: "Signed in, but the role is too low",
    404: "Unknown, or not visible to the caller",
    409: "Conflict: nothing was written",
    412: "If-Match names a version that is no longer current: nothing was written",
    413: "Request body over the size limit",
    422: "Well-formed but semantically invalid",
    503: "Database unavailable; retry shortly",
}


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """The problem responses an operation can return, for its OpenAPI document.

    List only what the handler can really answer: 400 and 413 where it reads a body or
    validates parameters, 401 where it reads a token, 403 where a role or platform admin is
    needed, 404/409/422 where its service raises them, 503 wherever it uses the database."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=_MEANINGS[status],
            media_type="application/problem+json",
            generate_examples=False,
        )
        for status in sorted(statuses)
    }


# What most operations share: a signed-in caller, and the database behind it.
SIGNED_IN = (401, 503)
ADMIN = (401, 403, 503)
WITH_BODY = (400, 413)


@dataclass
class NoBadRequest(Operation):
    """For operations whose parameters cannot be malformed. Litestar documents a 400 for every
    operation with parameters, but a segment that is not a `uuid` matches no route (404), and
    a name is any text (one that cannot exist is not found, 404): these never answer 400."""

    def __post_init__(self) -> None:
        if self.responses is not None:
            self.responses.pop("400", None)
