"""Writing events: one per lifecycle operation that changed something, in its transaction.

An operation appends its event inside the statement that records it (`EVENTS_CTES`, one
event per row of a relation `event_source` the statement defines: a batch of installs
records theirs in one statement), or with `emit` when it has no such statement. The
database does the rest in that same transaction (see migration 0008): it orders the event for
readers, notifies long-polling readers at commit, and queues a webhook delivery for every
endpoint that wants it. A rolled-back operation leaves nothing behind; a committed one is
never lost.

`data` carries the template, the releases moved from and to, and every changed item with its
kind, slug, action (`created`, `updated`, `reactivated`, `archived`, `adopted` for an org's own
row an install or upgrade took over, `detached` for a row the org took over) and, for watchers
and classifiers, the version the item is at afterwards. A row whose content stays as the org
has it while only its base moves to the new release is not a change and is not listed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.vocabulary import EVENT_TYPES

# What the feed, the API and the webhooks call each lifecycle operation.
INSTALL_EVENT_TYPES = {
    "install": "install.created",
    "upgrade": "install.upgraded",
    "rollback": "install.rolled_back",
    "reinstall": "install.reinstalled",
    "uninstall": "install.uninstalled",
    "reconcile": "install.reconciled",
    "detach": "install.item_detached",
}
# The install engine's plan actions as the feed reports them.
_PLAN_ACTIONS = {
    "create": "created",
    "update": "updated",
    "archive": "archived",
    "adopt": "adopted",
}


@dataclass(frozen=True, kw_only=True)
class Item:
    """One changed item of an operation."""

    kind: str
    slug: str
    action: str
    reason: str | None = None


class _PlanItem(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def slug(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def reason(self) -> str | None: ...


def items_from_plan(planned: Iterable[_PlanItem]) -> list[Item]:
    """The items a plan writes (created, updated or reactivated, archived); the rest changed
    nothing."""
    items = []
    for p in planned:
        action = _PLAN_ACTIONS.get(p.action)
        if action is None:
            continue
        if p.reason == "reactivated":
            items.append(Item(kind=p.kind, slug=p.slug, action="reactivated"))
        else:
            items.append(Item(kind=p.kind, slug=p.slug, action=action, reason=p.reason))
    return items


# One event per row of the statement's `event_source (n, organization_id, install_id, type,
# template, from_release, to_release, items, extra)`: `n` tells the rows apart, `items` is a
# JSON array of `{kind, slug, action, reason}` (see `items_json`), `extra` an object merged
# into the event's data. Items get the version their row is at after the operation (watchers
# and classifiers), read in the organization the event belongs to.
EVENTS_CTES = """
event_items AS (
    SELECT s.n,
           jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
               'kind', i.kind, 'slug', i.slug, 'action', i.action, 'reason', i.reason,
               'version_id', v.id, 'version', v.version)) ORDER BY i.ordinality) AS items
    FROM event_source s
    CROSS JOIN LATERAL ROWS FROM (
        jsonb_to_recordset(s.items) AS (kind text, slug text, action text, reason text))
        WITH ORDINALITY AS i(kind, slug, action, reason, ordinality)
    LEFT JOIN LATERAL (
        SELECT wv.id, wv.version FROM watchers w
        JOIN watcher_versions wv ON wv.id = w.current_version_id
        WHERE i.kind = 'watchers' AND w.organization_id = s.organization_id AND w.slug = i.slug
        UNION ALL
        SELECT cv.id, cv.version FROM event_classifiers c
        JOIN event_classifier_versions cv ON cv.id = c.current_version_id
        WHERE i.kind = 'classifiers' AND c.organization_id = s.organization_id
          AND c.slug = i.slug) v ON i.action <> 'archived'
    GROUP BY s.n),
event_written AS (
    INSERT INTO events (type, organization_id, install_id, data)
    SELECT s.type, s.organization_id, s.install_id,
           jsonb_build_object(
               'template', s.template,
               'from_release', (SELECT jsonb_build_object('id', r.id, 'version', r.version)
                                FROM template_releases r WHERE r.id = s.from_release),
               'to_release', (SELECT jsonb_build_object('id', r.id, 'version', r.version)
                              FROM template_releases r WHERE r.id = s.to_release),
               'items', coalesce(e.items, '[]'::jsonb))
           || coalesce(s.extra, '{}'::jsonb)
    FROM event_source s LEFT JOIN event_items e ON e.n = s.n
    ORDER BY s.n
    RETURNING id)"""


def checked_type(type: str) -> str:
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    return type


def items_json(items: Sequence[Item]) -> str:
    """An event's items as the JSON array `EVENTS_CTES` reads."""
    return msgspec.json.encode(
        [{"kind": i.kind, "slug": i.slug, "action": i.action, "reason": i.reason} for i in items]
    ).decode()


# `event_source` for one event, bound by `event_params`.
ONE_EVENT_SOURCE = """
event_source AS (
    SELECT 1 AS n, CAST(:event_org AS uuid) AS organization_id,
           CAST(:event_install AS uuid) AS install_id, CAST(:event_type AS text) AS type,
           CAST(:event_template AS text) AS template,
           CAST(:event_from_release AS uuid) AS from_release,
           CAST(:event_to_release AS uuid) AS to_release,
           CAST(:event_items AS jsonb) AS items, CAST(:event_extra AS jsonb) AS extra)"""


def event_params(
    *,
    organization_id: uuid.UUID,
    install_id: uuid.UUID | None = None,
    type: str,
    template: str | None,
    from_release: uuid.UUID | None,
    to_release: uuid.UUID | None,
    items: Sequence[Item],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Bind parameters for `ONE_EVENT_SOURCE`."""
    return {
        "event_org": organization_id,
        "event_install": install_id,
        "event_type": checked_type(type),
        "event_template": template,
        "event_from_release": from_release,
        "event_to_release": to_release,
        "event_items": items_json(items),
        "event_extra": msgspec.json.encode(extra or {}).decode(),
    }


async def emit(
    session: AsyncSession,
    *,
    organization_id: uuid.UUID,
    install_id: uuid.UUID | None = None,
    type: str,
    template: str | None,
    from_release: uuid.UUID | None,
    to_release: uuid.UUID | None,
    items: Sequence[Item],
    extra: dict[str, Any] | None = None,
) -> uuid.UUID:
    """Append one event in its own statement."""
    params = event_params(
        organization_id=organization_id,
        install_id=install_id,
        type=type,
        template=template,
        from_release=from_release,
        to_release=to_release,
        items=items,
        extra=extra,
    )
    sql = f"WITH {ONE_EVENT_SOURCE}, {EVENTS_CTES} SELECT id FROM event_written"  # noqa: S608
    event_id: uuid.UUID = (await session.execute(text(sql), params)).scalar_one()
    return event_id
