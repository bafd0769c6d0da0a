"""Request and response bodies of resync runs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from install_service.installs.schemas import Version
from install_service.orgs.schemas import In, OrgRef, Out
from install_service.pagination import Page

RunStatus = Literal["queued", "running", "succeeded", "partial", "failed"]
ItemStatus = Literal["pending", "succeeded", "conflict", "failed"]


class ResyncRequest(In, kw_only=True):
    # Omitted: the template's latest release.
    version: Version | None = None
    # Let the template win over local edits in every org (`locally_modified` only).
    force: bool = False


class RunCounts(Out, kw_only=True):
    total: int
    pending: int
    succeeded: int
    conflict: int
    failed: int


class ResyncItem(Out, kw_only=True):
    organization: OrgRef
    install_id: uuid.UUID
    status: ItemStatus
    attempts: int
    conflicts: list[dict[str, Any]] | None
    error: str | None
    finished_at: datetime | None


class ResyncRun(Out, kw_only=True):
    id: uuid.UUID
    template: str
    version: int
    force: bool
    status: RunStatus
    # False when the request joined a run already in progress for this template.
    created: bool
    counts: RunCounts
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # Every item that did not succeed (pending, conflict, failed).
    items: list[ResyncItem]


class RunSummary(Out, kw_only=True):
    """A run as lists show it: its counts, not its items."""

    id: uuid.UUID
    template: str
    version: int
    force: bool
    status: RunStatus
    counts: RunCounts
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunPage(Page, kw_only=True):
    items: list[RunSummary]


class TimelinePoint(Out, kw_only=True):
    """How many items had finished, by outcome, at `at` (cumulative)."""

    at: datetime
    succeeded: int
    conflict: int
    failed: int


class RunTimeline(Out, kw_only=True):
    """A run's outcomes over time: evenly spaced points from its start to its end (or now)."""

    run_id: uuid.UUID
    total: int
    points: list[TimelinePoint]
