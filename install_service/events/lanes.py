"""The worker's side of webhook deliveries, in sets: record many attempts and lease the next
delivery of many lanes, in one statement; find every lane with a delivery waiting. See
`events.webhooks` for the rules and `events.dispatcher` for the loop that runs these.

Each function is one statement, and the dispatcher runs each as a unit of work of its own,
committed as the statement completes: a lease is committed before its request goes out, and
a lane's outcome is recorded no later than its next delivery is leased (in the same
statement, when the dispatcher has both at once).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from install_service import context, metrics
from install_service.audit.service import AUDIT_INSERT
from install_service.config import WebhookSettings
from install_service.db.session import statement
from install_service.events.feed import EVENT_COLUMNS, HORIZON, to_event
from install_service.events.schemas import Event
from install_service.events.webhooks import LEASE_MARGIN_SECONDS, MAX_RETRY_DELAY_SECONDS

# (endpoint id, organization id): deliveries of one lane go out one at a time, in feed order.
Lane = tuple[uuid.UUID, uuid.UUID]
Executor = AsyncConnection | AsyncSession


@dataclass(frozen=True, kw_only=True)
class Leased:
    """A lane's oldest pending delivery, leased for one attempt (its `attempt`-th)."""

    lane: Lane
    delivery_id: uuid.UUID
    attempt: int
    url: str
    secret: str
    event: Event


@dataclass(frozen=True, kw_only=True)
class Waiting:
    """A lane whose oldest pending delivery may not be sent yet: look again in `seconds`."""

    lane: Lane
    seconds: float


@dataclass(kw_only=True)
class Leases:
    """What a lease found. `unsettled`: lanes whose oldest pending delivery is of an event at
    or above the feed's `horizon` (a transaction still running may yet add an earlier event
    to the lane), with that event's `txid`: they may go once the horizon has passed it. A lane
    in no list has nothing to send (no pending delivery, or its endpoint is disabled)."""

    leased: list[Leased]
    waiting: list[Waiting]
    unsettled: list[tuple[int, Lane]]
    horizon: int


async def horizon(executor: Executor) -> int:
    """The feed's horizon now: every transaction below it has ended."""
    return int((await executor.execute(statement(f"SELECT {HORIZON}"))).scalar_one())


