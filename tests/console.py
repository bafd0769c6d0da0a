"""Helpers for the console's tests: signing a client in, reading a page's CSRF token."""

from __future__ import annotations

import re
from typing import Any

import httpx

_CSRF = re.compile(r'name="_csrf_token" value="([^"]+)"')


def csrf_token(html: str) -> str:
    """The CSRF token a page's forms carry."""
    found = _CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


async def sign_in(client: Any, token: str) -> httpx.Response:
    """Sign a client in through the sign-in form (the client keeps the cookies)."""
    form = await client.get("/console/sign-in")
    return await client.post(
        "/console/sign-in",
        data={"_csrf_token": csrf_token(form.text), "token": token, "next": "/console/"},
        follow_redirects=False,
    )


async def post_form(client: Any, path: str, form_page: str, **fields: str) -> httpx.Response:
    """Submit a form the way the browser does: with the CSRF token of the page it is on."""
    page = await client.get(form_page)
    assert page.status_code == 200, page.text
    return await client.post(
        path, data={"_csrf_token": csrf_token(page.text), **fields}, follow_redirects=False
    )
