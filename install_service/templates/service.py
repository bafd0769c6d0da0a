"""Publishing template documents as releases, and reading templates and releases."""

from __future__ import annotations

import graphlib
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import engine, textdiff
from install_service.actor import Actor
from install_service.audit import service as audit
from install_service.errors import Conflict, Forbidden, TemplateDocumentInvalid
from install_service.events import outbox
from install_service.pagination import Int4, Keyset, PageRequest
from install_service.releases import TEMPLATES, VISIBLE, get_release, visibility_params
from install_service.templates import documents
from install_service.templates.documents import snapshot
from install_service.templates.schemas import (
    DiffItem,
    DiffPath,
    PublishResult,
    Release,
    ReleaseDiff,
    ReleasePage,
    ReleaseSource,
    ReleaseSummary,
    RequirementInfo,
    SeedResult,
    TemplateDiff,
    TemplateDocument,
    TemplateManifest,
    TemplatePage,
    TemplateSummary,
)
from install_service.watchers import schedules as watcher_schedules


async def publish(
    session: AsyncSession,
    document: TemplateDocument,
    *,
    actor: Actor,
    source: ReleaseSource,
    notes: str = "",
) -> PublishResult:
    """Make the template org equal `document` and cut release N+1 if its content changed.

    Concurrent publishes of one template serialize on the template agent's row lock, so they
    get consecutive versions. Unchanged content cuts no release. `source` records who cut it
    (`api`, `cli`; `seed` is for `seed`).
    """
    if not actor.is_platform_admin:
        raise Forbidden("publishing templates needs a platform admin", code="admin_required")
    requirements = await check_requirements(session, document)
    org_id = await _ensure_template_org(session, document)
    await session.execute(
        text("""
            INSERT INTO agents (organization_id, slug, name, description, is_template)
            VALUES (:org, :slug, :name, :description, true)
            ON CONFLICT (organization_id) WHERE is_template DO NOTHING"""),
        {
            "org": org_id,
            "slug": document.slug,
            "name": document.name,
            "description": document.description,
        },
    )
    # The row lock serializes concurrent publishes of this template until commit.
    agent_id = await session.scalar(
        text("SELECT id FROM agents WHERE organization_id = :org AND is_template FOR UPDATE"),
        {"org": org_id},
    )
    await session.execute(
        text("""
            UPDATE agents SET name = :name, description = :description
            WHERE id = :id AND (name, description) IS DISTINCT FROM (:name, :description)"""),
        {"id": agent_id, "name": document.name, "description": document.description},
    )

    snap = msgspec.json.encode(snapshot(document)).decode()
    latest = (
        await session.execute(
            text("""
                SELECT r.id, r.version, r.content_hash = install_content_hash(CAST(:snap AS jsonb))
                       AS same
                FROM template_releases r WHERE r.template_agent_id = :agent
                ORDER BY r.version DESC LIMIT 1"""),
            {"agent": agent_id, "snap": snap},
        )
    ).first()
    if latest is not None and latest.same:
        release_id, version, created = latest.id, latest.version, False
    else:
        release = (
            await session.execute(
                text("""
                    INSERT INTO template_releases (template_agent_id, version, predecessor_id,
                        snapshot, content_hash, notes, created_by_user_id, source)
                    VALUES (:agent, :version, :predecessor, CAST(:snap AS jsonb),
                            install_content_hash(CAST(:snap AS jsonb)), :notes, :actor, :source)
                    RETURNING id, version"""),
                {
                    "agent": agent_id,
                    "version": (latest.version if latest else 0) + 1,
                    "predecessor": latest.id if latest else None,
                    "snap": snap,
                    "notes": notes,
                    "actor": actor.user_id,
                    "source": source,
                },
            )
        ).one()
        release_id, version, created = release.id, release.version, True
        await _record_requirements(session, release_id, document, requirements)
        await audit.record(
            session,
            actor=actor.user_id,
            action="template.published",
            target_type="template",
            target_id=document.slug,
            organization_id=org_id,
            details={
                "version": version,
                "release_id": str(release_id),
                "notes": notes,
                "source": source,
            },
        )

    target = engine.Target(
        organization_id=org_id, release_id=release_id, owner=None, agent_id=agent_id
    )
    await engine.lock(session, [target])
    planned = await engine.plan(session, target)
    planned.raise_conflicts()
    if planned.writes:
        await engine.apply(session, [(target, planned)])
        if planned.slugs("watchers", "create", "update"):
            await watcher_schedules.schedule(session, org_id)
    if created:
        await outbox.emit(
            session,
            organization_id=org_id,
            type="template.published",
            template=document.slug,
            from_release=latest.id if latest else None,
            to_release=release_id,
            items=outbox.items_from_plan(planned.items),
            extra={"notes": notes},
        )
    return PublishResult(
        template=document.slug,
        version=version,
        release_id=release_id,
        created=created,
        changes=planned.changes(),
    )


