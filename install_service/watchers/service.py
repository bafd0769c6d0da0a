"""The desired state a watcher runner reconciles against."""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.actor import Actor
from install_service.orgs.service import resolve_org
from install_service.pagination import Keyset, PageRequest
from install_service.watchers import schedules
from install_service.watchers.schemas import WatcherState, WatcherStatePage, WatcherVersion

_KEYSET = Keyset("watchers", (str,))


async def desired_state(
    session: AsyncSession, actor: Actor, org_ref: str, page: PageRequest
) -> WatcherStatePage:
    """Every active watcher of an org the actor is a member of, by slug, with its current
    version's content, its schedule and when it runs next.

    A watcher whose schedule was just changed outside the service may not have its
    `next_run_at` stored yet (the worker stores it within a minute): it is computed here."""
    org = await resolve_org(session, actor, org_ref)
    rows = await session.execute(
        text("""
            SELECT w.id, w.slug, w.name, w.description, w.schedule, w.schedule_enabled,
                   w.next_run_at, w.connection_id, a.id AS install_id, w.updated_at, now() AS now,
                   CASE WHEN v.id IS NOT NULL THEN jsonb_build_object(
                       'id', v.id, 'version', v.version, 'name', v.name, 'prompt', v.prompt,
                       'extraction_schema', v.extraction_schema,
                       'sources_schema', v.sources_schema,
                       'reactions_guidance', v.reactions_guidance,
                       'created_at', v.created_at) END AS current_version
            FROM watchers w
            LEFT JOIN watcher_versions v ON v.id = w.current_version_id AND v.watcher_id = w.id
            LEFT JOIN agents a ON a.id = w.agent_id AND a.template_agent_id IS NOT NULL
            WHERE w.organization_id = :org AND w.status = 'active'
              AND (CAST(:after_0 AS text) IS NULL OR w.slug > :after_0)
            ORDER BY w.slug LIMIT :limit_plus_one"""),
        {"org": org.id, **_KEYSET.params(page)},
    )
    found = [_state(dict(r._mapping)) for r in rows]
    return _KEYSET.page(WatcherStatePage, found, page, lambda w: (w.slug,))


def _state(row: dict[str, Any]) -> WatcherState:
    now = row.pop("now")
    version = row.pop("current_version")
    if row["next_run_at"] is None and row["schedule_enabled"] and row["schedule"]:
        row["next_run_at"] = schedules.next_run(row["schedule"], now)
    return WatcherState(
        **row,
        current_version=None if version is None else msgspec.convert(version, WatcherVersion),
    )
