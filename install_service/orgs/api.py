"""HTTP endpoints for people and access: the signed-in user's tokens, and the admin API for
organizations, users, memberships and tokens."""

from __future__ import annotations

import uuid

from litestar import Controller, delete, get, patch, post
from litestar.params import FromPath, JSONBody

from install_service.deps import BEARER, OrgPath, PageParams, Session, User
from install_service.orgs import service as orgs
from install_service.orgs import tokens
from install_service.orgs.schemas import (
    AddMember,
    ChangeRole,
    CreateOrganization,
    CreateToken,
    CreateUser,
    Me,
    Member,
    MemberPage,
    Organization,
    OrganizationPage,
    Token,
    TokenCreated,
    TokenPage,
    UserCreated,
    UserPage,
)
from install_service.orgs.schemas import User as UserOut
from install_service.problems import ADMIN, SIGNED_IN, WITH_BODY, NoBadRequest, problems


class MeController(Controller):
    path = "/api/v1"
    tags = ("access",)
    security = BEARER

    @get(
        "/me",
        operation_id="getMe",
        summary="The signed-in user and their personal organization",
        responses=problems(*SIGNED_IN),
    )
    async def me(self, session: Session, user: User) -> Me:
        return await orgs.me(session, user)

    @get(
        "/tokens",
        operation_id="listTokens",
        summary="Your API tokens (never their secrets)",
        responses=problems(*SIGNED_IN, 400),
    )
    async def list_tokens(self, session: Session, user: User, page: PageParams) -> TokenPage:
        assert user.user_id is not None  # noqa: S101 (a signed-in user)
        return await tokens.list_tokens(session, user.user_id, page)

    @post(
        "/tokens",
        operation_id="createToken",
        summary="Create an API token",
        description="The response carries the token's secret; it is shown this once.",
        status_code=201,
        responses=problems(*SIGNED_IN, *WITH_BODY, 422),
    )
    async def create_token(
        self, session: Session, user: User, data: JSONBody[CreateToken]
    ) -> TokenCreated:
        return await tokens.create_token(session, user, name=data.name, expires_at=data.expires_at)

    @delete(
        "/tokens/{token_id:uuid}",
        operation_id="revokeToken",
        operation_class=NoBadRequest,
        summary="Revoke one of your tokens",
        status_code=200,
        responses=problems(*SIGNED_IN, 404),
    )
    async def revoke_token(
        self, session: Session, user: User, token_id: FromPath[uuid.UUID]
    ) -> Token:
        return await tokens.revoke_token(session, user, token_id)


class OrgMembersController(Controller):
    path = "/api/v1/organizations"
    tags = ("access",)
    security = BEARER

    @get(
        "/{org:str}/members",
        operation_id="listMembers",
        summary="Members of an organization (slug or id)",
        responses=problems(*SIGNED_IN, 400, 404),
    )
    async def list_members(
        self, session: Session, user: User, org: OrgPath, page: PageParams
    ) -> MemberPage:
        return await orgs.list_members(session, user, org, page)


class AdminOrgsController(Controller):
    path = "/api/v1/admin"
    tags = ("admin",)
    security = BEARER

    @post(
        "/organizations",
        operation_id="createOrganization",
        summary="Create a team organization",
        status_code=201,
        responses=problems(*ADMIN, *WITH_BODY, 409, 422),
    )
    async def create_organization(
        self, session: Session, admin: User, data: JSONBody[CreateOrganization]
    ) -> Organization:
        return await orgs.create_organization(
            session,
            slug=data.slug,
            name=data.name,
            kind=data.kind,
            visibility=data.visibility,
            actor=admin,
        )

    @get(
        "/organizations",
        operation_id="listOrganizations",
        summary="Every organization, by slug",
        responses=problems(*ADMIN, 400),
    )
    async def list_organizations(
        self, session: Session, admin: User, page: PageParams
    ) -> OrganizationPage:
        return await orgs.list_organizations(session, page)

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
            session,
            email=data.email,
            name=data.name,
            is_platform_admin=data.is_platform_admin,
            actor=admin,
        )

    @get(
        "/users",
        operation_id="listUsers",
        summary="Every user, by email",
        responses=problems(*ADMIN, 400),
    )
    async def list_users(self, session: Session, admin: User, page: PageParams) -> UserPage:
        return await orgs.list_users(session, page)

    @post(
        "/users/{user_ref:str}/deactivate",
        operation_id="deactivateUser",
        operation_class=NoBadRequest,
        summary="Deactivate a user (id or email): every token stops working at once",
        status_code=200,
        responses=problems(*ADMIN, 404, 409),
    )
    async def deactivate_user(
        self, session: Session, admin: User, user_ref: FromPath[str]
    ) -> UserOut:
        return await orgs.set_deactivated(session, admin, user_ref, deactivated=True)

    @post(
        "/users/{user_ref:str}/reactivate",
        operation_id="reactivateUser",
        operation_class=NoBadRequest,
        summary="Reactivate a deactivated user (id or email)",
        status_code=200,
        responses=problems(*ADMIN, 404),
    )
    async def reactivate_user(
        self, session: Session, admin: User, user_ref: FromPath[str]
    ) -> UserOut:
        return await orgs.set_deactivated(session, admin, user_ref, deactivated=False)

    @get(
        "/users/{user_ref:str}/tokens",
        operation_id="listUserTokens",
        summary="A user's API tokens (id or email; never their secrets)",
        responses=problems(*ADMIN, 400, 404),
    )
    async def list_user_tokens(
        self, session: Session, admin: User, user_ref: FromPath[str], page: PageParams
    ) -> TokenPage:
        target = await orgs.resolve_user(session, user_ref)
        return await tokens.list_tokens(session, target.id, page)

    @delete(
        "/tokens/{token_id:uuid}",
        operation_id="revokeAnyToken",
        operation_class=NoBadRequest,
        summary="Revoke any user's token",
        status_code=200,
        responses=problems(*ADMIN, 404),
    )
    async def revoke_any_token(
        self, session: Session, admin: User, token_id: FromPath[uuid.UUID]
    ) -> Token:
        return await tokens.revoke_token(session, admin, token_id, any_user=True)

    @post(
        "/organizations/{org:str}/members",
        operation_id="addMember",
        summary="Add a member (by user_id or email) or change their role",
        status_code=201,
        responses=problems(*ADMIN, *WITH_BODY, 404, 409, 422),
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
            actor=admin,
        )

    @patch(
        "/organizations/{org:str}/members/{user_ref:str}",
        operation_id="changeMemberRole",
        summary="Change a member's role (the last owner cannot be demoted)",
        responses=problems(*ADMIN, *WITH_BODY, 404, 409),
    )
    async def change_role(
        self,
        session: Session,
        admin: User,
        org: OrgPath,
        user_ref: FromPath[str],
        data: JSONBody[ChangeRole],
    ) -> Member:
        return await orgs.change_role(session, admin, org, user_ref, data.role)

    @delete(
        "/organizations/{org:str}/members/{user_ref:str}",
        operation_id="removeMember",
        operation_class=NoBadRequest,
        summary="Remove a member (never the last owner)",
        status_code=200,
        responses=problems(*ADMIN, 404, 409),
    )
    async def remove_member(
        self, session: Session, admin: User, org: OrgPath, user_ref: FromPath[str]
    ) -> Member:
        return await orgs.remove_member(session, admin, org, user_ref)
