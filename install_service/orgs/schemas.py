"""Request and response bodies for organizations, users, memberships and tokens."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta

from install_service.errors import worded
from install_service.pagination import Page
from install_service.schemas import ONE_LINE, In, Name, Out, Slug

# No control characters anywhere; `(?!\n)$` because Python's `$` also matches before a
# trailing newline (the same pattern means the same in JSON Schema's ECMA dialect).
Email = Annotated[
    str,
    Meta(
        pattern=worded(
            r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+(?!\n)$",
            "an email address (name@example.com, no spaces or control characters)",
        ),
        max_length=320,
    ),
]
OptionalName = Annotated[str, Meta(max_length=200, pattern=ONE_LINE)]
Role = Literal["owner", "admin", "member"]


class CreateOrganization(In, kw_only=True):
    slug: Slug
    name: Name
    # Personal orgs are made with their user, never through this endpoint (422).
    kind: Literal["personal", "team"] = "team"
    visibility: Literal["private", "public"] = "private"


class Organization(Out, kw_only=True):
    id: uuid.UUID
    slug: str
    name: str
    kind: str
    visibility: str
    created_at: datetime


class OrgRef(Out, kw_only=True):
    id: uuid.UUID
    slug: str


class CreateUser(In, kw_only=True):
    email: Email
    name: OptionalName = ""
    is_platform_admin: bool = False


class User(Out, kw_only=True):
    id: uuid.UUID
    email: str
    name: str
    is_platform_admin: bool
    created_at: datetime
    deactivated_at: datetime | None = None


class UserCreated(User, kw_only=True):
    personal_organization: OrgRef
    # Shown once: only its hash is stored.
    token: str


class Me(User, kw_only=True):
    personal_organization: OrgRef


class AddMember(In, kw_only=True):
    user_id: uuid.UUID | None = None
    email: Email | None = None
    role: Role


class ChangeRole(In, kw_only=True):
    role: Role


class Member(Out, kw_only=True):
    organization: OrgRef
    user_id: uuid.UUID
    # Null for callers who may not see other members' addresses (plain members): owners,
    # admins and platform admins see them; everyone sees their own.
    email: str | None
    name: str = ""
    role: str


class CreateToken(In, kw_only=True):
    name: OptionalName = ""
    # Omitted: the token never expires (it can still be revoked).
    expires_at: datetime | None = None


class Token(Out, kw_only=True):
    """A token as its owner sees it: never the secret."""

    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    # The first characters of the token, to tell tokens apart (null when the token was chosen
    # by the operator, as INSTALL_SERVICE_ADMIN_TOKEN is).
    prefix: str | None
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(Token, kw_only=True):
    # Shown once: only its hash is stored.
    token: str


class OrganizationPage(Page, kw_only=True):
    items: list[Organization]


class UserPage(Page, kw_only=True):
    items: list[User]


class MemberPage(Page, kw_only=True):
    items: list[Member]


class TokenPage(Page, kw_only=True):
    items: list[Token]


class Membership(Out, kw_only=True):
    """An organization the user belongs to, with their role in it."""

    organization: Organization
    role: str


class MembershipPage(Page, kw_only=True):
    items: list[Membership]
