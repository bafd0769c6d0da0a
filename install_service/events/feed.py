"""Reading the change feed: pages after a cursor, and long polls that wait for the next event.

Order and completeness. Events are read in `(txid, seq)` order, and only those with `txid`
below the reader's horizon: the oldest transaction of this database still running when the
page is read (`HORIZON`). The database gives every event a `txid` at least its writer's
transaction id (see migration 0008), so a transaction still running when a page is read can
only add events at or above the horizon: after everything the page returned.
A reader that resumes from the last cursor it was given therefore receives every committed
event exactly once and in order, however transactions interleave and in whatever order they
commit. Because the `txid` is also at least that of every event its writer could see, an
operation that waited for another (the install's row lock) is ordered after it.

The price is latency, never loss: an event is held back while a transaction of this database
with an older id is still running (bounded by the statement timeout and
`idle_in_transaction_session_timeout`). Transactions of other databases on the same server
cannot write events here, so they do not hold the feed back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from install_service.events.listener import Listener
from install_service.events.schemas import Event, EventPage
from install_service.orgs.schemas import OrgRef
from install_service.pagination import Keyset, PageRequest

KEYSET = Keyset("events", (int, int))
MAX_WAIT_SECONDS = 30
# While nothing wakes a long poll it still looks every so often (a notification lost with the
# listener's connection, say); after a wake-up that found nothing (an older transaction was
# still running) it looks again sooner, backing off.
IDLE_RECHECK_SECONDS = 5.0
_RETRY_SECONDS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

# The horizon: every transaction of this database below it has ended. It is the statement
# snapshot's `xmin` with the transactions of other databases left out: the smallest id the
# snapshot lists as running (`xip`) that no session of another database holds, or else its
# `xmax`, the first id it has not seen. A transaction is left out only when
# `pg_stat_activity` shows it in another database: a session's database never changes, and
# one that has ended or cannot be seen keeps holding the horizon (later, never wrong). The
# reader's own id, which its snapshot does not list, holds it too (its own events are not
# committed). A hot standby's snapshot lists no running transaction at all: there the
# horizon is the snapshot's `xmin`, the server's oldest.
HORIZON = """(SELECT CAST(CAST(least(
        pg_snapshot_xmax(pg_current_snapshot()),
        pg_current_xact_id_if_assigned(),
        (SELECT min(x) FROM pg_snapshot_xip(pg_current_snapshot()) AS x
         WHERE NOT EXISTS (SELECT FROM pg_stat_activity a
                           WHERE a.backend_xid = xid(x) AND a.datname <> current_database())),
        CASE WHEN pg_is_in_recovery() THEN pg_snapshot_xmin(pg_current_snapshot()) END)
    AS text) AS bigint))"""

# An event row as the API shows it: `e` the event, `o` its organization.
EVENT_COLUMNS = """e.id, e.type, e.organization_id, o.slug AS organization_slug, e.install_id,
       e.occurred_at, e.data, e.txid, e.seq"""

_READ = f"""
    SELECT {EVENT_COLUMNS}
    FROM events e JOIN organizations o ON o.id = e.organization_id
    WHERE e.txid < {HORIZON}
      AND (e.txid, e.seq) > (:after_0, :after_1)
      AND (CAST(:org AS uuid) IS NULL OR e.organization_id = :org)
      AND (CAST(:type AS text) IS NULL OR e.type = :type)
    ORDER BY e.txid, e.seq
    LIMIT :limit"""  # noqa: S608 (constants only)


def to_event(row: Any) -> Event:
    """An `EVENT_COLUMNS` row as an event."""
    return Event(
        id=row.id,
        type=row.type,
        organization=OrgRef(id=row.organization_id, slug=row.organization_slug),
        install_id=row.install_id,
        occurred_at=row.occurred_at,
        data=row.data,
    )


async def read(
    session: AsyncSession,
    page: PageRequest,
    *,
    organization_id: uuid.UUID | None = None,
    event_type: str | None = None,
) -> EventPage:
    """The events after `page.cursor` (of one organization and type, if given), oldest first.

    Run it in a transaction of its own: a transaction that already has an id (one that wrote
    something) holds its own horizon back, and would see only events older than itself."""
    after = KEYSET.after(page) or (0, 0)
    rows = (
        await session.execute(
            text(_READ),
            {
                "after_0": after[0],
                "after_1": after[1],
                "org": organization_id,
                "type": event_type,
                "limit": page.limit,
            },
        )
    ).all()
    position = (rows[-1].txid, rows[-1].seq) if rows else after
    return EventPage(items=[to_event(r) for r in rows], next_cursor=KEYSET.cursor(position))


async def follow(
    engine: AsyncEngine,
    listener: Listener,
    fetch: Callable[[AsyncSession], Awaitable[EventPage]],
    *,
    organization_id: uuid.UUID | None,
    wait: float,
) -> EventPage:
    """`fetch` a page; while it is empty, wait up to `wait` seconds for an event of the
    organization (or any, for None) to commit, and fetch again.

    Each fetch is a short transaction of its own; between fetches no database connection is
    held: the process's one listening connection wakes the waiter."""
    from install_service.db.session import transaction

    deadline = time.monotonic() + min(wait, MAX_WAIT_SECONDS)
    retries = iter(_RETRY_SECONDS)
    recheck = IDLE_RECHECK_SECONDS
    with listener.subscribe(organization_id) as woken:
        while True:
            woken.clear()
            async with transaction(engine) as session:
                page = await fetch(session)
            left = deadline - time.monotonic()
            if page.items or left <= 0:
                return page
            try:
                await asyncio.wait_for(woken.wait(), timeout=min(left, recheck))
                # Woken: the event may still be behind an older transaction; look again soon.
                recheck = next(retries, _RETRY_SECONDS[-1])
            except TimeoutError:
                pass
