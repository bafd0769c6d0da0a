"""`users`, `orgs` and `members`: the people and organizations installs belong to. Arguments
are validated exactly as the admin API validates its request bodies."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from install_service.actor import SYSTEM, Actor
from install_service.cli.base import actor_for, main, request, run
from install_service.cli.output import Column, emit, json_option, secret

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

_USER_COLUMNS: list[Column] = [
    "id",
    "email",
    "name",
    ("admin", lambda u: u.is_platform_admin),
    "deactivated_at",
]
_TOKEN_COLUMNS: list[Column] = [
    "id",
    "name",
    "prefix",
    "created_at",
    "last_used_at",
    "expires_at",
    "revoked_at",
]
_MEMBER_COLUMNS: list[Column] = [
    ("organization", lambda m: m.organization.slug),
    "email",
    "role",
    "user_id",
]


@main.group()
def users() -> None:
    """Users."""


@users.command("create")
@click.argument("email")
@click.option("--name", default="")
@click.option("--admin", is_flag=True, help="Make a platform admin.")
@json_option
def users_create(email: str, name: str, admin: bool) -> None:
    """Create a user with a personal organization; prints their API token once."""
    from install_service.orgs import service as orgs
    from install_service.orgs.schemas import CreateUser

    body = request(CreateUser, email=email, name=name, is_platform_admin=admin)
    user = run(
        lambda s: orgs.create_user(
            s, email=body.email, name=body.name, is_platform_admin=body.is_platform_admin
        )
    )
    emit(
        user,
        title="user",
        columns=[
            "id",
            "email",
            ("personal org", lambda u: u.personal_organization.slug),
            ("admin", lambda u: u.is_platform_admin),
        ],
    )
    secret("token (shown once)", user.token)


@main.group("orgs")
def orgs_group() -> None:
    """Organizations."""


@orgs_group.command("create")
@click.argument("slug")
@click.option("--name", help="Display name (default: the slug).")
@click.option("--visibility", type=click.Choice(["private", "public"]), default="private")
@click.option("--owner", "owner_email", help="Email of the user who owns it.")
@json_option
def orgs_create(slug: str, name: str | None, visibility: str, owner_email: str | None) -> None:
    """Create a team organization (personal ones come with their user)."""
    from install_service.orgs import service as orgs
    from install_service.orgs.schemas import CreateOrganization

    body = request(CreateOrganization, slug=slug, name=name or slug, visibility=visibility)

    async def work(session: AsyncSession) -> Any:
        owner = await actor_for(session, owner_email) if owner_email else None
        return await orgs.create_organization(
            session,
            slug=body.slug,
            name=body.name,
            visibility=body.visibility,
            owner_id=owner.user_id if owner else None,
        )

    emit(run(work), title="organization", columns=["id", "slug", "name", "kind", "visibility"])


@main.group()
def members() -> None:
    """Members of organizations."""


@members.command("add")
@click.argument("org")
@click.argument("email")
@click.option(
    "--role", type=click.Choice(["owner", "admin", "member"]), default="member", show_default=True
)
@json_option
def members_add(org: str, email: str, role: str) -> None:
    """Add the user with EMAIL to ORG (slug or id), or change their role."""
    from install_service.orgs import service as orgs
    from install_service.orgs.schemas import AddMember

    body = request(AddMember, email=email, role=role)

    async def work(session: AsyncSession) -> Any:
        target = await orgs.resolve_org(session, Actor.system(), org)
        return await orgs.add_member(
            session, organization_id=target.id, role=body.role, email=body.email
        )

    emit(run(work), title="member", columns=_MEMBER_COLUMNS)


@members.command("list")
@click.argument("org")
@json_option
def members_list(org: str) -> None:
    """The members of ORG (slug or id), by email."""
    from install_service.orgs import service as orgs
    from install_service.pagination import walk

    found = run(lambda s: walk(lambda page: orgs.list_members(s, SYSTEM, org, page)))
    emit(found, title=f"members of {org}", columns=_MEMBER_COLUMNS)


@members.command("role")
@click.argument("org")
@click.argument("user")
@click.argument("role", type=click.Choice(["owner", "admin", "member"]))
@json_option
def members_role(org: str, user: str, role: str) -> None:
    """Change the role of USER (email or id) in ORG; the last owner cannot be demoted."""
    from install_service.orgs import service as orgs
    from install_service.orgs.schemas import ChangeRole

    body = request(ChangeRole, role=role)
    emit(
        run(lambda s: orgs.change_role(s, SYSTEM, org, user, body.role)),
        title="member",
        columns=_MEMBER_COLUMNS,
    )


@members.command("remove")
@click.argument("org")
@click.argument("user")
@json_option
def members_remove(org: str, user: str) -> None:
    """Remove USER (email or id) from ORG; never the last owner."""
    from install_service.orgs import service as orgs

    emit(
        run(lambda s: orgs.remove_member(s, SYSTEM, org, user)),
        title="removed member",
        columns=_MEMBER_COLUMNS,
    )


@orgs_group.command("list")
@json_option
def orgs_list() -> None:
    """Every organization, by slug."""
    from install_service.orgs import service as orgs
    from install_service.pagination import walk

    found = run(lambda s: walk(lambda page: orgs.list_organizations(s, page)))
    emit(found, title="organizations", columns=["id", "slug", "name", "kind", "visibility"])


@users.command("list")
@json_option
def users_list() -> None:
    """Every user, by email."""
    from install_service.orgs import service as orgs
    from install_service.pagination import walk

    emit(
        run(lambda s: walk(lambda page: orgs.list_users(s, page))),
        title="users",
        columns=_USER_COLUMNS,
    )


@users.command("deactivate")
@click.argument("user")
@json_option
def users_deactivate(user: str) -> None:
    """Deactivate USER (email or id): every token of theirs stops working at once."""
    from install_service.orgs import service as orgs

    emit(
        run(lambda s: orgs.set_deactivated(s, SYSTEM, user, deactivated=True)),
        title="user",
        columns=_USER_COLUMNS,
    )


@users.command("reactivate")
@click.argument("user")
@json_option
def users_reactivate(user: str) -> None:
    """Reactivate USER (email or id)."""
    from install_service.orgs import service as orgs

    emit(
        run(lambda s: orgs.set_deactivated(s, SYSTEM, user, deactivated=False)),
        title="user",
        columns=_USER_COLUMNS,
    )


@main.group("tokens")
def tokens_group() -> None:
    """API tokens (only their hashes are stored)."""


@tokens_group.command("list")
@click.argument("user")
@json_option
def tokens_list(user: str) -> None:
    """USER's tokens (email or id), never their secrets."""
    from install_service.orgs import service as orgs
    from install_service.orgs import tokens
    from install_service.pagination import walk

    async def work(session: AsyncSession) -> Any:
        found = await orgs.resolve_user(session, user)
        return await walk(lambda page: tokens.list_tokens(session, found.id, page))

    emit(run(work), title=f"tokens of {user}", columns=_TOKEN_COLUMNS)


