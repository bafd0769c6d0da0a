"""The worker's side of webhook deliveries: claim a lane's next delivery, record the attempt,
find lanes that need a worker. See `events.webhooks` for the rules."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import metrics
from install_service.audit import service as audit
from install_service.config import WebhookSettings
from install_service.events.feed import EVENT_COLUMNS, HORIZON, to_event
from install_service.events.schemas import Event
from install_service.events.webhooks import LEASE_MARGIN_SECONDS, MAX_RETRY_DELAY_SECONDS


@dataclass(frozen=True, kw_only=True)
class Claim:
    """What a look at a lane found: a delivery claimed for sending, or why there is none."""

    # Claimed: send it.
    delivery_id: uuid.UUID | None = None
    attempt: int = 0
    url: str = ""
    secret: str = ""
    event: Event | None = None
    # Not claimed: another job is sending it (and goes on with the lane)...
    leased: bool = False
    # ... or its retry is due then...
    not_before: datetime | None = None
    # ... or the lane's next event may still be preceded by one not yet committed.
    unsettled: bool = False


_CLAIM = f"""
WITH head AS (
    SELECT d.id FROM webhook_deliveries d
    WHERE d.endpoint_id = :endpoint AND d.organization_id = :org AND d.status = 'pending'
    ORDER BY d.event_txid, d.event_seq LIMIT 1),
claimed AS (
    UPDATE webhook_deliveries d
    SET attempts = d.attempts + 1, leased_until = now() + make_interval(secs => :lease)
    FROM head h, webhook_endpoints w
    WHERE d.id = h.id AND w.id = d.endpoint_id AND w.enabled AND d.status = 'pending'
      AND d.next_attempt_at <= now()
      AND (d.leased_until IS NULL OR d.leased_until <= now())
      AND d.event_txid < {HORIZON}
    RETURNING d.id, d.attempts)
SELECT d.id AS delivery_id, c.attempts AS claimed_attempt, w.enabled, w.url, w.secret,
       d.event_txid < {HORIZON} AS settled,
       d.leased_until > now() AS leased, d.next_attempt_at AS not_before,
       {EVENT_COLUMNS}
FROM head h
JOIN webhook_deliveries d ON d.id = h.id
JOIN webhook_endpoints w ON w.id = d.endpoint_id
JOIN events e ON e.id = d.event_id
JOIN organizations o ON o.id = e.organization_id
LEFT JOIN claimed c ON c.id = d.id"""  # noqa: S608 (constants only)


async def claim(
    session: AsyncSession, endpoint_id: uuid.UUID, organization_id: uuid.UUID, lease: float
) -> Claim | None:
    """Claim the lane's oldest pending delivery for `lease` seconds, if it may be sent now.
    None: nothing to send in this lane (none pending, or the endpoint is disabled).

    Run it as the first statement of its own transaction, and commit at once."""
    row = (
        await session.execute(
            text(_CLAIM), {"endpoint": endpoint_id, "org": organization_id, "lease": lease}
        )
    ).first()
    if row is None or not row.enabled:
        return None
    if row.claimed_attempt is not None:
        return Claim(
            delivery_id=row.delivery_id,
            attempt=row.claimed_attempt,
            url=row.url,
            secret=row.secret,
            event=to_event(row),
        )
    if row.leased:
        return Claim(leased=True)
    if not row.settled:
        return Claim(unsettled=True)
    return Claim(not_before=row.not_before)


async def load_for_redelivery(session: AsyncSession, delivery_id: uuid.UUID) -> Claim | None:
    """A delivery to send once more on request; None if it is gone or its endpoint disabled."""
    row = (
        await session.execute(
            text(f"""
                SELECT d.id AS delivery_id, w.url, w.secret, w.enabled, {EVENT_COLUMNS}
                FROM webhook_deliveries d
                JOIN webhook_endpoints w ON w.id = d.endpoint_id
                JOIN events e ON e.id = d.event_id
                JOIN organizations o ON o.id = e.organization_id
                WHERE d.id = :id"""),  # noqa: S608 (constants only)
            {"id": delivery_id},
        )
    ).first()
    if row is None or not row.enabled:
        return None
    return Claim(delivery_id=row.delivery_id, url=row.url, secret=row.secret, event=to_event(row))


def retry_delay(attempt: int, settings: WebhookSettings) -> float:
    """Seconds before the attempt after `attempt` (1-based): doubling from the base."""
    return float(min(settings.retry_base_seconds * 2 ** (attempt - 1), MAX_RETRY_DELAY_SECONDS))


def lease_seconds(settings: WebhookSettings) -> float:
    return settings.timeout_seconds + LEASE_MARGIN_SECONDS


@dataclass(frozen=True, kw_only=True)
class Outcome:
    attempted_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


_RECORD = """
WITH attempt AS (
    INSERT INTO webhook_attempts (delivery_id, attempted_at, duration_ms, status_code, error,
                                  succeeded, redelivery)
    SELECT :delivery, :at, :duration, :status_code, :error, :ok, :redelivery
    FROM webhook_deliveries WHERE id = :delivery),
