"""Pins: an org's owner or admin holds its install at its release against resyncs.

A pin holds from `pinned_at` until `pinned_until` (none: until unpinned); an expired pin no
longer holds, wherever it is read. Resyncs read `PINNED` when they claim an item; the org's
own upgrades never look at it. Pinning and unpinning are install lifecycle actions: each
change writes an audit row, and a request that changes nothing writes nothing.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.actor import Actor
from install_service.audit import service as audit

# Whether the install `a` (an `agents` row) is pinned now: the one definition of a pin.
PINNED = "(a.pinned_at IS NOT NULL AND (a.pinned_until IS NULL OR a.pinned_until > now()))"


async def set_pin(
    session: AsyncSession,
    actor: Actor,
    install_id: uuid.UUID,
    organization_id: uuid.UUID,
    *,
    until: datetime | None,
    reason: str | None,
) -> bool:
    """Pin the install (the caller holds its lock); False when it was already pinned so."""
    changed = await session.scalar(
        text(f"""
            UPDATE agents a SET pinned_at = now(), pinned_until = :until, pin_reason = :reason,
                                pinned_by_user_id = :actor
            WHERE a.id = :install
              AND NOT ({PINNED} AND a.pinned_until IS NOT DISTINCT FROM CAST(:until AS timestamptz)
                       AND a.pin_reason IS NOT DISTINCT FROM CAST(:reason AS text))
            RETURNING a.id"""),  # noqa: S608 (constants only)
        {"install": install_id, "until": until, "reason": reason, "actor": actor.user_id},
    )
    if changed is not None:
        await audit.record(
            session,
            actor=actor.user_id,
            action="install.pinned",
            target_type="install",
            target_id=install_id,
            organization_id=organization_id,
            details={"until": until.isoformat() if until else None, "reason": reason},
        )
    return changed is not None


async def clear_pin(
    session: AsyncSession, actor: Actor, install_id: uuid.UUID, organization_id: uuid.UUID
) -> bool:
    """Unpin the install (the caller holds its lock); False when no pin held it."""
    changed = await session.scalar(
        text(f"""
            UPDATE agents a SET pinned_at = NULL, pinned_until = NULL, pin_reason = NULL,
                                pinned_by_user_id = NULL
            WHERE a.id = :install AND {PINNED}
            RETURNING a.id"""),  # noqa: S608 (constants only)
        {"install": install_id},
    )
    if changed is not None:
        await audit.record(
            session,
            actor=actor.user_id,
            action="install.unpinned",
            target_type="install",
            target_id=install_id,
            organization_id=organization_id,
        )
    return changed is not None
