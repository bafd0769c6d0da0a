"""The desired state of an organization's watchers, as a runner reads it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from install_service.pagination import Page


class WatcherVersion(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    version: int
    name: str
    prompt: str
    extraction_schema: dict[str, Any]
    sources_schema: dict[str, Any]
    reactions_guidance: str | None
    created_at: datetime


class WatcherState(msgspec.Struct, kw_only=True):
    """An active watcher: what to run (its current version), when (`schedule`, 5-field cron
    in UTC; `next_run_at`, null while the schedule is disabled, missing or invalid), with
    which connection, for which install (`install_id`, null for the org's own watchers)."""

    id: uuid.UUID
    slug: str
    name: str
    description: str | None
    schedule: str | None
    schedule_enabled: bool
    next_run_at: datetime | None
    connection_id: uuid.UUID | None
    install_id: uuid.UUID | None
    updated_at: datetime
    current_version: WatcherVersion | None


class WatcherStatePage(Page, kw_only=True):
    items: list[WatcherState]
