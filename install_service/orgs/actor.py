"""Who is acting, and with what role in an organization."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Actor:
    """Who is acting: a user (maybe a platform admin), or the system itself (`user_id` None:
    the operator at the command line, start-up, the test harness)."""

    user_id: uuid.UUID | None
    is_platform_admin: bool = False
    # The token the user signed in with, and whether its use is yet to be noted (at most
    # once a minute, in the unit of work it authorized).
    token_id: uuid.UUID | None = None
    note_token_use: bool = False

    @classmethod
    def system(cls) -> Actor:
        return cls(user_id=None, is_platform_admin=True)


SYSTEM = Actor.system()


@dataclass(frozen=True, kw_only=True)
class OrgAccess:
    id: uuid.UUID
    slug: str
    kind: str
    role: str | None
