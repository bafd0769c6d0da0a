"""Request and response bodies for organizations, users and memberships."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from install_service.templates.schemas import Name, Slug

Email = Annotated[
    str, Meta(pattern=r"^[^@\s\x00-\x1f]+@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f]+$", max_length=320)
]
Role = Literal["owner", "admin", "member"]


class In(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are a 400."""


class Out(msgspec.Struct, kw_only=True):
    """Base of response bodies."""


class CreateOrganization(In, kw_only=True):
    slug: Slug
    name: Name
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
    name: Annotated[str, Meta(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")] = ""
    is_platform_admin: bool = False


class User(Out, kw_only=True):
    id: uuid.UUID
    email: str
    name: str
    is_platform_admin: bool
    created_at: datetime


class UserCreated(User, kw_only=True):
    personal_organization: OrgRef
    # Shown once: only its hash is stored.
    token: str


class AddMember(In, kw_only=True):
    user_id: uuid.UUID | None = None
    email: Email | None = None
    role: Role


class Member(Out, kw_only=True):
    organization: OrgRef
    user_id: uuid.UUID
    email: str
    role: str
