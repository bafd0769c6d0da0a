"""How console handlers answer: a page from a template, a redirect after a form, and the
console's error pages (HTML, not problem+json, with the status the API would use)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, PermissionDeniedException
from litestar.response import Redirect, Template

from install_service.console.auth import SIGN_IN, session_cookie
from install_service.errors import InstallServiceError

AnyRequest = Request[Any, Any, Any]

# Every console response: nothing is loaded from anywhere but the service itself, pages are
# never framed, and pages (which show tenant data) are not cached.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; object-src 'none'",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
_NO_STORE = {"Cache-Control": "no-store"}


def page(request: AnyRequest, name: str, *, status: int = 200, **context: Any) -> Template:
    """Render `name` for the signed-in viewer (if any) with `context`."""
    return Template(
        template_name=name,
        context={"viewer": request.state.get("viewer"), **context},
        status_code=status,
        headers=_NO_STORE,
    )


def after_form(target: str) -> Redirect:
    """Post/redirect/get: a form's result is a page the browser can reload safely."""
    return Redirect(target, status_code=303)


def error_page(
    request: AnyRequest, *, status: int, code: str, detail: str, errors: Any = None
) -> Template:
    request.state.outcome = code
    return page(
        request,
        "error.html.j2",
        status=status,
        code=code,
        title=HTTPStatus(status).phrase,
        http_status=status,
        detail=detail,
        errors=errors,
    )


def domain_error(request: AnyRequest, exc: InstallServiceError) -> Response[Any]:
    """A refused operation: its page says why, with the API's status and `code`."""
    if exc.status == 401:
        return Redirect(
            f"{SIGN_IN}?ended=1", status_code=303, cookies=[session_cookie(request, None)]
        )
    return error_page(
        request,
        status=exc.status,
        code=exc.code,
        detail=exc.detail,
        errors=exc.extra.get("conflicts")
        or exc.extra.get("problems")
        or exc.extra.get("requirements")
        or exc.extra.get("required_by"),
    )


def http_error(request: AnyRequest, exc: HTTPException) -> Response[Any]:
    """Malformed input (400), a refused form (403), no such page (404), a wrong method (405)."""
    if isinstance(exc, PermissionDeniedException):
        return error_page(
            request,
            status=403,
            code="csrf_failed",
            detail="This form has expired or did not come from this console session. "
            "Go back, reload the page and try again.",
        )
    status = exc.status_code
    return error_page(
        request,
        status=status,
        code={400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(
            status, "http_error"
        ),
        detail=exc.detail,
        errors=exc.extra if isinstance(exc.extra, list) else None,
    )
