"""Console sessions: a browser signed in with an API token, held in PostgreSQL.

The browser keeps an opaque secret in an HttpOnly cookie; only its SHA-256 is stored. Every
request looks the session up together with its token and user, so a session ends as soon as
any of these holds: it was signed out (its row is deleted), it expired or sat idle too long,
its token was revoked or expired, or its user was deactivated. Nothing about a session lives
in one process, so any replica on the database serves any request.

Each session also keeps the SHA-256 of the CSRF token its browser held when it signed in; a
form must carry that very token (`Session.csrf_matches`), so a token obtained in another
browser is worthless here.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from install_service.actor import Actor
from install_service.audit import service as audit
from install_service.errors import Unauthorized
from install_service.orgs.tokens import LIVE_TOKEN, actor_for_token

# A session ends this long after sign-in at the latest, and after this long without a request.
LIFETIME = timedelta(hours=12)
IDLE = timedelta(hours=2)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Session:
    """A live session: who it acts for, and what its forms must carry."""

    id: uuid.UUID
    actor: Actor
    email: str
    csrf_hash: str
    # Its `last_seen_at` is over a minute old: `touch` records this request.
    stale: bool

    def csrf_matches(self, token: str | None) -> bool:
        """Whether a form's CSRF token is the one this session was opened with."""
        return token is not None and hmac.compare_digest(_digest(token), self.csrf_hash)


@dataclass(frozen=True, kw_only=True)
class Opened:
    """A new session and the secret its cookie carries (the only time it exists in clear)."""

    id: uuid.UUID
    secret: str
    actor: Actor


async def sign_in(session: AsyncSession, token: str, *, csrf_token: str) -> Opened:
    """Open a session for the holder of an API token; a bad token is `Unauthorized`.

    A fresh secret every time, so a cookie planted before sign-in never becomes a session.
    Sessions that have ended by time (anyone's) are deleted on the way."""
    token = token.strip()
    actor = await actor_for_token(session, token) if token else None
    if actor is None or actor.user_id is None:
        raise Unauthorized(
            "unknown, revoked or expired token, or a deactivated user", code="invalid_token"
        )
    await session.execute(
        text("""DELETE FROM console_sessions
                WHERE expires_at <= now() OR last_seen_at <= now() - CAST(:idle AS interval)"""),
        {"idle": IDLE},
    )
    secret = secrets.token_urlsafe(32)
    session_id: uuid.UUID = (
        await session.execute(
            text("""
                INSERT INTO console_sessions (secret_hash, token_id, user_id, csrf_hash,
                                              expires_at)
                VALUES (:secret, :token, :user, :csrf, now() + CAST(:lifetime AS interval))
                RETURNING id"""),
            {
                "secret": _digest(secret),
                "token": actor.token_id,
                "user": actor.user_id,
                "csrf": _digest(csrf_token),
                "lifetime": LIFETIME,
            },
        )
    ).scalar_one()
    await audit.record(
        session,
        actor=actor.user_id,
        action="console.signed_in",
        target_type="console_session",
        target_id=session_id,
        details={"token_id": str(actor.token_id)},
    )
    return Opened(id=session_id, secret=secret, actor=actor)


async def find(conn: AsyncSession | AsyncConnection, secret: str) -> Session | None:
    """The live session a cookie's secret opens, acting as its token's user; None when it
    has ended (see the module docstring). Read-only: `touch` records the request."""
    digest = _digest(secret)
    row = (
        await conn.execute(
            text(f"""
                SELECT s.id, s.secret_hash, s.csrf_hash, s.token_id, u.id AS user_id, u.email,
                       u.is_platform_admin,
                       s.last_seen_at < now() - interval '1 minute' AS stale
                FROM console_sessions s
                JOIN api_tokens t ON t.id = s.token_id
                JOIN users u ON u.id = t.user_id
                WHERE s.secret_hash = :hash
                  AND s.expires_at > now() AND s.last_seen_at > now() - CAST(:idle AS interval)
                  AND {LIVE_TOKEN}"""),  # noqa: S608 (constants only)
            {"hash": digest, "idle": IDLE},
        )
    ).first()
    # The index finds the row; the comparison itself is constant-time as well.
    if row is None or not hmac.compare_digest(row.secret_hash, digest):
        return None
    actor = Actor(
        user_id=row.user_id, is_platform_admin=row.is_platform_admin, token_id=row.token_id
    )
    return Session(
        id=row.id, actor=actor, email=row.email, csrf_hash=row.csrf_hash, stale=row.stale
    )


async def touch(conn: AsyncSession | AsyncConnection, found: Session) -> None:
    """Record a request on the session (keeps it from idling out), at most once a minute and
    never waiting on another request doing the same."""
    if not found.stale:
        return
    await conn.execute(
        text("""
            UPDATE console_sessions SET last_seen_at = now()
            WHERE id = (SELECT id FROM console_sessions WHERE id = :id
                        AND last_seen_at < now() - interval '1 minute'
                        FOR UPDATE SKIP LOCKED)"""),
        {"id": found.id},
    )


async def sign_out(session: AsyncSession, found: Session) -> None:
    """End a session: its row is deleted, so no replica finds it again."""
    deleted = await session.scalar(
        text("DELETE FROM console_sessions WHERE id = :id RETURNING id"), {"id": found.id}
    )
    if deleted is not None:
        await audit.record(
            session,
            actor=found.actor.user_id,
            action="console.signed_out",
            target_type="console_session",
            target_id=found.id,
            details={"token_id": str(found.actor.token_id)},
        )


async def csrf_secret(conn: AsyncSession | AsyncConnection) -> str:
    """The key every replica signs console CSRF tokens with (made by the migration)."""
    secret: str = (await conn.execute(text("SELECT secret FROM console_secret"))).scalar_one()
    return secret