# --- Requirements (contract §13) --------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Requirement:
    """A template a document requires, as publishing found it."""

    template: str
    owner: uuid.UUID  # its template agent
    min_version: int | None
    checked_release_id: uuid.UUID  # its latest release, which the references resolve in


# Each required template, its latest release and the minimum release named, if it exists.
_REQUIRED_SQL = """
SELECT w.slug, w.min_version, a.id AS owner, l.id AS latest_id, l.version AS latest_version,
       m.id AS min_id
FROM unnest(CAST(:slugs AS text[]), CAST(:mins AS int[])) AS w(slug, min_version)
LEFT JOIN organizations q ON q.slug = w.slug
LEFT JOIN agents a ON a.organization_id = q.id AND a.is_template
LEFT JOIN LATERAL (SELECT x.id, x.version FROM template_releases x
                   WHERE x.template_agent_id = a.id ORDER BY x.version DESC LIMIT 1) l ON true
LEFT JOIN template_releases m ON m.template_agent_id = a.id AND m.version = w.min_version
"""

# The items of the releases `:releases` (what references resolve in), and of every release
# they were themselves checked against, transitively (what a document's slugs must not
# collide with: an org holding them all has one row per slug and kind).
_REQUIRED_ITEMS_SQL = """
WITH RECURSIVE closure(release_id) AS (
    SELECT unnest(CAST(:releases AS uuid[]))
    UNION
    SELECT rr.checked_release_id FROM template_release_requirements rr
    JOIN closure c ON c.release_id = rr.release_id)
SELECT q.slug AS template, r.version, i.release_id, i.kind, i.slug,
       coalesce((i.item->>'is_symmetric')::boolean, false) AS is_symmetric
FROM closure c
JOIN template_release_items i ON i.release_id = c.release_id
JOIN template_releases r ON r.id = i.release_id
JOIN agents a ON a.id = r.template_agent_id
JOIN organizations q ON q.id = a.organization_id
"""

# Which template requires which, as their latest releases say.
_REQUIRES_GRAPH_SQL = """
SELECT dq.slug AS dependent, q.slug AS required
FROM agents da
JOIN organizations dq ON dq.id = da.organization_id
JOIN LATERAL (SELECT x.id FROM template_releases x WHERE x.template_agent_id = da.id
              ORDER BY x.version DESC LIMIT 1) l ON true
JOIN template_release_requirements rr ON rr.release_id = l.id
JOIN agents a ON a.id = rr.required_template_agent_id
JOIN organizations q ON q.id = a.organization_id
WHERE da.is_template
"""

_KIND_WORDS = {
    "entity_types": "entity type",
    "relationship_types": "relationship type",
    "classifiers": "classifier",
    "watchers": "watcher",
}


