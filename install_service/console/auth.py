"""Who is looking at the console: the session behind the cookie, checked before anything else.

Every console request except sign-in and static assets needs a live session
(`install_service.orgs.sessions`); without one a page redirects to sign-in, and a live part
of a page (an htmx request) tells the browser to go there. A state-changing request must also
carry the CSRF token bound to its session: Litestar's CSRF middleware has already checked that
the form's token matches the browser's CSRF cookie, and here that cookie must be the one the
session was opened with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from litestar import Request, Response
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.exceptions import PermissionDeniedException
from litestar.response import Redirect

from install_service.actor import Actor
from install_service.errors import Forbidden
from install_service.orgs import sessions

SESSION_COOKIE = "console_session"
CSRF_COOKIE = "console_csrf"
PREFIX = "/console"
SIGN_IN = f"{PREFIX}/sign-in"
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


@dataclass(frozen=True, kw_only=True)
class Viewer:
    """The signed-in user a page is rendered for."""

    actor: Actor
    email: str
    session: sessions.Session

    @property
    def is_admin(self) -> bool:
        return self.actor.is_platform_admin


def session_cookie(request: Request[Any, Any, Any], value: str | None) -> Cookie:
    """The session cookie (None: the cookie that deletes it). HttpOnly, SameSite=Strict, only
    sent to the console, Secure whenever the console is reached over HTTPS; no expiry, so it
    goes with the browser session (the server ends it sooner or later anyway)."""
    return Cookie(
        key=SESSION_COOKIE,
        value=value or "",
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=None if value else 0,
    )


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path, never another site."""
    if (
        target
        and (target == PREFIX or target.startswith(PREFIX + "/"))
        and "//" not in target
        and "\\" not in target
        and not any(ord(c) < 0x20 for c in target)
    ):
        return target
    return PREFIX + "/"


def _to_sign_in(request: Request[Any, Any, Any], *, ended: bool) -> Response[Any]:
    target = SIGN_IN + ("?ended=1" if ended else "")
    if not ended and request.method == "GET":
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target = f"{SIGN_IN}?next={quote(here)}"
    cookies = [session_cookie(request, None)] if ended else []
    if request.headers.get("hx-request"):
        # A live part of a page: htmx follows this header with a full page load.
        return Response(b"", status_code=401, headers={"HX-Redirect": target}, cookies=cookies)
    return Redirect(target, status_code=303, cookies=cookies)


async def authenticate(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """Before anything else is read from a console request: find its live session (or send
    the browser to sign in), check the CSRF binding of a state-changing request, and make the
    session's user the request's actor."""
    request.state.actor = None
    request.state.viewer = None
    if request.route_handler.opt.get("public"):
        return None
    secret = request.cookies.get(SESSION_COOKIE)
    found: sessions.Session | None = None
    if secret:
        async with request.app.state.engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            found = await sessions.find(autocommit, secret)
            if found is not None:
                await sessions.touch(autocommit, found)
    if found is None:
        return _to_sign_in(request, ended=bool(secret))
    if request.method not in _SAFE_METHODS and not found.csrf_matches(
        request.cookies.get(CSRF_COOKIE)
    ):
        raise PermissionDeniedException("this form does not belong to your session")
    request.state.user_id = str(found.actor.user_id)
    request.state.actor = found.actor
    request.state.viewer = Viewer(actor=found.actor, email=found.email, session=found)
    return None


async def provide_viewer(request: Request[Any, Any, Any]) -> Viewer:
    viewer: Viewer = request.state.viewer
    return viewer


async def provide_platform_admin(viewer: NamedDependency[Viewer]) -> Viewer:
    """A platform admin, or 403 (as the API's admin endpoints answer)."""
    if not viewer.is_admin:
        raise Forbidden("this page needs a platform admin", code="admin_required")
    return viewer
