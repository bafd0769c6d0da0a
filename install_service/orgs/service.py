"""Tenancy: organizations, users, memberships, and who may do what in an org.

Every change is recorded in the audit log in the same transaction; a request that changes
nothing records nothing.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.actor import MANAGER_ROLES, SYSTEM, Actor, OrgAccess, sees_emails
from install_service.audit import service as audit
from install_service.errors import Conflict, Forbidden, Invalid, NotFound
from install_service.orgs.schemas import (
    Me,
    Member,
    MemberPage,
    Membership,
    MembershipPage,
    Organization,
    OrganizationPage,
    OrgRef,
    User,
    UserCreated,
    UserPage,
)
from install_service.orgs.tokens import hash_token, issue_token
from install_service.pagination import Keyset, PageRequest

__all__ = ["SYSTEM", "Actor", "OrgAccess", "hash_token"]

log = logging.getLogger(__name__)

ROLES = ("owner", "admin", "member")
ADMIN_EMAIL = "admin@localhost"


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def org_access_sql(actor: Actor, ref: str | None) -> tuple[str, dict[str, Any]]:
    """The statement finding the org named by slug or id (or the actor's personal org) with
    the actor's role in it, and its parameters; `checked_org` judges its row."""
    if ref is not None and "\x00" in ref:  # no name holds NUL (PostgreSQL refuses it)
        raise NotFound(f"organization {ref!r} not found", code="org_not_found")
    if ref is None:
        if actor.user_id is None:
            raise Invalid("an organization is required", code="organization_required")
        where = "o.personal_owner_id = CAST(:actor AS uuid)"
    elif _as_uuid(ref) is None:
        # Only a name that reads as an id may be one. Kept apart, the statement's plan knows
        # it finds one org (by a unique slug), and PostgreSQL keeps its generic plan for it.
        where = "o.slug = :ref"
    else:
        where = "(o.slug = :ref OR o.id = CAST(:ref_id AS uuid))"
    sql = f"""
                SELECT o.id, o.slug, o.kind, m.role
                FROM organizations o
                LEFT JOIN memberships m ON m.organization_id = o.id
                                       AND m.user_id = CAST(:actor AS uuid)
                WHERE {where}"""  # noqa: S608 (fixed fragments only)
    return sql, {"ref": ref, "ref_id": _as_uuid(ref) if ref else None, "actor": actor.user_id}


def checked_org(actor: Actor, ref: str | None, row: Any) -> OrgAccess:
    """The org `org_access_sql` found; unknown orgs and orgs the actor is not a member of are
    both `NotFound`, so ids leak nothing."""
    if row is None or row.id is None or (row.role is None and not actor.is_platform_admin):
        raise NotFound(f"organization {ref!r} not found", code="org_not_found")
    return OrgAccess(id=row.id, slug=row.slug, kind=row.kind, role=row.role)


async def resolve_org(session: AsyncSession, actor: Actor, ref: str | None) -> OrgAccess:
    """The org named by slug or id (or the actor's personal org) with the actor's role in it.

    Unknown orgs and orgs the actor is not a member of are both `NotFound`, so ids leak nothing.
    """
    sql, params = org_access_sql(actor, ref)
    row = (await session.execute(text(sql), params)).first()
    return checked_org(actor, ref, row)


async def resolve_org_refs(session: AsyncSession, refs: Iterable[str]) -> dict[str, uuid.UUID]:
    """Organizations named by slug or id (an admin's list: no membership involved) to their
    ids; every unknown one is listed in one 422.

    A reference is compared as an id only when it parses as one, in Python: a cast in the
    statement could be evaluated on a slug (PostgreSQL promises no order among conditions, and
    with enough rows it puts the cast into an index condition), which fails the statement. A
    slug that looks like an id names the org of that slug first."""
    ordered = sorted(set(refs))
    rows = await session.execute(
        text("""
            SELECT DISTINCT ON (r.ref) r.ref, o.id
            FROM unnest(CAST(:refs AS text[]), CAST(:ids AS uuid[])) AS r(ref, id)
            LEFT JOIN organizations o ON o.slug = r.ref OR o.id = r.id
            ORDER BY r.ref, o.slug = r.ref DESC"""),
        {"refs": ordered, "ids": [_as_uuid(ref) for ref in ordered]},
    )
    found = {row.ref: row.id for row in rows if row.id is not None}
    if unknown := [ref for ref in ordered if ref not in found]:
        raise Invalid(
            f"no such organization: {', '.join(unknown)}",
            code="unknown_organizations",
            organizations=unknown,
        )
    return found


def may_manage(actor: Actor, org: OrgAccess) -> bool:
    """Whether the actor may change what an org has: its owners and admins, and platform
    admins."""
    return actor.is_platform_admin or org.role in MANAGER_ROLES


def require_manager(actor: Actor, org: OrgAccess) -> None:
    """Owners and admins (and platform admins) may change what is installed in an org."""
    if may_manage(actor, org):
        return
    raise Forbidden(
        f"changing {org.slug!r} needs the owner or admin role; you are {org.role}",
        code="role_too_low",
    )


_ORG_COLUMNS = "id, slug, name, kind, visibility, created_at"


async def create_organization(
    session: AsyncSession,
    *,
    slug: str,
    name: str,
    kind: str = "team",
    visibility: str = "private",
    owner_id: uuid.UUID | None = None,
    actor: Actor = SYSTEM,
) -> Organization:
    """Create a team org (and make `owner_id` its owner). A taken slug is a `Conflict`.

    Personal orgs are created with their user (`create_user`), never on their own."""
    if kind != "team":
        raise Invalid(
            "personal organizations are created with their user; create a team organization",
            code="personal_org_not_allowed",
        )
    org = await _insert_org(session, slug=slug, name=name, kind=kind, visibility=visibility)
    if owner_id is not None:
        await _insert_owner(session, org.id, owner_id)
    await audit.record(
        session,
        actor=actor.user_id,
        action="organization.created",
        target_type="organization",
        target_id=org.id,
        organization_id=org.id,
        details={"slug": slug, "owner_id": str(owner_id) if owner_id else None},
    )
    return org


async def _insert_org(
    session: AsyncSession,
    *,
    slug: str,
    name: str,
    kind: str,
    visibility: str,
    personal_owner_id: uuid.UUID | None = None,
) -> Organization:
    row = (
        await session.execute(
            text(f"""
                INSERT INTO organizations (slug, name, kind, visibility, personal_owner_id)
                VALUES (:slug, :name, :kind, :visibility, :owner)
                ON CONFLICT (slug) DO NOTHING
                RETURNING {_ORG_COLUMNS}"""),  # noqa: S608 (constants only)
            {
                "slug": slug,
                "name": name,
                "kind": kind,
                "visibility": visibility,
                "owner": personal_owner_id,
            },
        )
    ).first()
    if row is None:
        raise Conflict(f"organization slug {slug!r} is taken", code="org_slug_taken")
    return msgspec.convert(dict(row._mapping), Organization)


async def _insert_owner(session: AsyncSession, org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    await session.execute(
        text("INSERT INTO memberships (organization_id, user_id, role) VALUES (:o, :u, 'owner')"),
        {"o": org_id, "u": user_id},
    )


_USER_COLUMNS = "id, email, name, is_platform_admin, created_at, deactivated_at"


async def create_user(
    session: AsyncSession,
    *,
    email: str,
    name: str = "",
    is_platform_admin: bool = False,
    token: str | None = None,
    token_bootstrap: str | None = None,
    actor: Actor = SYSTEM,
) -> UserCreated:
    """Create a user, their personal org (every user has exactly one) and a first API token.

    The token is in the result once; only its hash is stored.
    """
    row = (
        await session.execute(
            text(f"""
                INSERT INTO users (email, name, is_platform_admin)
                VALUES (lower(:email), :name, :admin)
                ON CONFLICT (email) DO NOTHING
                RETURNING {_USER_COLUMNS}"""),  # noqa: S608 (constants only)
            {"email": email, "name": name, "admin": is_platform_admin},
        )
    ).first()
    if row is None:
        raise Conflict(f"a user with email {email!r} exists", code="user_email_taken")
    org = await _insert_org(
        session,
        slug=f"user-{row.id.hex[:12]}",
        name=(name or row.email)[:200],
        kind="personal",
        visibility="private",
        personal_owner_id=row.id,
    )
    await _insert_owner(session, org.id, row.id)
    issued = await issue_token(session, user_id=row.id, token=token, bootstrap=token_bootstrap)
    await audit.record(
        session,
        actor=actor.user_id,
        action="user.created",
        target_type="user",
        target_id=row.id,
        details={"email": row.email, "is_platform_admin": is_platform_admin},
    )
    return UserCreated(
        **dict(row._mapping),
        personal_organization=OrgRef(id=org.id, slug=org.slug),
        token=issued.token,
    )


async def me(session: AsyncSession, actor: Actor) -> Me:
    """The signed-in user and their personal org."""
    row = (
        await session.execute(
            text(f"""
                SELECT {", ".join("u." + c for c in _USER_COLUMNS.split(", "))},
                       o.id AS org_id, o.slug AS org_slug
                FROM users u JOIN organizations o ON o.personal_owner_id = u.id
                WHERE u.id = CAST(:id AS uuid)"""),  # noqa: S608 (constants only)
            {"id": actor.user_id},
        )
    ).first()
    if row is None:
        raise NotFound("no user is signed in", code="user_not_found")
    values = dict(row._mapping)
    org = OrgRef(id=values.pop("org_id"), slug=values.pop("org_slug"))
    return Me(**values, personal_organization=org)


async def resolve_user(session: AsyncSession, ref: str, *, lock: bool = False) -> User:
    """A user by id or email; `NotFound` otherwise."""
    if "\x00" in ref:  # no email holds NUL (PostgreSQL refuses it)
        raise NotFound(f"user {ref!r} not found", code="user_not_found")
    row = (
        await session.execute(
            text(f"""
                SELECT {_USER_COLUMNS} FROM users
                WHERE id = CAST(:id AS uuid) OR email = lower(:ref)
                {"FOR UPDATE" if lock else ""}"""),  # noqa: S608 (constants only)
            {"id": _as_uuid(ref), "ref": ref},
        )
    ).first()
    if row is None:
        raise NotFound(f"user {ref!r} not found", code="user_not_found")
    return msgspec.convert(dict(row._mapping), User)


async def actor_for_email(session: AsyncSession, email: str | None) -> Actor:
    """Act as the user with this email (the command line's `--as`), or as the operator
    (`Actor.system()`) for None. A deactivated user cannot act."""
    if email is None:
        return Actor.system()
    row = (
        await session.execute(
            text("""SELECT id, is_platform_admin, deactivated_at FROM users
                    WHERE email = lower(:e)"""),
            {"e": email},
        )
    ).first()
    if row is None:
        raise NotFound(f"no user with email {email!r}", code="user_not_found")
    if row.deactivated_at is not None:
        raise Forbidden(f"user {email!r} is deactivated", code="user_deactivated")
    return Actor(user_id=row.id, is_platform_admin=row.is_platform_admin)


_USERS = Keyset("users", (str,))


async def list_users(session: AsyncSession, page: PageRequest) -> UserPage:
    """Every user, by email."""
    rows = await session.execute(
        text(f"""
            SELECT {_USER_COLUMNS} FROM users
            WHERE CAST(:after_0 AS text) IS NULL OR email > :after_0
            ORDER BY email LIMIT :limit_plus_one"""),  # noqa: S608 (constants only)
        _USERS.params(page),
    )
    users = [msgspec.convert(dict(r._mapping), User) for r in rows]
    return _USERS.page(UserPage, users, page, lambda u: (u.email,))


_ORGS = Keyset("organizations", (str,))


async def list_organizations(session: AsyncSession, page: PageRequest) -> OrganizationPage:
    """Every organization, by slug."""
    rows = await session.execute(
        text(f"""
            SELECT {_ORG_COLUMNS} FROM organizations
            WHERE CAST(:after_0 AS text) IS NULL OR slug > :after_0
            ORDER BY slug LIMIT :limit_plus_one"""),  # noqa: S608 (constants only)
        _ORGS.params(page),
    )
    orgs = [msgspec.convert(dict(r._mapping), Organization) for r in rows]
    return _ORGS.page(OrganizationPage, orgs, page, lambda o: (o.slug,))


async def set_deactivated(
    session: AsyncSession, actor: Actor, ref: str, *, deactivated: bool
) -> User:
    """Deactivate a user (every token stops working at once) or reactivate them.

    The last active platform admin cannot be deactivated: nobody could administer the service.
    Doing what is already done changes nothing and answers the same."""
    # Serializes with every other (de)activation, so two admins cannot deactivate each other.
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtext('users.deactivation'))"))
    user = await resolve_user(session, ref, lock=True)
    if (user.deactivated_at is not None) == deactivated:
        return user
    if deactivated and user.is_platform_admin:
        others = await session.scalar(
            text("""SELECT count(*) FROM users WHERE is_platform_admin
                    AND deactivated_at IS NULL AND id <> :id"""),
            {"id": user.id},
        )
        if not others:
            raise Conflict(
                f"{user.email} is the last active platform admin", code="last_platform_admin"
            )
    row = (
        await session.execute(
            text(f"""
                UPDATE users SET deactivated_at = CASE WHEN :off THEN now() END
                WHERE id = :id RETURNING {_USER_COLUMNS}"""),  # noqa: S608 (constants only)
            {"id": user.id, "off": deactivated},
        )
    ).one()
    await audit.record(
        session,
        actor=actor.user_id,
        action="user.deactivated" if deactivated else "user.reactivated",
        target_type="user",
        target_id=user.id,
        details={"email": user.email},
    )
    return msgspec.convert(dict(row._mapping), User)


_MEMBER = """
    SELECT m.user_id, u.email, u.name, m.role, o.id AS org_id, o.slug, o.personal_owner_id
    FROM memberships m JOIN users u ON u.id = m.user_id
    JOIN organizations o ON o.id = m.organization_id"""


def _member(row: Any, *, email: bool = True) -> Member:
    """A member as shown; without `email`, their address is left out (see `sees_emails`)."""
    return Member(
        organization=OrgRef(id=row.org_id, slug=row.slug),
        user_id=row.user_id,
        email=row.email if email else None,
        name=row.name,
        role=row.role,
    )


async def _lock_members(session: AsyncSession, organization_id: uuid.UUID) -> None:
    """Serialize membership changes of one org, so the last-owner rule holds under any
    concurrency (two owners removing each other at once: one of them is refused)."""
    await session.execute(
        text("SELECT 1 FROM organizations WHERE id = :org FOR NO KEY UPDATE"),
        {"org": organization_id},
    )


async def _check_owner_kept(session: AsyncSession, current: Any, new_role: str | None) -> None:
    """Refuse to remove or demote the last owner, or anyone from their own personal org."""
    if current.role != "owner" or new_role == "owner":
        return
    if current.personal_owner_id == current.user_id:
        raise Conflict(
            f"{current.email} owns {current.slug!r} as their personal organization",
            code="personal_org_owner",
        )
    owners = await session.scalar(
        text("SELECT count(*) FROM memberships WHERE organization_id = :org AND role = 'owner'"),
        {"org": current.org_id},
    )
    if owners <= 1:
        raise Conflict(
            f"{current.email} is the last owner of {current.slug!r}; make another owner first",
            code="last_owner",
        )


async def _current_member(
    session: AsyncSession, organization_id: uuid.UUID, user_id: uuid.UUID
) -> Any:
    return (
        await session.execute(
            text(_MEMBER + " WHERE m.organization_id = :org AND m.user_id = :user"),
            {"org": organization_id, "user": user_id},
        )
    ).first()


async def add_member(
    session: AsyncSession,
    *,
    organization_id: uuid.UUID,
    role: str,
    user_id: uuid.UUID | None = None,
    email: str | None = None,
    actor: Actor = SYSTEM,
) -> Member:
    """Add a member by id or email, or change the role of an existing one."""
    if role not in ROLES:
        raise Invalid(f"role must be one of {', '.join(ROLES)}", code="invalid_role")
    if (user_id is None) == (email is None):
        raise Invalid("give exactly one of user_id and email", code="member_user_required")
    user = await resolve_user(session, str(user_id) if user_id else str(email))
    await _lock_members(session, organization_id)
    current = await _current_member(session, organization_id, user.id)
    if current is not None:
        if current.role == role:
            return _member(current)
        await _check_owner_kept(session, current, role)
    row = (
        await session.execute(
            text("""
                WITH upserted AS (
                    INSERT INTO memberships (organization_id, user_id, role)
                    VALUES (:org, :user, :role)
                    ON CONFLICT (organization_id, user_id) DO UPDATE SET role = excluded.role
                    RETURNING user_id, role)
                SELECT upserted.user_id, upserted.role, u.email, u.name, o.id AS org_id, o.slug
                FROM upserted JOIN users u ON u.id = upserted.user_id
                JOIN organizations o ON o.id = :org"""),
            {"org": organization_id, "user": user.id, "role": role},
        )
    ).one()
    await audit.record(
        session,
        actor=actor.user_id,
        action="member.added" if current is None else "member.role_changed",
        target_type="user",
        target_id=user.id,
        organization_id=organization_id,
        details={"email": user.email, "role": role, "previous_role": current and current.role},
    )
    return _member(row)


async def change_role(
    session: AsyncSession, actor: Actor, org_ref: str, user_ref: str, role: str
) -> Member:
    """Change an existing member's role (the last owner cannot be demoted)."""
    org = await resolve_org(session, actor, org_ref)
    user = await resolve_user(session, user_ref)
    await _lock_members(session, org.id)
    if await _current_member(session, org.id, user.id) is None:
        raise NotFound(f"{user.email} is not a member of {org.slug!r}", code="member_not_found")
    return await add_member(
        session, organization_id=org.id, user_id=user.id, role=role, actor=actor
    )


async def remove_member(session: AsyncSession, actor: Actor, org_ref: str, user_ref: str) -> Member:
    """Remove a member (never the last owner); their tokens stop reaching the org at once."""
    org = await resolve_org(session, actor, org_ref)
    user = await resolve_user(session, user_ref)
    await _lock_members(session, org.id)
    current = await _current_member(session, org.id, user.id)
    if current is None:
        raise NotFound(f"{user.email} is not a member of {org.slug!r}", code="member_not_found")
    await _check_owner_kept(session, current, None)
    await session.execute(
        text("DELETE FROM memberships WHERE organization_id = :org AND user_id = :user"),
        {"org": org.id, "user": user.id},
    )
    await audit.record(
        session,
        actor=actor.user_id,
        action="member.removed",
        target_type="user",
        target_id=user.id,
        organization_id=org.id,
        details={"email": user.email, "previous_role": current.role},
    )
    return _member(current)


# Members come by email, but the cursor holds the last member's id (its email is looked up):
# a cursor is readable, and not everyone who pages through members may see their emails.
_MEMBERS = Keyset("members", (uuid.UUID,))
_MEMBERS_PAGE = f"""{_MEMBER}
    WHERE m.organization_id = :org
      AND (CAST(:after_0 AS uuid) IS NULL
           OR u.email > (SELECT a.email FROM users a WHERE a.id = :after_0))
    ORDER BY u.email LIMIT :limit_plus_one"""  # noqa: S608 (constants only)


async def list_members(
    session: AsyncSession, actor: Actor, org_ref: str, page: PageRequest
) -> MemberPage:
    """Members of an org the actor belongs to (any org, for platform admins), by email;
    their emails only for those who may see them (`sees_emails`), and one's own."""
    org = await resolve_org(session, actor, org_ref)
    rows = await session.execute(text(_MEMBERS_PAGE), {"org": org.id, **_MEMBERS.params(page)})
    shown = sees_emails(actor, org.role)
    members = [_member(r, email=shown or r.user_id == actor.user_id) for r in rows]
    return _MEMBERS.page(MemberPage, members, page, lambda m: (m.user_id,))


async def ensure_admin(session: AsyncSession, token: str | None) -> str | None:
    """Make sure a platform admin can sign in; return a token to show, if a new one was made.

    With `token` (INSTALL_SERVICE_ADMIN_TOKEN) that token is the admin's bootstrap token and
    tokens made from any previous value are revoked; without it, tokens made from a previous
    value are revoked too, and a token is generated when no platform admin has a live one.
    A value that was revoked (say, by an admin over the API) is never brought back.
    Concurrent start-ups serialize on a transaction-level advisory lock.
    """
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtext('ensure_admin'))"))
    admin_id = await session.scalar(
        text("SELECT id FROM users WHERE email = :e"), {"e": ADMIN_EMAIL}
    )
    if admin_id is None:
        created = await create_user(
            session,
            email=ADMIN_EMAIL,
            name="Platform admin",
            is_platform_admin=True,
            token=token,
            token_bootstrap="env" if token else "generated",
        )
        return None if token else created.token
    digest = hash_token(token) if token else None
    rotated = await session.execute(
        text("""
            UPDATE api_tokens SET revoked_at = now()
            WHERE user_id = :admin AND bootstrap = 'env' AND revoked_at IS NULL
              AND token_hash IS DISTINCT FROM CAST(:hash AS text)
            RETURNING id"""),
        {"admin": admin_id, "hash": digest},
    )
    for (revoked_id,) in rotated:
        await audit.record(
            session,
            actor=None,
            action="token.revoked",
            target_type="token",
            target_id=revoked_id,
            details={"reason": "INSTALL_SERVICE_ADMIN_TOKEN changed"},
        )
    if token is not None:
        existing = (
            await session.execute(
                text("SELECT revoked_at FROM api_tokens WHERE token_hash = :hash"),
                {"hash": digest},
            )
        ).first()
        if existing is None:
            await issue_token(
                session,
                user_id=admin_id,
                name="INSTALL_SERVICE_ADMIN_TOKEN",
                token=token,
                bootstrap="env",
            )
        elif existing.revoked_at is not None:
            log.warning("INSTALL_SERVICE_ADMIN_TOKEN was revoked; it stays revoked: choose another")
        return None
    live = await session.scalar(
        text("""
            SELECT count(*) FROM api_tokens t JOIN users u ON u.id = t.user_id
            WHERE u.is_platform_admin AND u.deactivated_at IS NULL AND t.revoked_at IS NULL
              AND (t.expires_at IS NULL OR t.expires_at > now())""")
    )
    if live:
        return None
    issued = await issue_token(session, user_id=admin_id, name="serve", bootstrap="generated")
    return issued.token


_MEMBERSHIPS = Keyset("memberships", (str,))


async def list_memberships(
    session: AsyncSession, actor: Actor, page: PageRequest
) -> MembershipPage:
    """The organizations the actor belongs to, by slug, with their role in each."""
    rows = await session.execute(
        text(f"""
            SELECT {", ".join("o." + c for c in _ORG_COLUMNS.split(", "))}, m.role
            FROM memberships m JOIN organizations o ON o.id = m.organization_id
            WHERE m.user_id = CAST(:actor AS uuid)
              AND (CAST(:after_0 AS text) IS NULL OR o.slug > :after_0)
            ORDER BY o.slug LIMIT :limit_plus_one"""),  # noqa: S608 (constants only)
        {"actor": actor.user_id, **_MEMBERSHIPS.params(page)},
    )
    found = []
    for r in rows:
        values = dict(r._mapping)
        role = values.pop("role")
        found.append(Membership(organization=msgspec.convert(values, Organization), role=role))
    return _MEMBERSHIPS.page(MembershipPage, found, page, lambda m: (m.organization.slug,))