delivery AS (
    UPDATE webhook_deliveries d SET
        status = CASE WHEN :ok THEN 'succeeded'
                      WHEN :redelivery THEN d.status
                      WHEN d.attempts >= :max THEN 'failed'
                      ELSE 'pending' END,
        leased_until = CASE WHEN :redelivery THEN d.leased_until END,
        next_attempt_at = CASE WHEN :ok OR :redelivery THEN d.next_attempt_at
                               ELSE now() + make_interval(secs => :retry_in) END,
        finished_at = CASE WHEN :ok OR (NOT :redelivery AND d.attempts >= :max) THEN now()
                           ELSE d.finished_at END,
        last_status_code = :status_code, last_error = :error
    WHERE d.id = :delivery AND (d.status = 'pending' OR (:redelivery AND :ok))
    RETURNING d.endpoint_id, d.status, d.next_attempt_at),
endpoint AS (
    UPDATE webhook_endpoints w SET
        consecutive_failures = CASE WHEN :ok THEN 0 ELSE w.consecutive_failures + 1 END,
        enabled = w.enabled AND (:ok OR w.consecutive_failures + 1 < :max),
        disabled_at = CASE WHEN w.enabled AND NOT :ok AND w.consecutive_failures + 1 >= :max
                           THEN now() ELSE w.disabled_at END,
        disabled_reason = CASE WHEN w.enabled AND NOT :ok AND w.consecutive_failures + 1 >= :max
                               THEN :reason ELSE w.disabled_reason END
    WHERE w.id = (SELECT endpoint_id FROM webhook_deliveries WHERE id = :delivery)
      AND NOT (:redelivery AND NOT :ok)
      AND (NOT :ok OR w.consecutive_failures > 0)
    RETURNING w.id, w.enabled, w.disabled_at = now() AS just_disabled)
SELECT (SELECT status FROM delivery) AS status,
       (SELECT next_attempt_at FROM delivery) AS next_attempt_at,
       (SELECT id FROM endpoint WHERE just_disabled AND NOT enabled) AS disabled_endpoint"""


@dataclass(frozen=True, kw_only=True)
class Recorded:
    status: str | None
    retry_at: datetime | None
    disabled_endpoint: uuid.UUID | None


async def record(
    session: AsyncSession,
    delivery_id: uuid.UUID,
    outcome: Outcome,
    settings: WebhookSettings,
    *,
    attempt: int = 0,
    redelivery: bool = False,
) -> Recorded:
    """Log an attempt and settle its delivery: succeeded, retried after a back-off, or given
    up; count the endpoint's consecutive failures and disable it at the limit (saying why).
    A redelivery's failure counts against nothing."""
    reason = (
        f"disabled after {settings.max_attempts} consecutive failed attempts; "
        f"last: {outcome.error or f'HTTP {outcome.status_code}'}"
    )
    row = (
        await session.execute(
            text(_RECORD),
            {
                "delivery": delivery_id,
                "at": outcome.attempted_at,
                "duration": outcome.duration_ms,
                "status_code": outcome.status_code,
                "error": outcome.error,
                "ok": outcome.succeeded,
                "redelivery": redelivery,
                "max": settings.max_attempts,
                "retry_in": retry_delay(max(attempt, 1), settings),
                "reason": reason,
            },
        )
    ).one()
    metrics.WEBHOOK_ATTEMPTS.labels(
        "redelivered" if redelivery else "succeeded" if outcome.succeeded else "failed"
    ).inc()
    if row.disabled_endpoint is not None:
        await audit.record(
            session,
            actor=None,
            action="webhook.disabled",
            target_type="webhook",
            target_id=row.disabled_endpoint,
            details={"reason": reason},
        )
    pending = row.status == "pending"
    return Recorded(
        status=row.status,
        retry_at=row.next_attempt_at if pending else None,
        disabled_endpoint=row.disabled_endpoint,
    )


async def lanes_to_resume(session: AsyncSession) -> list[dict[str, Any]]:
    """Every lane with a pending delivery of an enabled endpoint, and when its next delivery
    may be tried: for a worker start and the periodic sweep (lost jobs, dead workers)."""
    rows = await session.execute(
        text("""
            SELECT DISTINCT ON (d.endpoint_id, d.organization_id)
                   d.endpoint_id, d.organization_id,
                   greatest(d.next_attempt_at, d.leased_until) AS not_before
            FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id
            WHERE d.status = 'pending' AND w.enabled
            ORDER BY d.endpoint_id, d.organization_id, d.event_txid, d.event_seq""")
    )
    return [dict(r._mapping) for r in rows]
