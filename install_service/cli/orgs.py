"""`users`, `orgs` and `members`: the people and organizations installs belong to. Arguments
are validated exactly as the admin API validates its request bodies."""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.cli.base import main, request, run
from install_service.cli.output import emit, json_option, secret
from install_service.orgs import service as orgs
from install_service.orgs.schemas import AddMember, CreateOrganization, CreateUser
from install_service.orgs.service import Actor, actor_for_email


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
@click.option("--kind", type=click.Choice(["team", "personal"]), default="team")
@click.option("--visibility", type=click.Choice(["private", "public"]), default="private")
@click.option("--owner", "owner_email", help="Email of the user who owns it.")
@json_option
def orgs_create(
    slug: str, name: str | None, kind: str, visibility: str, owner_email: str | None
) -> None:
    """Create an organization."""
    body = request(
        CreateOrganization, slug=slug, name=name or slug, kind=kind, visibility=visibility
    )

    async def work(session: AsyncSession) -> Any:
        owner = await actor_for_email(session, owner_email) if owner_email else None
        return await orgs.create_organization(
            session,
            slug=body.slug,
            name=body.name,
            kind=body.kind,
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
    body = request(AddMember, email=email, role=role)

    async def work(session: AsyncSession) -> Any:
        target = await orgs.resolve_org(session, Actor.system(), org)
        return await orgs.add_member(
            session, organization_id=target.id, role=body.role, email=body.email
        )

    emit(
        run(work),
        title="member",
        columns=[("organization", lambda m: m.organization.slug), "email", "role", "user_id"],
    )