async def load_for_redelivery(executor: Executor, delivery_id: uuid.UUID) -> Leased | None:
    """A delivery to send once more on request; None if it is gone or its endpoint disabled."""
    row = (
        await executor.execute(
            statement(f"""
                SELECT d.id AS delivery_id, d.endpoint_id, w.url, w.secret, w.enabled,
                       {EVENT_COLUMNS}
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
    return Leased(
        lane=(row.endpoint_id, row.organization_id),
        delivery_id=row.delivery_id,
        attempt=0,
        url=row.url,
        secret=row.secret,
        event=to_event(row),
    )


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


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One attempt to record: the delivery, the lease it was made under (its `attempt`-th;
    0 for a redelivery, sent on request outside the lane) and how it went."""

    delivery_id: uuid.UUID
    attempt: int
    outcome: Outcome
    redelivery: bool = False


# Every attempt is logged; each delivery is settled (under the lease the attempt was made
# under): succeeded, retried after a back-off, or given up. A redelivery's success settles
# its delivery whatever its status; its failure changes nothing but the log. Per endpoint,
# the attempts of the batch are taken in the order they were made: a success resets the
# count of consecutive failures, each failure after the last success adds one, and reaching
# the limit disables the endpoint, saying why (the last failure) and logging it in the audit
# log. An endpoint whose count does not change is not written.
_RECORD = f"""
outcome AS (
    SELECT * FROM unnest(
        CAST(:deliveries AS uuid[]), CAST(:attempted_at AS timestamptz[]),
        CAST(:duration_ms AS float8[]), CAST(:status_code AS int[]), CAST(:error AS text[]),
        CAST(:ok AS bool[]), CAST(:redelivery AS bool[]), CAST(:retry_in AS float8[]),
        CAST(:reason AS text[]), CAST(:attempt AS int[]))
        WITH ORDINALITY AS o(delivery_id, attempted_at, duration_ms, status_code, error, ok,
                             redelivery, retry_in, reason, attempt, n)),
attempt AS (
    INSERT INTO webhook_attempts (delivery_id, attempted_at, duration_ms, status_code, error,
                                  succeeded, redelivery)
    SELECT o.delivery_id, o.attempted_at, o.duration_ms, o.status_code, o.error, o.ok,
           o.redelivery
    FROM outcome o JOIN webhook_deliveries d ON d.id = o.delivery_id),
delivery AS (
    UPDATE webhook_deliveries d SET
        status = CASE WHEN o.ok THEN 'succeeded'
                      WHEN o.redelivery THEN d.status
                      WHEN d.attempts >= :max THEN 'failed'
                      ELSE 'pending' END,
        leased_until = CASE WHEN o.redelivery THEN d.leased_until END,
        next_attempt_at = CASE WHEN o.ok OR o.redelivery THEN d.next_attempt_at
                               ELSE now() + make_interval(secs => o.retry_in) END,
        finished_at = CASE WHEN o.ok OR (NOT o.redelivery AND d.attempts >= :max) THEN now()
                           ELSE d.finished_at END,
        last_status_code = o.status_code, last_error = o.error
    FROM outcome o
    WHERE d.id = o.delivery_id
      -- a lane's attempt settles its delivery only under its own lease: recorded after the
      -- lease ran out and another worker leased the delivery again, it is only logged
      AND (o.redelivery OR d.attempts = o.attempt)
      AND (d.status = 'pending' OR (o.redelivery AND o.ok))
    RETURNING d.id, d.endpoint_id, d.organization_id, d.status,
              extract(epoch FROM d.next_attempt_at - now()) AS retry_seconds),
counted AS (
    SELECT d.endpoint_id, o.ok, o.reason,
           row_number() OVER (PARTITION BY d.endpoint_id ORDER BY o.attempted_at, o.n) AS k
    FROM outcome o JOIN webhook_deliveries d ON d.id = o.delivery_id
    WHERE o.ok OR NOT o.redelivery),
per_endpoint AS (
    SELECT endpoint_id, max(k) FILTER (WHERE ok) AS last_success,
           count(*) FILTER (WHERE NOT ok) AS failures,
           (array_agg(reason ORDER BY k DESC) FILTER (WHERE NOT ok))[1] AS reason
    FROM counted GROUP BY endpoint_id),
failing AS (
    SELECT p.endpoint_id, p.reason,
           CASE WHEN p.last_success IS NULL THEN w.consecutive_failures + p.failures
                ELSE (SELECT count(*) FROM counted c
                      WHERE c.endpoint_id = p.endpoint_id AND NOT c.ok
                        AND c.k > p.last_success) END AS failures
    FROM per_endpoint p JOIN webhook_endpoints w ON w.id = p.endpoint_id),
endpoint AS (
    UPDATE webhook_endpoints w SET
        consecutive_failures = f.failures,
        enabled = w.enabled AND f.failures < :max,
        disabled_at = CASE WHEN w.enabled AND f.failures >= :max THEN now()
                           ELSE w.disabled_at END,
        disabled_reason = CASE WHEN w.enabled AND f.failures >= :max THEN f.reason
                               ELSE w.disabled_reason END
    FROM failing f
    WHERE w.id = f.endpoint_id AND w.consecutive_failures <> f.failures
    RETURNING w.id, w.disabled_reason, w.enabled, w.disabled_at = now() AS just_disabled),
disabled AS (
    {AUDIT_INSERT}
    SELECT NULL, 'webhook.disabled', 'webhook', e.id::text, NULL, CAST(:request_id AS text),
           jsonb_build_object('reason', e.disabled_reason)
    FROM endpoint e WHERE e.just_disabled AND NOT e.enabled
    RETURNING target_id)"""  # noqa: S608 (constants only)

# Each lane's head is its oldest pending delivery, whatever its state: only the head is ever
# sent, so a lane whose head is leased, backing off or not settled yet sends nothing. A head
# may go out when it is due, not leased, below the feed's horizon (no transaction still
# running can add an earlier event to its lane) and its endpoint is enabled. Heads are locked
# skipping those another worker is leasing or recording at this moment: that worker goes on
# with the lane. Locking rechecks each head as it now is, so a head another worker leased or
# settled since this statement's snapshot is left alone too.
#
# What this statement records is read as it leaves it, not as the snapshot has it: a
# delivery it records is no longer its lane's head, a lane whose attempt it records as
# failed waits for its retry, and an endpoint it disables gets no lease.
_LEASE = f"""
lane AS (
    SELECT l.* FROM unnest(CAST(:endpoints AS uuid[]), CAST(:organizations AS uuid[]))
        AS l(endpoint_id, organization_id)
    LEFT JOIN (SELECT DISTINCT endpoint_id, organization_id FROM delivery
               WHERE status = 'pending') retrying USING (endpoint_id, organization_id)
    WHERE retrying.endpoint_id IS NULL),
horizon AS (SELECT {HORIZON} AS txid),
head AS (
    SELECT h.*, h.event_txid < (SELECT txid FROM horizon) AS settled FROM lane l
    CROSS JOIN LATERAL (
        SELECT d.id, d.endpoint_id, d.organization_id, d.event_id, d.event_txid,
               d.next_attempt_at, d.leased_until
        FROM webhook_deliveries d
        WHERE d.endpoint_id = l.endpoint_id AND d.organization_id = l.organization_id
          AND d.status = 'pending' AND d.id NOT IN (SELECT delivery_id FROM outcome)
        ORDER BY d.event_txid, d.event_seq
        LIMIT 1) h),
free AS (
    -- Found by id: what locking rechecks is what may have changed since the snapshot.
    SELECT d.id FROM webhook_deliveries d
    WHERE d.id = ANY (ARRAY(SELECT id FROM head WHERE settled))
      AND d.status = 'pending' AND d.next_attempt_at <= now()
      AND (d.leased_until IS NULL OR d.leased_until <= now())
      AND EXISTS (SELECT FROM webhook_endpoints w WHERE w.id = d.endpoint_id AND w.enabled)
      AND NOT EXISTS (SELECT FROM endpoint e WHERE e.id = d.endpoint_id AND NOT e.enabled)
    FOR UPDATE OF d SKIP LOCKED),
claimed AS (
    UPDATE webhook_deliveries d
    SET attempts = d.attempts + 1, leased_until = now() + make_interval(secs => :lease)
    FROM free f WHERE d.id = f.id
    RETURNING d.id, d.attempts)"""  # noqa: S608 (constants only)

# One row always, with what was recorded; with it, a row per lane that has a pending
# delivery: leased (with its event), or why not.
_STEP = f"""
WITH {_RECORD},
{_LEASE}
SELECT r.recorded, r.disabled, x.* FROM (
    SELECT (SELECT coalesce(jsonb_agg(jsonb_build_array(id, status, retry_seconds)), '[]')
            FROM delivery) AS recorded,
           ARRAY(SELECT CAST(target_id AS uuid) FROM disabled) AS disabled) r
LEFT JOIN (
    SELECT h.endpoint_id AS lane_endpoint, h.organization_id AS lane_organization,
           h.id AS delivery_id, c.attempts AS claimed_attempt, w.url, w.secret,
           h.settled, h.event_txid AS head_txid, (SELECT txid FROM horizon) AS horizon,
           extract(epoch FROM greatest(h.next_attempt_at, h.leased_until) - now())
               AS wait_seconds,
           {EVENT_COLUMNS}
    FROM head h
    JOIN webhook_endpoints w ON w.id = h.endpoint_id AND w.enabled
    LEFT JOIN claimed c ON c.id = h.id
    LEFT JOIN events e ON c.id IS NOT NULL AND e.id = h.event_id
    LEFT JOIN organizations o ON o.id = e.organization_id) x ON true"""  # noqa: S608


@dataclass(frozen=True, kw_only=True)
class Recorded:
    """What recording a batch did: each delivery it settled, with its status and, while it
    is pending, the seconds until its retry; and the endpoints it disabled."""

    statuses: dict[uuid.UUID, tuple[str, float | None]]
    disabled_endpoints: list[uuid.UUID]


def disabled_reason(outcome: Outcome, settings: WebhookSettings) -> str:
    return (
        f"disabled after {settings.max_attempts} consecutive failed attempts; "
        f"last: {outcome.error or f'HTTP {outcome.status_code}'}"
    )


async def step(
    executor: Executor,
    attempts: Sequence[Attempt],
    lanes: Sequence[Lane],
    settings: WebhookSettings,
) -> tuple[Recorded, Leases]:
    """Record `attempts`: log each, settle its delivery (succeeded, retried after a back-off,
    or given up), count each endpoint's consecutive failures and disable it at the limit
    (saying why, in the audit log too); a redelivery's failure counts against nothing. Then
    lease the oldest pending delivery of each of `lanes` that may send one now (each lease
    counts as an attempt) and say when to look again at the others."""
    outcomes = [a.outcome for a in attempts]
    rows = await executor.execute(
        statement(_STEP),
        {
            "deliveries": [a.delivery_id for a in attempts],
            "attempted_at": [o.attempted_at for o in outcomes],
            "duration_ms": [o.duration_ms for o in outcomes],
            "status_code": [o.status_code for o in outcomes],
            "error": [o.error for o in outcomes],
            "ok": [o.succeeded for o in outcomes],
            "redelivery": [a.redelivery for a in attempts],
            "attempt": [a.attempt for a in attempts],
            "retry_in": [retry_delay(max(a.attempt, 1), settings) for a in attempts],
            "reason": [disabled_reason(o, settings) for o in outcomes],
            "max": settings.max_attempts,
            "request_id": context.request_id.get(),
            "endpoints": [endpoint for endpoint, _ in lanes],
            "organizations": [organization for _, organization in lanes],
            "lease": lease_seconds(settings),
        },
    )
    found = rows.all()
    recorded = Recorded(
        statuses={
            uuid.UUID(delivery_id): (
                status,
                max(float(retry), 0.0) if status == "pending" else None,
            )
            for delivery_id, status, retry in found[0].recorded
        },
        disabled_endpoints=list(found[0].disabled),
    )
    leases = Leases(leased=[], waiting=[], unsettled=[], horizon=0)
    for row in found:
        if row.lane_endpoint is None:
            continue  # no lane, or none with a pending delivery
        lane = (row.lane_endpoint, row.lane_organization)
        leases.horizon = row.horizon
        if row.claimed_attempt is not None:
            leases.leased.append(
                Leased(
                    lane=lane,
                    delivery_id=row.delivery_id,
                    attempt=row.claimed_attempt,
                    url=row.url,
                    secret=row.secret,
                    event=to_event(row),
                )
            )
        elif not row.settled:
            leases.unsettled.append((row.head_txid, lane))
        else:
            # Due later, leased by another worker, or being leased by one right now (it goes
            # on with the lane; looking again once a lease could have run out is enough).
            wait = float(row.wait_seconds)
            leases.waiting.append(
                Waiting(lane=lane, seconds=wait if wait > 0 else lease_seconds(settings))
            )
    counts = Counter(
        "redelivered" if a.redelivery else "succeeded" if a.outcome.succeeded else "failed"
        for a in attempts
    )
    for label, count in counts.items():
        metrics.WEBHOOK_ATTEMPTS.labels(label).inc(count)
    return recorded, leases


async def record(
    executor: Executor, attempts: Sequence[Attempt], settings: WebhookSettings
) -> Recorded:
    """Record `attempts` only (see `step`)."""
    recorded, _ = await step(executor, attempts, [], settings)
    return recorded


async def lanes_waiting(executor: Executor) -> list[Waiting]:
    """Every lane with a pending delivery of an enabled endpoint, and in how many seconds its
    oldest may be tried: for a dispatcher's start and its periodic look (lost notifications,
    dead workers' leases)."""
    rows = await executor.execute(
        statement("""
            SELECT DISTINCT ON (d.endpoint_id, d.organization_id)
                   d.endpoint_id, d.organization_id,
                   extract(epoch FROM greatest(d.next_attempt_at, d.leased_until) - now())
                       AS wait_seconds
            FROM webhook_deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id
            WHERE d.status = 'pending' AND w.enabled
            ORDER BY d.endpoint_id, d.organization_id, d.event_txid, d.event_seq""")
    )
    return [
        Waiting(lane=(r.endpoint_id, r.organization_id), seconds=max(float(r.wait_seconds), 0))
        for r in rows
    ]


async def release(executor: Executor, leases: Sequence[Leased]) -> None:
    """Give back leases whose attempts will not be recorded (a dispatcher stopping), so
    another worker sends those deliveries at once rather than when the leases run out."""
    if not leases:
        return
    await executor.execute(
        statement("""
            UPDATE webhook_deliveries d SET leased_until = NULL
            FROM unnest(CAST(:deliveries AS uuid[]), CAST(:attempts AS int[]))
                AS l(delivery_id, attempt)
            WHERE d.id = l.delivery_id AND d.attempts = l.attempt AND d.status = 'pending'"""),
        {
            "deliveries": [lease.delivery_id for lease in leases],
            "attempts": [lease.attempt for lease in leases],
        },
    )
