"""Which installs a resync request selects, in which waves, and the fleet dry run.

A run and its dry run select through `select` alike, so the dry run's waves are the run's. The
dry run plans every selected install in one statement (`engine.plan_many`, the same plan and
merge a single install gets) and predicts each outcome the way the install lifecycle decides
it (`engine.predicted_outcome`): what a run started from the same state does, org by org.
"""

from __future__ import annotations

import heapq
import itertools
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import engine
from install_service.actor import Actor
from install_service.errors import Invalid
from install_service.installs.pins import PINNED
from install_service.orgs.schemas import OrgRef
from install_service.orgs.service import resolve_org_refs
from install_service.pagination import Keyset, Page, PageRequest
from install_service.releases import get_release
from install_service.resync.schemas import (
    OUTCOMES,
    FleetCounts,
    FleetItem,
    FleetPlan,
    FleetWave,
    Outcome,
    ResyncRequest,
)
from install_service.resync.waves import STABLE_ORDER, WaveSpec, assign


class Selected(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One selected install (or org to install into), with its wave (a Struct, untracked by
    the garbage collector: a fleet selects them by the hundred thousand, and none refers
    back to another)."""

    install_id: uuid.UUID | None
    organization_id: uuid.UUID
    slug: str
    installed_release_id: uuid.UUID | None
    pinned: bool
    # No active install yet: the run installs the template (`install: true`).
    installs: bool
    wave: int


@dataclass(frozen=True, kw_only=True)
class Selection:
    release: dict[str, Any]
    # In the stable order.
    installs: list[Selected]
    wave_count: int
    # The request's `orgs`, `exclude` and `waves`, organizations resolved to ids: what a
    # run stores, and what "an identical request" compares.
    normalized: dict[str, Any]


async def select(
    session: AsyncSession, actor: Actor, template: str, request: ResyncRequest
) -> Selection:
    """The release, the installs a run of `request` covers (active installs of the template,
    `orgs` only if given, never `exclude`) in the stable order, and the wave of each."""
    release = await get_release(session, actor, template, request.version)
    refs = {*(request.orgs or ()), *request.exclude}
    for wave in request.waves:
        refs.update(wave.orgs or ())
    ids = await resolve_org_refs(session, refs) if refs else {}
    only = None if request.orgs is None else sorted({ids[r] for r in request.orgs})
    exclude = sorted({ids[r] for r in request.exclude})
    # With `install`, the named orgs without an active install are selected too: the run
    # installs the template there.
    install_into = only if request.install and only is not None else []
    if release["organization_id"] in install_into:
        raise Invalid(
            "a template cannot be installed into its own organization",
            code="install_into_template_org",
        )
    rows = (
        await session.execute(
            text(f"""
                SELECT a.install_id, a.organization_id, o.slug, a.installed_release_id,
                       a.pinned, a.installs
                FROM (
                    SELECT a.id AS install_id, a.organization_id, a.installed_release_id,
                           {PINNED} AS pinned, false AS installs
                    FROM agents a
                    WHERE a.template_agent_id = :agent AND a.status = 'active'
                      AND (CAST(:only AS uuid[]) IS NULL
                           OR a.organization_id = ANY(CAST(:only AS uuid[])))
                    UNION ALL
                    -- An uninstalled install is installed again (its rows reactivated).
                    SELECT x.id, c.org, x.installed_release_id, false, true
                    FROM unnest(CAST(:install_into AS uuid[])) AS c(org)
                    LEFT JOIN agents x
                        ON x.template_agent_id = :agent AND x.organization_id = c.org
                    WHERE x.id IS NULL OR x.status <> 'active') a
                JOIN organizations o ON o.id = a.organization_id
                WHERE a.organization_id <> ALL(CAST(:exclude AS uuid[]))
                ORDER BY {STABLE_ORDER}"""),  # noqa: S608 (constants only)
            {
                "agent": release["template_agent_id"],
                "only": only,
                "exclude": exclude,
                "install_into": install_into,
            },
        )
    ).all()
    # Rows unpacked as tuples: by name, reading them took longer than the query.
    orgs = [org for _, org, *_ in rows]
    selected = set(orgs)
    # Organizations a run must include but cannot: not installed (and not to be), or excluded.
    named = [*(request.orgs or ())] + [ref for wave in request.waves for ref in wave.orgs or ()]
    outside = sorted({ref for ref in named if ids[ref] not in selected})
    if outside:
        raise Invalid(
            f"not an active install of {template!r} this run selects: {', '.join(outside)}"
            + ("" if request.install else " (install: true installs it there)"),
            code="organizations_not_selected",
            organizations=outside,
        )
    specs = [
        WaveSpec(
            orgs=None if wave.orgs is None else frozenset(ids[r] for r in wave.orgs),
            count=wave.count,
            percent=wave.percent,
        )
        for wave in request.waves
    ]
    assignment = assign(orgs, specs)
    normalized: dict[str, Any] = {"install": True} if request.install else {}
    if request.with_requirements:
        normalized["with_requirements"] = True
    if only is not None:
        normalized["orgs"] = [str(org) for org in only]
    if exclude:
        normalized["exclude"] = [str(org) for org in exclude]
    if specs:
        normalized["waves"] = [
            {"orgs": sorted(str(org) for org in spec.orgs)}
            if spec.orgs is not None
            else {"count": spec.count}
            if spec.count is not None
            else {"percent": spec.percent}
            for spec in specs
        ]
    return Selection(
        release=release,
        installs=[
            Selected(
                install_id=install_id,
                organization_id=org,
                slug=slug,
                installed_release_id=installed_release_id,
                pinned=pinned,
                installs=installs,
                wave=wave,
            )
            for (install_id, org, slug, installed_release_id, pinned, installs), wave in zip(
                rows, assignment.waves, strict=True
            )
        ],
        wave_count=assignment.count,
        normalized=normalized,
    )


_PLAN_ITEMS = Keyset("fleet_plan", (int, uuid.UUID))
# What a sync does with an active install, by (at the release already, its plan writes, its
# plan conflicts): decided once, not once per install of a fleet.
_PREDICTED: dict[tuple[bool, bool, bool], Outcome] = {
    (at, writes, conflicts): engine.predicted_outcome(
        at_release=at, writes=writes, conflicts=conflicts
    )
    for at, writes, conflicts in itertools.product((False, True), repeat=3)
}


async def dry_run(
    session: AsyncSession,
    actor: Actor,
    template: str,
    request: ResyncRequest,
    page: PageRequest | None = None,
) -> FleetPlan:
    """What a run of `request` started now would do to each install; writes nothing.

    Every selected install is planned in one statement, whatever the page; `page` picks which
    items the answer lists (in (wave, organization id) order; None: all of them), while
    `totals` and `waves` always count every install."""
    selection = await select(session, actor, template, request)
    release = selection.release
    included = [s for s in selection.installs if request.include_pinned or not s.pinned]
    planned = await engine.plan_many(
        session,
        release["id"],
        release["template_agent_id"],
        [(s.organization_id, s.installed_release_id, not s.installs) for s in included],
        engine.Options(force=request.force),
    )
    unmet = (
        {}
        if request.with_requirements
        else await engine.missing_requirements(
            session,
            engine.Release.of(release),
            [s.organization_id for s in included],
            lock=False,
        )
    )
    # Each install's outcome first (the totals count them all); items only for the page.
    decided: list[tuple[Selected, Outcome, str | None, list[dict[str, Any]] | None]] = []
    for s in selection.installs:
        if s.pinned and not request.include_pinned:
            decided.append((s, "skipped", "pinned", None))
            continue
        if s.organization_id in unmet:
            conflicts = [u.conflict() for u in unmet[s.organization_id]]
            decided.append((s, "conflict", "missing_requirement", conflicts))
            continue
        found = planned.conflicts.get(s.organization_id)
        outcome: Outcome = _PREDICTED[
            not s.installs and s.installed_release_id == release["id"],
            s.organization_id in planned.writing,
            found is not None,
        ]
        if s.installs and outcome == "upgrade":
            outcome = "install"
        decided.append((s, outcome, None, found if outcome == "conflict" else None))
    per_wave = Counter((s.wave, outcome) for s, outcome, _, _ in decided)
    totals = Counter(outcome for _, outcome, _, _ in decided)

    def position(d: tuple[Selected, Any, Any, Any]) -> tuple[int, uuid.UUID]:
        return d[0].wave, d[0].organization_id

    if page is None:
        listed, cursor = sorted(decided, key=position), None
    else:
        # The page's items, not the fleet, are put in order.
        after = _PLAN_ITEMS.after(page)
        rest = decided if after is None else [d for d in decided if position(d) > after]
        first = heapq.nsmallest(page.limit + 1, rest, key=position)
        shown = _PLAN_ITEMS.page(Page, first, page, position)
        listed, cursor = shown.items, shown.next_cursor
    items = [
        FleetItem(
            organization=OrgRef(id=s.organization_id, slug=s.slug),
            install_id=s.install_id,
            wave=s.wave,
            outcome=outcome,
            reason=reason,
            conflicts=conflicts,
        )
        for s, outcome, reason, conflicts in listed
    ]
    return FleetPlan(
        template=release["template"],
        version=release["version"],
        totals=FleetCounts(**{o: totals[o] for o in OUTCOMES}),
        waves=[
            FleetWave(
                wave=n,
                **{o: per_wave[(n, o)] for o in OUTCOMES},
            )
            for n in range(1, selection.wave_count + 1)
        ],
        items=items,
        next_cursor=cursor,
    )
