"""Domain errors. Each carries a stable machine `code` and the HTTP status it maps to.

Domain code raises these and nothing HTTP-specific; the API renders them as RFC 9457
problem+json in one place, the CLI prints them, and resync items store them.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar


class InstallServiceError(Exception):
    """Base of every error the service reports to a caller on purpose."""

    code: ClassVar[str] = "error"
    status: ClassVar[int] = 400
    title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code  # type: ignore[misc]
        self.extra = extra

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "title": self.title, "detail": self.detail, **self.extra}


class BadRequest(InstallServiceError):
    code = "invalid_request"
    status = 400
    title = "Bad Request"


class Unauthorized(InstallServiceError):
    code = "unauthorized"
    status = 401
    title = "Unauthorized"


class NotFound(InstallServiceError):
    code = "not_found"
    status = 404
    title = "Not found"


class Forbidden(InstallServiceError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


class Conflict(InstallServiceError):
    code = "conflict"
    status = 409
    title = "Conflict"


class InstallConflict(Conflict):
    """The plan found conflicts; `conflicts` lists every one of them."""

    code = "install_conflict"

    def __init__(self, conflicts: list[dict[str, Any]]) -> None:
        super().__init__(
            f"{len(conflicts)} item(s) conflict with rows in the organization; nothing was written",
            conflicts=conflicts,
        )
        self.conflicts = conflicts


class PreconditionFailed(InstallServiceError):
    """`If-Match` named a version of the resource that is no longer its current one."""

    code = "precondition_failed"
    status = 412
    title = "Precondition failed"


class Unavailable(InstallServiceError):
    code = "database_unavailable"
    status = 503
    title = "Service unavailable"


class Invalid(InstallServiceError):
    code = "invalid"
    status = 422
    title = "Unprocessable request"


class TemplateDocumentInvalid(Invalid):
    """A template document failed validation; `problems` lists every problem found."""

    code = "invalid_template_document"

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__(
            f"the template document has {len(problems)} problem(s); nothing was written",
            problems=problems,
        )
        self.problems = problems


class SchemaItemInvalid(Invalid):
    """An item of an organization's schema failed validation; `problems` lists every one."""

    code = "invalid_schema_item"

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__(
            f"the item has {len(problems)} problem(s); nothing was written", problems=problems
        )
        self.problems = problems


# What each text pattern of the request and document types means, in words: validation
# reports a pattern as the regular expression it is, which tells a person nothing.
_PATTERN_WORDS: dict[str, str] = {}
_MATCHING = re.compile(r"`str` matching regex (?P<pattern>'(?:[^'\\]|\\.)*')")


def worded(pattern: str, words: str) -> str:
    """Register `words` as what `pattern` means (for `in_words`); returns the pattern, so a
    type declares both in one place: `Meta(pattern=worded(r"^...$", "a slug: ..."))`."""
    _PATTERN_WORDS[repr(pattern)] = words
    return pattern


def in_words(message: str) -> str:
    """A validation message with every regular expression replaced by what it means."""
    return _MATCHING.sub(
        lambda m: _PATTERN_WORDS.get(m["pattern"], "text in the expected form"), message
    )