async def check_requirements(
    session: AsyncSession, document: TemplateDocument
) -> list[Requirement]:
    """Check a document's requirements against the database, every problem at once (422,
    nothing written): each required template exists with a release (and the minimum one
    named); every qualified reference resolves in the required template's latest release
    (and in the minimum named), a qualified inverse to a type that is not symmetric; no slug
    of the document is also one of the same kind of a template it requires, directly or
    not; and requiring them makes no cycle."""
    problems: list[dict[str, str]] = []
    if not document.requires:
        return []
    rows = (
        await session.execute(
            text(_REQUIRED_SQL),
            {
                "slugs": [r.template for r in document.requires],
                "mins": [r.version for r in document.requires],
            },
        )
    ).all()
    found: dict[str, Requirement] = {}
    resolve_in: dict[str, list[uuid.UUID]] = {}
    for index, row in enumerate(rows):
        path = f"$.requires[{index}]"
        if row.owner is None:
            problems.append({"path": f"{path}.template", "message": f"no template {row.slug!r}"})
        elif row.latest_id is None:
            problems.append(
                {"path": f"{path}.template", "message": f"template {row.slug!r} has no release"}
            )
        elif row.min_version is not None and row.min_id is None:
            problems.append(
                {
                    "path": f"{path}.version",
                    "message": f"template {row.slug!r} has no release {row.min_version} "
                    f"(latest: {row.latest_version})",
                }
            )
        else:
            found[row.slug] = Requirement(
                template=row.slug,
                owner=row.owner,
                min_version=row.min_version,
                checked_release_id=row.latest_id,
            )
            resolve_in[row.slug] = [row.latest_id, *([row.min_id] if row.min_id else [])]
    problems.extend(await _cycles(session, document))
    items = (
        await session.execute(
            text(_REQUIRED_ITEMS_SQL),
            {"releases": [rid for ids in resolve_in.values() for rid in ids]},
        )
    ).all()
    by_release: dict[uuid.UUID, dict[tuple[str, str], bool]] = {}
    owners: dict[tuple[str, str], set[str]] = {}
    versions: dict[uuid.UUID, int] = {}
    for item in items:
        by_release.setdefault(item.release_id, {})[(item.kind, item.slug)] = item.is_symmetric
        owners.setdefault((item.kind, item.slug), set()).add(item.template)
        versions[item.release_id] = item.version
    for kind in engine.KINDS:
        for index, item in enumerate(getattr(document, kind)):
            for template in sorted(owners.get((kind, item.slug), ())):
                problems.append(
                    {
                        "path": f"$.{kind}[{index}].slug",
                        "message": f"{item.slug!r} is also a {_KIND_WORDS[kind]} of "
                        f"{template!r}, which this template requires: an organization "
                        f"holds one {_KIND_WORDS[kind]} per slug (reference it as "
                        f"'{template}:{item.slug}' instead)",
                    }
                )
            for where, ref_kind, ref in documents.references(kind, item):
                required = documents.qualifier(ref)
                if required is None or required not in resolve_in:
                    continue
                slug = documents.bare(ref)
                for release_id in resolve_in[required]:
                    symmetric = by_release.get(release_id, {}).get((ref_kind, slug))
                    at = f"$.{kind}[{index}].{where}"
                    if symmetric is None:
                        problems.append(
                            {
                                "path": at,
                                "message": f"template {required!r} release "
                                f"{versions.get(release_id, '?')} has no "
                                f"{_KIND_WORDS[ref_kind]} {slug!r}",
                            }
                        )
                    elif where == "inverse" and symmetric:
                        problems.append(
                            {
                                "path": at,
                                "message": f"{ref!r} is symmetric: a symmetric type cannot "
                                "be an inverse",
                            }
                        )
    for kind, slug in sorted(k for k, ts in owners.items() if len(ts) > 1):
        problems.append(
            {
                "path": "$.requires",
                "message": f"templates {', '.join(sorted(owners[(kind, slug)]))} each have "
                f"a {_KIND_WORDS[kind]} {slug!r}: an organization cannot hold them all",
            }
        )
    if problems:
        raise TemplateDocumentInvalid(problems)
    return list(found.values())


async def _cycles(session: AsyncSession, document: TemplateDocument) -> list[dict[str, str]]:
    """A cycle the document's requirements would close, as a problem."""
    graph: dict[str, set[str]] = {}
    for row in await session.execute(text(_REQUIRES_GRAPH_SQL)):
        graph.setdefault(row.dependent, set()).add(row.required)
    graph[document.slug] = {r.template for r in document.requires}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = " -> ".join(reversed(exc.args[1]))
        return [{"path": "$.requires", "message": f"requirements make a cycle: {cycle}"}]
    return []


