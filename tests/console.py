"""Helpers for the console's tests: signing a client in, reading a page's CSRF token, and two
templates where one requires the other (contract §13)."""

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


def core_doc(person: str = "resident") -> dict[str, Any]:
    """`core-people`: a template others require; `person` names its entity type for people
    (`person` collides with `starter`'s)."""
    return {
        "slug": "core-people",
        "name": "Core people",
        "entity_types": [
            {"slug": person, "name": "Person"},
            {"slug": "household", "name": "Household"},
        ],
    }


def budget_doc(*, requires: bool = True) -> dict[str, Any]:
    """`household-budget`: with `requires`, a release that requires `core-people` (release 1
    or later) and references its `household`; without, one that stands alone."""
    doc: dict[str, Any] = {
        "slug": "household-budget",
        "name": "Household budget",
        "entity_types": [{"slug": "budget", "name": "Budget"}],
    }
    if requires:
        doc["requires"] = [{"template": "core-people", "version": 1}]
        doc["relationship_types"] = [
            {
                "slug": "budget_for",
                "name": "Budget for",
                "rules": [{"source": "budget", "target": "core-people:household"}],
            }
        ]
    return doc
