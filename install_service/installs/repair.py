"""What an org changed in what it installed, and what to do about it: drift (every path where
a managed row differs from its release), reconcile (make drifted rows equal the release again)
and detach (the org takes one row over; upgrades leave it alone until it is adopted).

Each runs inside the caller's transaction and never commits; changes are recorded like every
other lifecycle operation (history, audit), and nothing an org wrote is lost: every value
reconcile overwrites is in the history event.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import engine, textdiff
from install_service.actor import Actor
from install_service.errors import Conflict, NotFound
from install_service.events import outbox
from install_service.installs import plans
from install_service.installs.schemas import (
    DriftItem,
    DriftReport,
    InstallResult,
    KindChanges,
    Overwritten,
    PlanItem,
    TemplateRef,
)
from install_service.installs.service import (
    describe,
    installed_target,
    load_install,
    manageable,
)
from install_service.orgs.schemas import OrgRef


async def drift(session: AsyncSession, actor: Actor, install_id: uuid.UUID) -> DriftReport:
    """Managed rows edited, archived or deleted in the org since they were mirrored, each with
    every path where it differs from the release item it mirrors."""
    found = await load_install(session, actor, install_id)
    items: list[DriftItem] = []
    if found["status"] == "active":
        drifted = await engine.drift(session, installed_target(found))
        items = [_with_diffs(msgspec.convert(d, DriftItem)) for d in drifted]
    return DriftReport(install=describe(found, actor), drift=items)


def _with_diffs(item: DriftItem) -> DriftItem:
    """A drifted item whose paths holding long text carry their line diff."""
    fields = [
        msgspec.structs.replace(
            f,
            diff=textdiff.unified(f.mirrored, f.current, old_label="mirrored", new_label="current"),
        )
        for f in item.fields
    ]
    return msgspec.structs.replace(item, fields=fields)


def _result(found: dict[str, Any], action: Any, **kw: Any) -> InstallResult:
    return InstallResult(
        id=found["id"],
        organization=OrgRef(id=found["organization_id"], slug=found["org_slug"]),
        template=TemplateRef(slug=found["template"]),
        version=found["version"],
        status=found["status"],
        created=False,
        action=action,
        **kw,
    )


async def reconcile(
    session: AsyncSession, actor: Actor, install_id: uuid.UUID, *, dry_run: bool = False
) -> InstallResult:
    """Make every drifted managed row equal the installed release again: edited fields back to
    the release's (`tenant` fields left alone), archived rows reactivated, deleted rows made
    again, references repaired. Returns every local value it overwrote (also in the history).
    Nothing drifted: a no-op."""
    found = await manageable(session, actor, install_id, lock=not dry_run)
    if found["status"] != "active":
        raise Conflict(
            f"install {install_id} is uninstalled; install it again instead",
            code="install_not_active",
        )
    release = engine.Release(
        id=found["installed_release_id"],
        version=found["version"],
        template=found["template"],
        owner=found["template_agent_id"],
        source_org_id=found["template_org_id"],
        change_notes=f"{found['template']} release {found['version']}, reconciled",
    )
    install = engine.Install(
        organization_id=found["organization_id"],
        id=found["id"],
        status=found["status"],
        installed_release_id=found["installed_release_id"],
        installed_version=found["version"],
    )
    (outcome,) = await engine.sync(
        session,
        release,
        [install],
        actor=actor,
        options=engine.Options(reconcile=True),
        dry_run=dry_run,
        locked=True,
    )
    planned = outcome.plan
    changes = plans.changes(planned)
    overwritten = [Overwritten(**o) for o in planned.overwritten()] or None
    if dry_run:
        return _result(
            found,
            "reconcile" if planned.writes else "none",
            dry_run=True,
            changes=changes,
            items=await plans.public_items(
                session, installed_target(found), planned, version=found["version"]
            ),
            overwritten=overwritten,
            conflicts=len(planned.conflicts),
            would_conflict=bool(planned.conflicts),
        )
    await plans.raise_conflicts(session, installed_target(found), planned, version=found["version"])
    return _result(
        found,
        "reconcile" if planned.writes else "none",
        dry_run=False,
        changes=changes,
        items=plans.written_items(planned),
        overwritten=overwritten if planned.writes else None,
    )


async def detach(
    session: AsyncSession, actor: Actor, install_id: uuid.UUID, *, kind: str, slug: str
) -> InstallResult:
    """The org takes one managed row over: its provenance is cleared and later upgrades leave
    that slug alone (plan action `detached`) until this install adopts it back, even while
    another template that adopted the row manages it. Detaching a detached row changes
    nothing."""
    found = await manageable(session, actor, install_id, lock=True)
    table = engine.TABLES[kind]
    row = (
        await session.execute(
            text(f"""
                WITH detached AS (
                    UPDATE {table} SET managed_by_template_agent_id = NULL,
                        source_template_org_id = NULL, source_row_id = NULL,
                        mirrored_release_id = NULL, mirrored_at = NULL, mirrored_hash = NULL,
                        detached_from_template_agent_ids = array_append(
                            array_remove(detached_from_template_agent_ids, :owner), :owner),
                        updated_at = now()
                    WHERE organization_id = :org AND slug = :slug
                      AND managed_by_template_agent_id = :owner
                    RETURNING id)
                SELECT (SELECT count(*) FROM detached) AS changed,
                       EXISTS (SELECT 1 FROM {table} WHERE organization_id = :org
                               AND slug = :slug
                               AND managed_by_template_agent_id IS DISTINCT FROM :owner
                               AND :owner = ANY(detached_from_template_agent_ids))
                           AS already"""),  # noqa: S608
            {"org": found["organization_id"], "slug": slug, "owner": found["template_agent_id"]},
        )
    ).one()
    if not row.changed and not row.already:
        raise NotFound(f"install {install_id} manages no {kind} {slug!r}", code="item_not_found")
    counts = {k: dict.fromkeys(engine.CHANGE_LABELS, 0) for k in engine.KINDS}
    counts[kind]["detached"] = 1
    item = PlanItem(kind=kind, slug=slug, action="detached")
    if row.changed:
        await engine.record(
            session,
            [
                engine.Record(
                    install_id=install_id,
                    action="detach",
                    from_release=found["installed_release_id"],
                    to_release=found["installed_release_id"],
                    status=found["status"],
                    changes={**counts, "detached": [{"kind": kind, "slug": slug}]},
                    items=[outbox.Item(kind=kind, slug=slug, action="detached")],
                )
            ],
            template=found["template"],
            actor=actor,
        )
    return _result(
        found,
        "detach" if row.changed else "none",
        dry_run=False,
        changes={k: KindChanges(**c) for k, c in counts.items()},
        items=[item],
    )
