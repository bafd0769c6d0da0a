"""Request-scoped dependencies: the unit of work and who is asking."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import PathParameter
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.db.session import transaction
from install_service.errors import Forbidden, Unauthorized
from install_service.orgs.service import Actor, actor_for_token

# Handler parameters name the dependency they receive: `session`, `actor`, `user`, `admin`.
Session = NamedDependency[AsyncSession]
MaybeActor = NamedDependency[Actor | None]
User = NamedDependency[Actor]

# A path segment naming an organization. Any text is accepted: a name that cannot exist is
# simply not found (404), like one that does not exist.
OrgPath = Annotated[str, PathParameter(description="Organization slug or id")]
# Security requirements for the OpenAPI document: a bearer token, or optionally one.
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
OPTIONAL_BEARER: list[dict[str, list[str]]] = [{}, {"bearer": []}]


async def provide_session(state: State) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed after the handler returns and before the
    response is sent, rolled back if anything raises."""
    async with transaction(state.engine) as session:
        yield session


async def provide_actor(request: Request, session: Session) -> Actor | None:  # type: ignore[type-arg]
    """The caller of a bearer token; None when no token is sent. A bad token is a 401."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("use 'Authorization: Bearer <token>'", code="bad_authorization_header")
    actor = await actor_for_token(session, token.strip())
    if actor is None:
        raise Unauthorized("unknown or revoked token", code="invalid_token")
    request.state.user_id = str(actor.user_id)
    return actor


async def provide_user(actor: MaybeActor) -> Actor:
    """A signed-in caller, or 401."""
    if actor is None:
        raise Unauthorized("this endpoint needs a bearer token", code="authentication_required")
    return actor


async def provide_admin(user: User) -> Actor:
    """A platform admin, or 403."""
    if not user.is_platform_admin:
        raise Forbidden("this endpoint needs a platform admin", code="admin_required")
    return user
