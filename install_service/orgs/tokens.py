"""API tokens: issue, authenticate, list, revoke, and the platform admin's bootstrap token.

Tokens are opaque; only their SHA-256 is stored, with a short prefix to tell them apart. A token
works while it is not revoked, not expired and its user is not deactivated; each check happens
on every request, so revocation, expiry and deactivation take effect on the next one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from install_service.actor import Actor
from install_service.audit import service as audit
from install_service.errors import Invalid, NotFound, Unauthorized
from install_service.orgs.schemas import Token, TokenCreated, TokenPage
from install_service.pagination import Keyset, PageRequest

TOKEN_PREFIX = "isk_"  # noqa: S105 (a prefix that makes leaked tokens greppable)
_SHOWN_PREFIX = len(TOKEN_PREFIX) + 4
_COLUMNS = "id, user_id, name, prefix, created_at, last_used_at, expires_at, revoked_at"


# When a token (`t`) of a user (`u`) works: not revoked, not expired, user not deactivated.
LIVE_TOKEN = """t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())
    AND u.deactivated_at IS NULL"""  # noqa: S105 (SQL, not a secret)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def issue_token(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    name: str = "",
    token: str | None = None,
    expires_at: datetime | None = None,
    bootstrap: str | None = None,
) -> TokenCreated:
    """Store the hash of a new (or the given) opaque token; the result carries the secret."""
    secret = token or TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = (
        await session.execute(
            text(f"""
                INSERT INTO api_tokens (user_id, token_hash, name, prefix, expires_at, bootstrap)
                VALUES (:user, :hash, :name, :prefix, :expires_at, :bootstrap)
                RETURNING {_COLUMNS}"""),  # noqa: S608 (constants only)
            {
                "user": user_id,
                "hash": hash_token(secret),
                "name": name,
                # Only generated tokens show a prefix: an operator's chosen token is all secret.
                "prefix": secret[:_SHOWN_PREFIX] if token is None else None,
                "expires_at": expires_at,
                "bootstrap": bootstrap,
            },
        )
    ).one()
    return TokenCreated(**row._mapping, token=secret)


async def actor_for_token(session: AsyncSession | AsyncConnection, token: str) -> Actor | None:
    """The user a bearer token belongs to, or None for unknown, revoked or expired tokens and
    deactivated users. Read-only: `note_use` records the use, inside the unit of work."""
    digest = hash_token(token)
    row = (
        await session.execute(
            text(f"""
                SELECT t.id, t.token_hash, u.id AS user_id, u.is_platform_admin,
                       t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute'
                           AS stale
                FROM api_tokens t JOIN users u ON u.id = t.user_id
                WHERE t.token_hash = :hash AND {LIVE_TOKEN}"""),  # noqa: S608 (constants only)
            {"hash": digest},
        )
    ).first()
    # The index finds the row; the comparison itself is constant-time as well.
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    return Actor(
        user_id=row.user_id,
        is_platform_admin=row.is_platform_admin,
        token_id=row.id,
        note_token_use=row.stale,
    )


def invalid_token() -> Unauthorized:
    """What a request whose token no longer works is told (401)."""
    return Unauthorized(
        "unknown, revoked or expired token, or a deactivated user", code="invalid_token"
    )


async def current_actor(session: AsyncSession, actor: Actor) -> Actor:
    """The actor as it stands now: its token still live, its user still active, and whether
    it is still a platform admin. A request checks this once, when it starts; an answer that
    waits (a long poll) checks it again before it says anything, or raises `invalid_token`
    as the caller's next request would be told. The system actor is always itself."""
    if actor.user_id is None:
        return actor
    row = (
        await session.execute(
            text(f"""
                SELECT u.is_platform_admin
                FROM users u LEFT JOIN api_tokens t ON t.id = CAST(:token AS uuid)
                                                   AND t.user_id = u.id
                WHERE u.id = :user
                  AND (CAST(:token AS uuid) IS NULL AND u.deactivated_at IS NULL
                       OR t.id IS NOT NULL AND {LIVE_TOKEN})"""),  # noqa: S608 (constants only)
            {"user": actor.user_id, "token": actor.token_id},
        )
    ).first()
    if row is None:
        raise invalid_token()
    return Actor(
        user_id=actor.user_id,
        is_platform_admin=row.is_platform_admin,
        token_id=actor.token_id,
        note_token_use=False,
    )


