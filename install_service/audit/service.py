"""Recording and reading the audit log.

Every admin action and every install lifecycle action that changes something appends one row,
in the same transaction as the change, so a rolled-back change leaves no row and a committed
one always has its row. Operations that change nothing record nothing. The database refuses to
update or delete rows.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import context
from install_service.audit.schemas import AuditEntry, AuditPage
from install_service.pagination import Keyset, PageRequest

# The columns of an audit row, with `:actor`, `:action`, `:target_type`, `:target_id`, `:org`,
# `:request_id` and `:details` bound by `audit_params`, for statements that append their audit
# row themselves (in a CTE of the statement that makes the change).
AUDIT_INSERT = """
    INSERT INTO audit_log (actor_user_id, action, target_type, target_id, organization_id,
                           request_id, details)"""
AUDIT_VALUES = """
    CAST(:audit_actor AS uuid), :audit_action, :audit_target_type, :audit_target_id,
    CAST(:audit_org AS uuid), :audit_request_id, CAST(:audit_details AS jsonb)"""


def audit_params(
    *,
    actor: uuid.UUID | None,
    action: str,
    target_type: str,
    target_id: object,
    organization_id: uuid.UUID | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Bind parameters for `AUDIT_VALUES`."""
    return {
        "audit_actor": actor,
        "audit_action": action,
        "audit_target_type": target_type,
        "audit_target_id": str(target_id),
        "audit_org": organization_id,
        "audit_request_id": context.request_id.get(),
        "audit_details": msgspec.json.encode(details or {}).decode(),
    }


async def record(session: AsyncSession, **entry: Any) -> None:
    """Append one audit row (see `audit_params` for the fields)."""
    await session.execute(
        text(f"{AUDIT_INSERT} VALUES ({AUDIT_VALUES})"),
        audit_params(**entry),
    )


_KEYSET = Keyset("audit", (datetime, uuid.UUID))


async def list_entries(
    session: AsyncSession,
    page: PageRequest,
    *,
    action: str | None = None,
    organization_id: uuid.UUID | None = None,
    actor_user_id: uuid.UUID | None = None,
) -> AuditPage:
    """Newest first, optionally only one action, organization or actor."""
    rows = await session.execute(
        text("""
            SELECT a.id, a.occurred_at, a.actor_user_id, u.email AS actor_email, a.action,
                   a.target_type, a.target_id, a.organization_id, a.request_id, a.details
            FROM audit_log a LEFT JOIN users u ON u.id = a.actor_user_id
            WHERE (CAST(:after_0 AS timestamptz) IS NULL
                   OR (a.occurred_at, a.id) < (:after_0, CAST(:after_1 AS uuid)))
              AND (CAST(:action AS text) IS NULL OR a.action = :action)
              AND (CAST(:org AS uuid) IS NULL OR a.organization_id = :org)
              AND (CAST(:actor AS uuid) IS NULL OR a.actor_user_id = :actor)
            ORDER BY a.occurred_at DESC, a.id DESC
            LIMIT :limit_plus_one"""),
        {
            **_KEYSET.params(page),
            "action": action,
            "org": organization_id,
            "actor": actor_user_id,
        },
    )
    entries = [msgspec.convert(dict(r._mapping), AuditEntry) for r in rows]
    return _KEYSET.page(AuditPage, entries, page, lambda e: (e.occurred_at, e.id))
