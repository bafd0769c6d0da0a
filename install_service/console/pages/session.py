"""Signing in with an API token, signing out, and the home page."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, QueryParameter
from litestar.response import Redirect, Template

from install_service.console.auth import (
    CSRF_COOKIE,
    SIGN_IN,
    safe_next,
    session_cookie,
)
from install_service.console.pages.common import AnyRequest, SignedIn
from install_service.console.render import after_form, page
from install_service.deps import Session
from install_service.errors import Unauthorized
from install_service.orgs import sessions


class SignInForm(msgspec.Struct, kw_only=True):
    token: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    next: Annotated[str, msgspec.Meta(max_length=2000)] = ""


Notice = Annotated[str | None, QueryParameter(max_length=2000)]


class SessionPages(Controller):
    path = "/"

    @get("/", name="console:home")
    async def home(self, request: AnyRequest, viewer: SignedIn) -> Template:
        return page(request, "home.html.j2")

    @get("/sign-in", name="console:sign-in", opt={"public": True})
    async def sign_in_form(
        self,
        request: AnyRequest,
        next: Notice = None,
        ended: Notice = None,
        signed_out: Notice = None,
    ) -> Template:
        return page(
            request,
            "sign_in.html.j2",
            next=safe_next(next),
            ended=ended is not None,
            signed_out=signed_out is not None,
        )

    @post("/sign-in", opt={"public": True})
    async def sign_in(
        self,
        request: AnyRequest,
        session: Session,
        data: Annotated[SignInForm, Body(media_type=RequestEncodingType.URL_ENCODED)],
    ) -> Response[Any]:
        # Litestar's CSRF middleware let this form in only with the token of this cookie.
        csrf = request.cookies.get(CSRF_COOKIE, "")
        try:
            opened = await sessions.sign_in(session, data.token, csrf_token=csrf)
        except Unauthorized as exc:
            request.state.outcome = exc.code
            return page(
                request,
                "sign_in.html.j2",
                status=401,
                next=safe_next(data.next),
                error="That token is unknown, revoked or expired, or its user is deactivated.",
            )
        request.state.user_id = str(opened.actor.user_id)
        redirect = Redirect(safe_next(data.next), status_code=303)
        redirect.cookies.append(session_cookie(request, opened.secret))
        return redirect

    @post("/sign-out")
    async def sign_out(self, request: AnyRequest, session: Session, viewer: SignedIn) -> Redirect:
        await sessions.sign_out(session, viewer.session)
        redirect = after_form(f"{SIGN_IN}?signed_out=1")
        redirect.cookies.append(session_cookie(request, None))
        return redirect
