"""Who is acting, and with what role in an organization.

On the package's ground floor (standard library only): the edges that authenticate a caller,
the domains that authorize and record what it does, and the engine all name an `Actor`, so
none of them imports the organizations domain for it.
"""

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


# The roles that may change what an org has installed, and see who its people are.
MANAGER_ROLES = ("owner", "admin")


def sees_emails(actor: Actor, role: str | None) -> bool:
    """Whether `actor`, whose role in an org is `role` (None: not a member), may see the
    email addresses of that org's people (its members, who pinned an install): platform
    admins and the org's owners and admins, who manage those people. A plain member sees
    ids, names and roles; an address is personal data a member needs for nothing."""
    return actor.is_platform_admin or role in MANAGER_ROLES
