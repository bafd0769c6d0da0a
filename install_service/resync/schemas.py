"""Request and response bodies of resync runs and fleet dry runs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import Meta

from install_service.installs.schemas import OrgReference, Version
from install_service.orgs.schemas import OrgRef
from install_service.pagination import Page
from install_service.schemas import In, Out
from install_service.states import ItemStatus, RunStatus

# A share of a wave's attempted items, or a threshold on it.
Rate = Annotated[float, Meta(ge=0, le=1)]
OrgList = Annotated[list[OrgReference], Meta(min_length=1, max_length=100_000)]
# Bakes last at most a week.
BakeSeconds = Annotated[int, Meta(ge=0, le=7 * 24 * 3600)]


class Wave(In, kw_only=True):
    """One wave: exactly one of `orgs` (these organizations), `count` (the next N installs in
    the stable order) or `percent` (as many as bring the run's coverage up to P% of the
    selected installs)."""

    orgs: OrgList | None = None
    count: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None
    percent: Annotated[float, Meta(gt=0, le=100)] | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("orgs", "count", "percent") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "a wave is exactly one of {orgs: [...]}, {count: N} or {percent: P}, "
                f"not {given or 'empty'}"
            )


class ResyncRequest(In, kw_only=True):
    # Omitted: the template's latest release.
    version: Version | None = None
    # Take the template's value at every conflicting path in every org.
    force: bool = False
    # Answer what the run would do, org by org, and write nothing (200, a `FleetPlan`).
    dry_run: bool = False
    # Only these organizations (slugs or ids); omitted: every active install.
    orgs: OrgList | None = None
    # Never these organizations.
    exclude: Annotated[list[OrgReference], Meta(max_length=100_000)] = msgspec.field(
        default_factory=list
    )
    # Omitted: one wave of every selected install. Installs the waves leave out form one last
    # wave.
    waves: Annotated[list[Wave], Meta(max_length=100)] = msgspec.field(default_factory=list)
    # A finished wave whose conflict (failure) rate is above this halts the run.
    max_conflict_rate: Rate | None = None
    max_failure_rate: Rate | None = None
    # Wait after each wave before the next.
    bake_seconds: BakeSeconds = 0
    # The run is `scheduled` until then (omitted, or in the past: it starts at once).
    start_at: Annotated[datetime, Meta(tz=True)] | None = None
    # Move pinned installs too (their pins stay).
    include_pinned: bool = False
    # Also install the template into the named `orgs` that have no active install of it (a
    # bulk install): each is an item of the run, like the upgrades.
    install: bool = False
    # Install or upgrade, in each org, the templates the release requires where the org lacks
    # them (in the same transaction as the org's own item); otherwise such an org's item is a
    # conflict of reason `missing_requirement`.
    with_requirements: bool = False

    def __post_init__(self) -> None:
        if self.install and self.orgs is None:
            raise ValueError("install: true installs into the orgs named in `orgs`; name them")


class RunCounts(Out, kw_only=True):
    total: int
    pending: int
    succeeded: int
    conflict: int
    failed: int
    skipped: int = 0
    cancelled: int = 0


class WaveCounts(RunCounts, kw_only=True):
    wave: int


class ResyncItem(Out, kw_only=True):
    organization: OrgRef
    # Empty for an item that installs the template until its install exists.
    install_id: uuid.UUID | None
    # The org had no active install when the run began: the item installs the template.
    installs: bool
    wave: int
    status: ItemStatus
    # `pinned`, `uninstalled` (skipped), `cancelled`, or `unchanged` (succeeded, nothing to
    # write).
    reason: str | None
    attempts: int
    conflicts: list[dict[str, Any]] | None
    error: str | None
    claimed_at: datetime | None
    finished_at: datetime | None


class ResyncRun(Out, kw_only=True):
    id: uuid.UUID
    template: str
    version: int
    force: bool
    status: RunStatus
    # False when the request joined an identical run in progress for this template.
    created: bool
    # The wave items are claimed from (while baking or halted: the wave that comes next).
    current_wave: int
    # Why the run halted (which wave, which rate, against which threshold).
    halt_reason: str | None
    counts: RunCounts
    waves: list[WaveCounts]
    include_pinned: bool
    with_requirements: bool
    max_conflict_rate: float | None
    max_failure_rate: float | None
    bake_seconds: int
    start_at: datetime | None
    # When a scheduled or baking run moves on.
    next_step_at: datetime | None
    # The request's `orgs`, `exclude` and `waves`, organizations as ids (`{}`: the default).
    selection: dict[str, Any]
    requested_by_user_id: uuid.UUID | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ResyncRunPage(Page, kw_only=True):
    items: list[ResyncRun]


class ResyncItemPage(Page, kw_only=True):
    items: list[ResyncItem]


Outcome = Literal["upgrade", "unchanged", "conflict", "skipped", "install"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)


class FleetCounts(Out, kw_only=True, omit_defaults=True):
    upgrade: int
    unchanged: int
    conflict: int
    skipped: int
    # Orgs the run would install the template into (`install: true`; left out when none).
    install: int = 0


class FleetWave(FleetCounts, kw_only=True):
    wave: int


class FleetItem(Out, kw_only=True, omit_defaults=True):
    organization: OrgRef
    # None where the run would install the template.
    install_id: uuid.UUID | None
    wave: int
    outcome: Outcome
    # Every conflict, as the install's 409 would list it.
    conflicts: list[dict[str, Any]] | None = None
    # Why it would be skipped (`pinned`).
    reason: str | None = None


class FleetPlan(Page, kw_only=True):
    """What a run started now would do to each selected install, and writes nothing."""

    dry_run: bool = True
    template: str
    version: int
    totals: FleetCounts
    waves: list[FleetWave]
    items: list[FleetItem]


class TimelinePoint(Out, kw_only=True):
    """How many items had finished, by outcome, at `at` (cumulative)."""

    at: datetime
    succeeded: int
    conflict: int
    failed: int
    skipped: int
    cancelled: int


class RunTimeline(Out, kw_only=True):
    """A run's outcomes over time: evenly spaced points from its start to its end (or now)."""

    run_id: uuid.UUID
    total: int
    points: list[TimelinePoint]