@tokens_group.command("create")
@click.argument("user")
@click.option("--name", default="", help="What the token is for.")
@click.option(
    "--expires-at",
    type=click.DateTime(formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"]),
    help="When it stops working (with a time zone, e.g. 2027-01-01T00:00:00+00:00).",
)
@json_option
def tokens_create(user: str, name: str, expires_at: Any) -> None:
    """A new token for USER (email or id); its secret is printed once."""
    from install_service.orgs import service as orgs
    from install_service.orgs import tokens
    from install_service.orgs.schemas import CreateToken

    body = request(CreateToken, name=name, expires_at=expires_at)

    async def work(session: AsyncSession) -> Any:
        found = await orgs.resolve_user(session, user)
        owner = Actor(user_id=found.id, is_platform_admin=found.is_platform_admin)
        return await tokens.create_token(session, owner, name=body.name, expires_at=body.expires_at)

    created = run(work)
    emit(created, title="token", columns=_TOKEN_COLUMNS)
    secret("token (shown once)", created.token)


@tokens_group.command("revoke")
@click.argument("token_id", type=click.UUID)
@json_option
def tokens_revoke(token_id: Any) -> None:
    """Revoke a token (any user's); it stops working on the next request."""
    from install_service.orgs import tokens

    emit(
        run(lambda s: tokens.revoke_token(s, SYSTEM, token_id, any_user=True)),
        title="token",
        columns=_TOKEN_COLUMNS,
    )