async def _record_requirements(
    session: AsyncSession,
    release_id: uuid.UUID,
    document: TemplateDocument,
    requirements: list[Requirement],
) -> None:
    """A new release's requirements, and every item of theirs it references (from which of
    its own items): one statement."""
    if not requirements:
        return
    owner = {r.template: r.owner for r in requirements}
    refs = {
        (owner[template], ref_kind, documents.bare(ref), kind, item.slug)
        for kind in engine.KINDS
        for item in getattr(document, kind)
        for _, ref_kind, ref in documents.references(kind, item)
        if (template := documents.qualifier(ref)) is not None
    }
    ordered = sorted(refs, key=lambda r: (str(r[0]), *r[1:]))
    await session.execute(
        text("""
            WITH required AS (
                INSERT INTO template_release_requirements
                    (release_id, required_template_agent_id, min_version, checked_release_id)
                SELECT :release, w.owner, w.min_version, w.checked
                FROM unnest(CAST(:owners AS uuid[]), CAST(:mins AS int[]),
                            CAST(:checked AS uuid[])) AS w(owner, min_version, checked)
                RETURNING 1)
            INSERT INTO template_release_references
                (release_id, required_template_agent_id, kind, slug, item_kind, item_slug)
            SELECT :release, w.owner, w.kind, w.slug, w.item_kind, w.item_slug
            FROM unnest(CAST(:ref_owners AS uuid[]), CAST(:kinds AS text[]),
                        CAST(:slugs AS text[]), CAST(:item_kinds AS text[]),
                        CAST(:item_slugs AS text[]))
                 AS w(owner, kind, slug, item_kind, item_slug)"""),
        {
            "release": release_id,
            "owners": [r.owner for r in requirements],
            "mins": [r.min_version for r in requirements],
            "checked": [r.checked_release_id for r in requirements],
            "ref_owners": [r[0] for r in ordered],
            "kinds": [r[1] for r in ordered],
            "slugs": [r[2] for r in ordered],
            "item_kinds": [r[3] for r in ordered],
            "item_slugs": [r[4] for r in ordered],
        },
    )


async def seed(session: AsyncSession, document: TemplateDocument) -> SeedResult:
    """Publish bundled content at start-up, unless the template moved on without it.

    The bundled copy is published only while the template has no release or its latest
    release came from seeding; once someone published through the API or the CLI, seeding
    leaves the template (its org, rows and releases) exactly as it is. The decision is taken
    under the template agent's row lock, so it holds against a concurrent publish.
    """
    latest = (
        await session.execute(
            text("""
                SELECT r.version, r.source
                FROM organizations o
                JOIN agents a ON a.organization_id = o.id AND a.is_template
                LEFT JOIN LATERAL (
                    SELECT version, source FROM template_releases x
                    WHERE x.template_agent_id = a.id ORDER BY x.version DESC LIMIT 1) r ON true
                WHERE o.slug = :slug
                FOR UPDATE OF a"""),
            {"slug": document.slug},
        )
    ).first()
    if latest is not None and latest.version is not None and latest.source != "seed":
        return SeedResult(
            template=document.slug, action="kept", version=latest.version, source=latest.source
        )
    result = await publish(session, document, actor=Actor.system(), source="seed")
    return SeedResult(
        template=document.slug,
        action="published" if result.created else "unchanged",
        version=result.version,
        source="seed",
    )


