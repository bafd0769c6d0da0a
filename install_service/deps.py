"""Request-scoped dependencies: the unit of work, who is asking, which page; and the request
class that refuses malformed JSON bodies with a 400."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgspec
from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import SerializationException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.params import PathParameter, QueryParameter
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.errors import Forbidden, Unauthorized, in_words
from install_service.orgs.tokens import actor_for_token, invalid_token, note_use
from install_service.pagination import DEFAULT_LIMIT, MAX_LIMIT, PageRequest

# Handler parameters name the dependency they receive: `session`, `actor`, `user`, `admin`,
# `page`.
Session = NamedDependency[AsyncSession]
MaybeActor = NamedDependency[Actor | None]
User = NamedDependency[Actor]
PageParams = NamedDependency[PageRequest]

# JSON bodies nested deeper than this are refused (400) before anything walks them.
MAX_JSON_DEPTH = 64

# A path segment naming an organization. Any text is accepted: a name that cannot exist is
# simply not found (404), like one that does not exist.
OrgPath = Annotated[str, PathParameter(description="Organization slug or id")]
# Security requirements for the OpenAPI document: a bearer token, or optionally one.
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
OPTIONAL_BEARER: list[dict[str, list[str]]] = [{}, {"bearer": []}]


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        if children and depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class ServiceRequest(Request[Any, Any, Any]):
    """A request whose JSON body is refused with a 400 when it is not UTF-8, nests deeper than
    `MAX_JSON_DEPTH` or is otherwise undecodable (never a 500), or when a value has the wrong
    JSON type for its field: Litestar converts bodies leniently (as it must query strings),
    which would read `{"count": "1"}` as the number 1; a JSON body says what it means."""

    async def json(self) -> Any:
        try:
            value = await super().json()
        except (UnicodeDecodeError, RecursionError) as exc:
            raise SerializationException(
                "the body is not valid UTF-8 JSON"
                if isinstance(exc, UnicodeDecodeError)
                else f"the body nests deeper than {MAX_JSON_DEPTH} levels"
            ) from exc
        if _too_deep(value, MAX_JSON_DEPTH):
            raise SerializationException(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        body = self.route_handler.parsed_fn_signature.parameters.get("data")
        if body is not None:
            try:
                msgspec.convert(value, body.annotation, strict=True)
            except msgspec.ValidationError as exc:
                raise ValidationException(
                    f"Validation failed for {self.method} {self.url.path}",
                    extra=[{"message": in_words(str(exc)), "source": "body"}],
                ) from exc
        return value


def _wants(handler: HTTPRouteHandler, *names: str) -> bool:
    """Whether the handler takes one of these dependencies (its parameters name them)."""
    return not set(names).isdisjoint(handler.parsed_fn_signature.parameters)


async def authenticate(request: Request[Any, Any, Any]) -> None:
    """Before anything else is read from the request (body and query included), find who is
    calling: so a request without a valid token is a 401 (and a non-admin on an admin endpoint
    a 403) whatever else is wrong with it.

    The token is looked up outside the request's transaction, in one autocommitted read."""
    header = request.headers.get("authorization")
    actor: Actor | None = None
    if not _wants(request.route_handler, "actor", "user", "admin"):
        header = None  # health, metrics, docs: whoever asks, whatever token they send
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "use 'Authorization: Bearer <token>'", code="bad_authorization_header"
            )
        engine = request.app.state.engine
        async with engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            actor = await actor_for_token(autocommit, token.strip())
        if actor is None:
            raise invalid_token()
        request.state.user_id = str(actor.user_id)
        if _wants(request.route_handler, "admin"):
            require_admin(actor)
    elif _wants(request.route_handler, "user", "admin"):
        raise Unauthorized("this endpoint needs a bearer token", code="authentication_required")
    request.state.actor = actor


@asynccontextmanager
async def unit_of_work(engine: AsyncEngine, actor: Actor | None) -> AsyncIterator[AsyncSession]:
    """A request's transaction: committed when the block ends, rolled back if it raises; the
    token's use is noted in it."""
    async with transaction(engine) as session:
        if actor is not None:
            await note_use(session, actor)
        yield session


async def provide_session(
    state: State,
    request: Request[Any, Any, Any],
) -> AsyncIterator[AsyncSession]:
    """One transaction per request (`unit_of_work`): committed after the handler returns and
    before the response is sent."""
    async with unit_of_work(state.engine, request.state.actor) as session:
        yield session


async def provide_actor(request: Request[Any, Any, Any]) -> Actor | None:
    """The caller `authenticate` found; None when no token was sent."""
    actor: Actor | None = request.state.actor
    return actor


async def provide_user(actor: MaybeActor) -> Actor:
    """A signed-in caller, or 401."""
    if actor is None:
        raise Unauthorized("this endpoint needs a bearer token", code="authentication_required")
    return actor


def require_admin(actor: Actor) -> Actor:
    """A platform admin, or 403."""
    if not actor.is_platform_admin:
        raise Forbidden("this endpoint needs a platform admin", code="admin_required")
    return actor


async def provide_admin(user: User) -> Actor:
    """A platform admin, or 403."""
    return require_admin(user)


async def provide_page(
    limit: Annotated[
        int,
        QueryParameter(
            ge=1,
            le=MAX_LIMIT,
            description=f"Items per page ({DEFAULT_LIMIT} by default, at most {MAX_LIMIT}).",
        ),
    ] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        QueryParameter(
            max_length=1000,
            description="The `next_cursor` of the previous page; omitted, the first page.",
        ),
    ] = None,
) -> PageRequest:
    """The page a list endpoint is asked for; a limit out of range is a 400."""
    return PageRequest(limit=limit, cursor=cursor)
