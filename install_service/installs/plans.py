"""A plan as its answer shows it: counts per kind with the conflicts among them, and items
whose paths carry a line diff where the org's value or the release's is long text.

The engine plans in SQL and reports paths and outcomes; the values behind a path are read
here, in one statement and only for the items a person reads (a dry run's, a refusal's
conflicts), so that a prompt changed on both sides shows as lines added and removed rather
than two whole strings.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import engine, textdiff
from install_service.db.session import statement
from install_service.errors import InstallConflict
from install_service.installs.schemas import FieldOutcome, KindChanges, PlanItem, RequiredBy

# The org's content and the release's item of each listed (kind, slug).
_VALUES_SQL = f"""
WITH wanted AS MATERIALIZED (
    SELECT DISTINCT w.kind, w.slug
    FROM unnest(CAST(:kinds AS text[]), CAST(:slugs AS text[])) AS w(kind, slug)),
org AS ({engine.ORG_ROWS})
SELECT w.kind, w.slug, {engine.content_of("o.kind", "o.id")} AS current,
       install_unqualified(w.kind, i.item) AS release
FROM wanted w
LEFT JOIN org o ON o.kind = w.kind AND o.slug = w.slug
LEFT JOIN template_release_items i
    ON i.release_id = CAST(:release AS uuid) AND i.kind = w.kind AND i.slug = w.slug
"""  # noqa: S608 (constants only)


def changes(planned: engine.Plan) -> dict[str, KindChanges]:
    """The plan's counts per kind, its conflicts included."""
    conflicts = {
        kind: len([c for c in planned.conflicts if c.kind == kind]) for kind in engine.KINDS
    }
    return {
        kind: KindChanges(**counts, conflict=conflicts[kind])
        for kind, counts in planned.changes().items()
    }


async def _values(
    session: AsyncSession, target: engine.Target, items: list[engine.Planned]
) -> dict[str, tuple[Any, Any]]:
    """`kind:slug` -> (the org's content, the release's item) of items that name paths."""
    named = [i for i in items if i.fields]
    if not named:
        return {}
    rows = await session.execute(
        statement(_VALUES_SQL),
        {
            "org": target.organization_id,
            "release": target.release_id,
            "kinds": [i.kind for i in named],
            "slugs": [i.slug for i in named],
        },
    )
    return {f"{r.kind}:{r.slug}": (r.current, r.release) for r in rows}


def _diff(values: tuple[Any, Any] | None, path: str, release_label: str) -> str | None:
    if values is None:
        return None
    current, release = values
    return textdiff.unified(
        textdiff.at_pointer(current, path),
        textdiff.at_pointer(release, path),
        old_label="organization",
        new_label=release_label,
    )


def _label(version: int | None) -> str:
    return "release" if version is None else f"release {version}"


async def public_items(
    session: AsyncSession, target: engine.Target, planned: engine.Plan, *, version: int | None
) -> list[PlanItem]:
    """The plan's items as an answer lists them, each path with its line diff where the
    org's value or the release's (`version`) is text spanning lines."""
    values = await _values(session, target, planned.items)
    label = _label(version)
    return [
        PlanItem(
            kind=i.kind,
            slug=i.slug,
            action="unchanged" if i.action == "rebase" else i.action,
            reason=i.reason,
            fields=None
            if i.fields is None
            else [
                FieldOutcome(
                    path=f["path"],
                    outcome=f["outcome"],
                    diff=_diff(values.get(i.key), f["path"], label),
                )
                for f in i.fields
            ],
            required_by=None
            if i.required_by is None
            else msgspec.convert(i.required_by, list[RequiredBy]),
        )
        for i in planned.items
    ]


def written_items(planned: engine.Plan) -> list[PlanItem]:
    """What a write did, item by item: its paths and their outcomes, without values (a
    write is answered, not reviewed)."""
    return msgspec.convert(msgspec.to_builtins(planned.public()), list[PlanItem])


async def raise_conflicts(
    session: AsyncSession, target: engine.Target, planned: engine.Plan, *, version: int | None
) -> None:
    """Refuse a plan with conflicts (409), listing every one as the engine does, each with
    `diffs: [{path, diff}]` for its conflicting paths whose values are long text."""
    try:
        planned.raise_conflicts()
    except InstallConflict as refused:
        values = await _values(session, target, planned.conflicts)
        label = _label(version)
        for conflict, item in zip(refused.conflicts, planned.conflicts, strict=True):
            diffs = [
                {"path": path, "diff": diff}
                for path in conflict["fields"]
                if (diff := _diff(values.get(item.key), path, label)) is not None
            ]
            if diffs:
                conflict["diffs"] = diffs
        raise