async def note_use(session: AsyncSession, actor: Actor) -> None:
    """Set the token's `last_used_at`, at most once a minute and never waiting on another
    request that is setting it. Part of the caller's unit of work: a refused request (rolled
    back) leaves no trace."""
    if actor.token_id is None or not actor.note_token_use:
        return
    await session.execute(
        text("""
            UPDATE api_tokens SET last_used_at = now()
            WHERE id = (SELECT id FROM api_tokens
                        WHERE id = :id
                          AND (last_used_at IS NULL
                               OR last_used_at < now() - interval '1 minute')
                        FOR UPDATE SKIP LOCKED)"""),
        {"id": actor.token_id},
    )


async def create_token(
    session: AsyncSession, actor: Actor, *, name: str = "", expires_at: datetime | None = None
) -> TokenCreated:
    """A new token for the signed-in user; its secret is in the result, this once."""
    if actor.user_id is None:
        raise Invalid("only a user can hold tokens", code="user_required")
    if expires_at is not None:
        if expires_at.tzinfo is None:
            raise Invalid("expires_at needs a time zone (e.g. ...Z)", code="invalid_expiry")
        if expires_at <= datetime.now(UTC):
            raise Invalid("expires_at must be in the future", code="invalid_expiry")
    created = await issue_token(session, user_id=actor.user_id, name=name, expires_at=expires_at)
    await audit.record(
        session,
        actor=actor.user_id,
        action="token.created",
        target_type="token",
        target_id=created.id,
        details={"user_id": str(actor.user_id), "name": name},
    )
    return created


_KEYSET = Keyset("tokens", (datetime, uuid.UUID))


async def list_tokens(session: AsyncSession, user_id: uuid.UUID, page: PageRequest) -> TokenPage:
    """A user's tokens, oldest first, revoked and expired ones included (never the secret)."""
    rows = await session.execute(
        text(f"""
            SELECT {_COLUMNS} FROM api_tokens
            WHERE user_id = :user
              AND (CAST(:after_0 AS timestamptz) IS NULL
                   OR (created_at, id) > (:after_0, CAST(:after_1 AS uuid)))
            ORDER BY created_at, id LIMIT :limit_plus_one"""),  # noqa: S608 (constants only)
        {"user": user_id, **_KEYSET.params(page)},
    )
    tokens = [Token(**r._mapping) for r in rows]
    return _KEYSET.page(TokenPage, tokens, page, lambda t: (t.created_at, t.id))


async def revoke_token(
    session: AsyncSession, actor: Actor, token_id: uuid.UUID, *, any_user: bool = False
) -> Token:
    """Revoke one of the actor's tokens (any user's, with `any_user`, for platform admins).

    Revoking a revoked token changes nothing and answers the same."""
    row = (
        await session.execute(
            text("""
                WITH target AS (
                    SELECT id, revoked_at FROM api_tokens
                    WHERE id = :id AND (:any_user OR user_id = CAST(:actor AS uuid))
                    FOR UPDATE),
                revoked AS (
                    UPDATE api_tokens t SET revoked_at = now()
                    FROM target WHERE t.id = target.id AND target.revoked_at IS NULL
                    RETURNING t.revoked_at)
                SELECT t.id, t.user_id, t.name, t.prefix, t.created_at, t.last_used_at,
                       t.expires_at, coalesce((SELECT revoked_at FROM revoked), t.revoked_at)
                           AS revoked_at,
                       EXISTS (SELECT 1 FROM revoked) AS changed
                FROM api_tokens t JOIN target ON target.id = t.id"""),
            {"id": token_id, "actor": actor.user_id, "any_user": any_user},
        )
    ).first()
    if row is None:
        raise NotFound(f"token {token_id} not found", code="token_not_found")
    values: dict[str, Any] = dict(row._mapping)
    if values.pop("changed"):
        await audit.record(
            session,
            actor=actor.user_id,
            action="token.revoked",
            target_type="token",
            target_id=token_id,
            details={"user_id": str(values["user_id"])},
        )
    return msgspec.convert(values, Token)