async def diff(session: AsyncSession, document: TemplateDocument, *, actor: Actor) -> TemplateDiff:
    """What publishing `document` would change, without writing anything: the publish runs
    in a savepoint that is rolled back. The changed items and paths come from the same
    release diff as `GET .../releases/{a}/diff/{b}`."""
    savepoint = await session.begin_nested()
    try:
        result = await publish(session, document, actor=actor, source="cli")
        items: list[dict[str, Any]] = []
        template_paths: list[dict[str, Any]] = []
        if result.created and result.version > 1:
            previous = await session.scalar(
                text("""SELECT p.id FROM template_releases r
                        JOIN template_releases p ON p.id = r.predecessor_id
                        WHERE r.id = :id"""),
                {"id": result.release_id},
            )
            items = await engine.release_diff(session, previous, result.release_id)
            template_paths = await engine.template_diff(session, previous, result.release_id)
    finally:
        await savepoint.rollback()
    previous_version = result.version - 1 if result.created else result.version
    return TemplateDiff(
        template=result.template,
        latest_version=previous_version or None,
        next_version=result.version if result.created else None,
        changes=result.changes,
        items=diff_items(items, f"release {previous_version}", f"release {result.version}"),
        template_paths=diff_paths(
            template_paths, f"release {previous_version}", f"release {result.version}"
        ),
    )


def diff_items(items: list[dict[str, Any]], old_label: str, new_label: str) -> list[DiffItem]:
    """`engine.release_diff`'s rows as the API shows them: paths holding long text carry
    their line diff."""
    found = [msgspec.convert(item, DiffItem) for item in items]
    return [
        msgspec.structs.replace(item, paths=_with_diffs(item.paths, old_label, new_label))
        for item in found
    ]


def diff_paths(paths: list[dict[str, Any]], old_label: str, new_label: str) -> list[DiffPath]:
    """`engine.template_diff`'s paths (the template's own fields) as the API shows them, long
    text with its line diff as in `diff_items`."""
    found = [msgspec.convert(p, DiffPath) for p in paths]
    return _with_diffs(found, old_label, new_label)


def _with_diffs(paths: list[DiffPath], old_label: str, new_label: str) -> list[DiffPath]:
    return [
        msgspec.structs.replace(
            p, diff=textdiff.unified(p.old, p.new, old_label=old_label, new_label=new_label)
        )
        for p in paths
    ]


async def _ensure_template_org(session: AsyncSession, document: TemplateDocument) -> uuid.UUID:
    """The template's org, created on first publish. An existing org that is not a template
    org (a customer's, say) is never taken over: its slug is a conflict."""
    params = {"slug": document.slug, "name": document.name, "visibility": document.visibility}
    created: uuid.UUID | None = await session.scalar(
        text("""
            INSERT INTO organizations (slug, name, kind, visibility)
            VALUES (:slug, :name, 'team', :visibility)
            ON CONFLICT (slug) DO NOTHING
            RETURNING id"""),
        params,
    )
    if created is not None:
        return created
    existing = (
        await session.execute(
            text("""
                SELECT o.id, EXISTS (SELECT 1 FROM agents a
                                     WHERE a.organization_id = o.id AND a.is_template)
                       AS is_template_org
                FROM organizations o WHERE o.slug = :slug"""),
            params,
        )
    ).one()
    if not existing.is_template_org:
        raise Conflict(
            f"organization {document.slug!r} exists and is not a template organization",
            code="org_slug_taken",
        )
    await session.execute(
        text("""
            UPDATE organizations SET name = :name, visibility = :visibility
            WHERE id = :id AND (name, visibility) IS DISTINCT FROM (:name, :visibility)"""),
        {**params, "id": existing.id},
    )
    org_id: uuid.UUID = existing.id
    return org_id


_TEMPLATE_KEYSET = Keyset("templates", (str,))


async def list_templates(session: AsyncSession, actor: Actor, page: PageRequest) -> TemplatePage:
    """Templates the actor can see, by slug, with their latest version."""
    rows = await session.execute(
        text(f"""
            SELECT o.slug, a.name, a.description, o.visibility,
                   (SELECT max(version) FROM template_releases r WHERE r.template_agent_id = a.id)
                   AS latest_version
            FROM {TEMPLATES} WHERE {VISIBLE}
              AND (CAST(:after_0 AS text) IS NULL OR o.slug > :after_0)
            ORDER BY o.slug LIMIT :limit_plus_one"""),  # noqa: S608 (fixed fragments only)
        {**visibility_params(actor), **_TEMPLATE_KEYSET.params(page)},
    )
    found = [msgspec.convert(dict(r._mapping), TemplateSummary) for r in rows]
    return _TEMPLATE_KEYSET.page(TemplatePage, found, page, lambda t: (t.slug,))


