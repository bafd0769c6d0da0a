"""What every console page module shares: dependency types and the page parameter."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from install_service.console.auth import Viewer
from install_service.pagination import PageRequest

AnyRequest = Request[Any, Any, Any]
# Handler parameters name the console dependency they receive: `viewer` (signed in) or
# `admin` (a platform admin).
SignedIn = NamedDependency[Viewer]
Cursor = Annotated[
    str | None,
    QueryParameter(max_length=1000, description="The next page's cursor, from a 'Next' link."),
]


def page_of(cursor: str | None) -> PageRequest:
    """The page a list shows: the first, or the one after `cursor` (a bad cursor is a 400)."""
    return PageRequest(cursor=cursor)
