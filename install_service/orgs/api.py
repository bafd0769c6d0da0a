"""Admin HTTP endpoints: organizations, users, memberships."""

from __future__ import annotations

from litestar import Controller, post
from litestar.params import JSONBody

from install_service.deps import BEARER, OrgPath, Session, User
from install_service.orgs import service as orgs
from install_service.orgs.schemas import (
    AddMember,
    CreateOrganization,
    CreateUser,
    Member,
    Organization,
    UserCreated,
)
from install_service.problems import ADMIN, WITH_BODY, problems


class AdminOrgsController(Controller):
    path = "/api/v1/admin"
    tags = ("admin",)
    security = BEARER

    @post(
        "/organizations",
        operation_id="createOrganization",
        summary="Create an organization",
        status_code=201,
        responses=problems(*ADMIN, *WITH_BODY, 409, 422),
    )
    async def create_organization(
        self, session: Session, admin: User, data: JSONBody[CreateOrganization]
    ) -> Organization:
        return await orgs.create_organization(
            session, slug=data.slug, name=data.name, kind=data.kind, visibility=data.visibility
        )

    @post(
        "/users",
        operation_id="createUser",
        summary="Create a user with a personal organization",
        description="The response carries the user's API token; it is shown this once.",
        status_code=201,
        responses=problems(*ADMIN, *WITH_BODY, 409),
    )
    async def create_user(
        self, session: Session, admin: User, data: JSONBody[CreateUser]
    ) -> UserCreated:
        return await orgs.create_user(
            session, email=data.email, name=data.name, is_platform_admin=data.is_platform_admin
        )

    @post(
        "/organizations/{org:str}/members",
        operation_id="addMember",
        summary="Add a member (by user_id or email) or change their role",
        status_code=201,
        responses=problems(*ADMIN, *WITH_BODY, 404, 422),
    )
    async def add_member(
        self, session: Session, admin: User, org: OrgPath, data: JSONBody[AddMember]
    ) -> Member:
        target = await orgs.resolve_org(session, admin, org)
        return await orgs.add_member(
            session,
            organization_id=target.id,
            role=data.role,
            user_id=data.user_id,
            email=data.email,
        )