def _release_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "template": row["template"],
        "version": row["version"],
        "predecessor_version": row["predecessor_version"],
        "content_hash": row["content_hash"],
        "notes": row["notes"],
        "source": row["source"],
        "created_at": row["created_at"],
    }


async def release(session: AsyncSession, actor: Actor, slug: str, version: int) -> Release:
    row = await get_release(session, actor, slug, version, with_snapshot=True)
    return Release(
        **_release_fields(row),
        snapshot=row["snapshot"],
        requires=msgspec.convert(row["requires"] or [], list[RequirementInfo]),
    )


_RELEASE_KEYSET = Keyset("releases", (Int4,))


async def list_releases(
    session: AsyncSession, actor: Actor, slug: str, page: PageRequest
) -> ReleasePage:
    """A template's releases, oldest first."""
    latest = await get_release(session, actor, slug)
    rows = await session.execute(
        text("""
            SELECT o.slug AS template, r.version, p.version AS predecessor_version,
                   r.content_hash, r.notes, r.source, r.created_at
            FROM template_releases r
            JOIN agents a ON a.id = r.template_agent_id
            JOIN organizations o ON o.id = a.organization_id
            LEFT JOIN template_releases p ON p.id = r.predecessor_id
            WHERE r.template_agent_id = :agent
              AND (CAST(:after_0 AS int) IS NULL OR r.version > :after_0)
            ORDER BY r.version LIMIT :limit_plus_one"""),
        {"agent": latest["template_agent_id"], **_RELEASE_KEYSET.params(page)},
    )
    found = [ReleaseSummary(**_release_fields(dict(r._mapping))) for r in rows]
    return _RELEASE_KEYSET.page(ReleasePage, found, page, lambda r: (r.version,))


async def manifest(session: AsyncSession, actor: Actor, slug: str) -> TemplateManifest:
    """Name, description, latest version and item slugs by kind."""
    latest = await get_release(session, actor, slug, with_snapshot=True)
    snap = latest["snapshot"]
    required_by = await session.scalars(
        text(f"""
            SELECT DISTINCT o.slug
            FROM {TEMPLATES}
            JOIN LATERAL (SELECT x.id FROM template_releases x WHERE x.template_agent_id = a.id
                          ORDER BY x.version DESC LIMIT 1) l ON true
            JOIN template_release_requirements rr ON rr.release_id = l.id
            WHERE rr.required_template_agent_id = :owner AND {VISIBLE}
            ORDER BY o.slug"""),  # noqa: S608 (constants only)
        {"owner": latest["template_agent_id"], **visibility_params(actor)},
    )
    return TemplateManifest(
        slug=latest["template"],
        name=latest["name"],
        description=latest["description"],
        visibility=latest["visibility"],
        latest_version=latest["version"],
        items={kind: [item["slug"] for item in snap.get(kind, [])] for kind in engine.KINDS},
        requires=msgspec.convert(latest["requires"] or [], list[RequirementInfo]),
        required_by=list(required_by),
    )


async def release_diff(
    session: AsyncSession, actor: Actor, slug: str, from_version: int, to_version: int
) -> ReleaseDiff:
    """Every item two releases of a template differ in, path by path (the same paths merges,
    drift and conflicts name)."""
    a = await get_release(session, actor, slug, from_version)
    b = await get_release(session, actor, slug, to_version)
    items = await engine.release_diff(session, a["id"], b["id"])
    template_paths = await engine.template_diff(session, a["id"], b["id"])
    return ReleaseDiff(
        template=a["template"],
        from_version=a["version"],
        to_version=b["version"],
        items=diff_items(items, f"release {a['version']}", f"release {b['version']}"),
        template_paths=diff_paths(
            template_paths, f"release {a['version']}", f"release {b['version']}"
        ),
    )
