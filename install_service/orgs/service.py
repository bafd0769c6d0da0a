"""Tenancy: organizations, users, memberships, tokens, and who may do what in an org."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.errors import Conflict, Forbidden, Invalid, NotFound
from install_service.orgs.schemas import Member, Organization, OrgRef, UserCreated

ROLES = ("owner", "admin", "member")
MANAGER_ROLES = ("owner", "admin")
TOKEN_PREFIX = "isk_"  # noqa: S105 (a prefix that makes leaked tokens greppable)


@dataclass(frozen=True, kw_only=True)
class Actor:
    """Who is acting: a user (maybe a platform admin), or the system itself (`user_id` None)."""

    user_id: uuid.UUID | None
    is_platform_admin: bool = False

    @classmethod
    def system(cls) -> Actor:
        return cls(user_id=None, is_platform_admin=True)


@dataclass(frozen=True, kw_only=True)
class OrgAccess:
    id: uuid.UUID
    slug: str
    kind: str
    role: str | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def resolve_org(session: AsyncSession, actor: Actor, ref: str | None) -> OrgAccess:
    """The org named by slug or id (or the actor's personal org) with the actor's role in it.

    Unknown orgs and orgs the actor is not a member of are both `NotFound`, so ids leak nothing.
    """
    if ref is not None and "\x00" in ref:  # no name holds NUL (PostgreSQL refuses it)
        raise NotFound(f"organization {ref!r} not found", code="org_not_found")
    if ref is None:
        if actor.user_id is None:
            raise Invalid("an organization is required", code="organization_required")
        where = "o.kind = 'personal' AND m.role = 'owner'"
    else:
        where = "(o.slug = :ref OR o.id = CAST(:ref_id AS uuid))"
    row = (
        await session.execute(
            text(f"""
                SELECT o.id, o.slug, o.kind, m.role
                FROM organizations o
                LEFT JOIN memberships m ON m.organization_id = o.id
                                       AND m.user_id = CAST(:actor AS uuid)
                WHERE {where}
                ORDER BY o.created_at LIMIT 1"""),  # noqa: S608 (fixed fragments only)
            {"ref": ref, "ref_id": _as_uuid(ref) if ref else None, "actor": actor.user_id},
        )
    ).first()
    if row is None:
        if ref is None:
            raise NotFound("you have no personal organization; name one", code="org_not_found")
        raise NotFound(f"organization {ref!r} not found", code="org_not_found")
    if row.role is None and not actor.is_platform_admin:
        raise NotFound(f"organization {ref!r} not found", code="org_not_found")
    return OrgAccess(id=row.id, slug=row.slug, kind=row.kind, role=row.role)


def require_manager(actor: Actor, org: OrgAccess) -> None:
    """Owners and admins (and platform admins) may change what is installed in an org."""
    if actor.is_platform_admin or org.role in MANAGER_ROLES:
        return
    raise Forbidden(
        f"installing into {org.slug!r} needs the owner or admin role; you are {org.role}",
        code="role_too_low",
    )


async def create_organization(
    session: AsyncSession,
    *,
    slug: str,
    name: str,
    kind: str = "team",
    visibility: str = "private",
    owner_id: uuid.UUID | None = None,
) -> Organization:
    """Create an org (and make `owner_id` its owner). A taken slug is a `Conflict`."""
    row = (
        await session.execute(
            text("""
                INSERT INTO organizations (slug, name, kind, visibility)
                VALUES (:slug, :name, :kind, :visibility)
                ON CONFLICT (slug) DO NOTHING
                RETURNING id, slug, name, kind, visibility, created_at"""),
            {"slug": slug, "name": name, "kind": kind, "visibility": visibility},
        )
    ).first()
    if row is None:
        raise Conflict(f"organization slug {slug!r} is taken", code="org_slug_taken")
    if owner_id is not None:
        await session.execute(
            text(
                "INSERT INTO memberships (organization_id, user_id, role) VALUES (:o, :u, 'owner')"
            ),
            {"o": row.id, "u": owner_id},
        )
    return msgspec.convert(dict(row._mapping), Organization)


async def create_user(
    session: AsyncSession,
    *,
    email: str,
    name: str = "",
    is_platform_admin: bool = False,
    token: str | None = None,
) -> UserCreated:
    """Create a user, their personal org and a first API token.

    The token is in the result once; only its hash is stored.
    """
    row = (
        await session.execute(
            text("""
                INSERT INTO users (email, name, is_platform_admin)
                VALUES (lower(:email), :name, :admin)
                ON CONFLICT (email) DO NOTHING
                RETURNING id, email, name, is_platform_admin, created_at"""),
            {"email": email, "name": name, "admin": is_platform_admin},
        )
    ).first()
    if row is None:
        raise Conflict(f"a user with email {email!r} exists", code="user_email_taken")
    org = await create_organization(
        session,
        slug=f"user-{row.id.hex[:12]}",
        name=(name or row.email)[:200],
        kind="personal",
        owner_id=row.id,
    )
    token = await issue_token(session, user_id=row.id, token=token)
    return UserCreated(
        **dict(row._mapping),
        personal_organization=OrgRef(id=org.id, slug=org.slug),
        token=token,
    )


async def issue_token(
    session: AsyncSession, *, user_id: uuid.UUID, name: str = "", token: str | None = None
) -> str:
    """Store the hash of a new (or the given) opaque token and return the token."""
    token = token or TOKEN_PREFIX + secrets.token_urlsafe(32)
    await session.execute(
        text("""
            INSERT INTO api_tokens (user_id, token_hash, name) VALUES (:user, :hash, :name)
            ON CONFLICT (token_hash) DO NOTHING"""),
        {"user": user_id, "hash": hash_token(token), "name": name},
    )
    return token


async def actor_for_token(session: AsyncSession, token: str) -> Actor | None:
    """The user a bearer token belongs to, or None for unknown and revoked tokens."""
    digest = hash_token(token)
    row = (
        await session.execute(
            text("""
                SELECT t.token_hash, u.id, u.is_platform_admin
                FROM api_tokens t JOIN users u ON u.id = t.user_id
                WHERE t.token_hash = :hash AND t.revoked_at IS NULL"""),
            {"hash": digest},
        )
    ).first()
    # The index finds the row; the comparison itself is constant-time as well.
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    return Actor(user_id=row.id, is_platform_admin=row.is_platform_admin)


async def actor_for_email(session: AsyncSession, email: str | None) -> Actor:
    """Act as the user with this email, or as the operator (`Actor.system()`) for None."""
    if email is None:
        return Actor.system()
    row = (
        await session.execute(
            text("SELECT id, is_platform_admin FROM users WHERE email = lower(:e)"), {"e": email}
        )
    ).first()
    if row is None:
        raise NotFound(f"no user with email {email!r}", code="user_not_found")
    return Actor(user_id=row.id, is_platform_admin=row.is_platform_admin)


async def ensure_admin(session: AsyncSession, token: str | None) -> str | None:
    """Make sure a platform admin can sign in; return a token to show, if a new one was made.

    With `token` (INSTALL_SERVICE_ADMIN_TOKEN) that token is registered for the admin user.
    Without it, a token is made only when no platform admin has a live token yet. Safe to
    run from several processes at once (each `serve` does at start-up): they take turns.
    """
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtext('install-service:admin'))"))
    admin_id = await session.scalar(text("SELECT id FROM users WHERE email = 'admin@localhost'"))
    if admin_id is None:
        created = await create_user(
            session,
            email="admin@localhost",
            name="Platform admin",
            is_platform_admin=True,
            token=token,
        )
        return None if token else created.token
    if token is not None:
        await issue_token(
            session, user_id=admin_id, name="INSTALL_SERVICE_ADMIN_TOKEN", token=token
        )
        return None
    live = await session.scalar(
        text("""
            SELECT count(*) FROM api_tokens t JOIN users u ON u.id = t.user_id
            WHERE u.is_platform_admin AND t.revoked_at IS NULL""")
    )
    return None if live else await issue_token(session, user_id=admin_id, name="serve")


async def add_member(
    session: AsyncSession,
    *,
    organization_id: uuid.UUID,
    role: str,
    user_id: uuid.UUID | None = None,
    email: str | None = None,
) -> Member:
    """Add a member by id or email, or change the role of an existing one."""
    if role not in ROLES:
        raise Invalid(f"role must be one of {', '.join(ROLES)}", code="invalid_role")
    if (user_id is None) == (email is None):
        raise Invalid("give exactly one of user_id and email", code="member_user_required")
    row = (
        await session.execute(
            text("""
                WITH target AS (
                    SELECT u.id, u.email FROM users u
                    WHERE u.id = CAST(:user AS uuid) OR u.email = lower(CAST(:email AS text))),
                upserted AS (
                    INSERT INTO memberships (organization_id, user_id, role)
                    SELECT :org, target.id, :role FROM target
                    ON CONFLICT (organization_id, user_id) DO UPDATE SET role = excluded.role
                    RETURNING user_id, role)
                SELECT upserted.user_id, upserted.role, target.email, o.id AS org_id, o.slug
                FROM upserted JOIN target ON target.id = upserted.user_id
                JOIN organizations o ON o.id = :org"""),
            {"org": organization_id, "user": user_id, "email": email, "role": role},
        )
    ).first()
    if row is None:
        raise NotFound(f"user {user_id or email} not found", code="user_not_found")
    return Member(
        organization=OrgRef(id=row.org_id, slug=row.slug),
        user_id=row.user_id,
        email=row.email,
        role=row.role,
    )
