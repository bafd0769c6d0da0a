"""The one engine that makes an organization's schema rows equal a release snapshot.

Publishing applies a document to its template org (rows authored there, no provenance); an
install applies a release to a target org (rows managed by the template, with provenance). Both
are the same two steps:

- `plan`: one read-only statement compares the snapshot with the org's rows by slug and says,
  per item, `create`, `update`, `unchanged`, `archive` or `conflict` (with a reason);
- `apply`: one statement writes exactly the planned rows under ids chosen up front, re-points
  every reference at the org's own rows by slug, appends watcher and classifier versions whose
  content changed and archives what the release dropped; a second verifies in the database
  that every written row now equals its release item.

Releases are read item by item from `template_release_items`, which the database fills from
each release's snapshot, content hashes included, as the release is inserted.

A row's *content* is rebuilt in SQL in exactly the shape of its snapshot item (`ITEM_CONTENT`),
so `install_content_hash(content)` of a row and of its snapshot item agree when, and only when,
the row mirrors the item: that is what `mirrored_hash` records and what drift compares.

Nothing here commits, authorizes or records history; `installs.service` does that around it.
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.errors import Conflict, InstallConflict

# A foreign key or a unique key violated by the apply statement (see `apply`).
CHANGED_UNDER_APPLY = ("23503", "23505")
KINDS = ("entity_types", "relationship_types", "classifiers", "watchers")
TABLES = {
    "entity_types": "entity_types",
    "relationship_types": "entity_relationship_types",
    "classifiers": "event_classifiers",
    "watchers": "watchers",
}


def _slug_of(alias: str) -> str:
    """A referenced row's slug; a reference into another org can never equal a snapshot."""
    return (
        f"CASE WHEN {alias}.organization_id = t.organization_id THEN {alias}.slug "
        f"ELSE '!other-organization:' || {alias}.slug END"
    )


# Each row rebuilt as its snapshot item. Keys match the template document Structs exactly.
ITEM_CONTENT = {
    "entity_types": """
        SELECT 'entity_types' AS kind, t.id, t.organization_id, t.slug, t.status,
               t.managed_by_template_agent_id AS managed_by, t.mirrored_hash,
               jsonb_build_object(
                   'slug', t.slug, 'name', t.name, 'description', t.description,
                   'icon', t.icon, 'color', t.color, 'metadata_schema', t.metadata_schema,
                   'event_kinds', t.event_kinds) AS content
        FROM entity_types t""",
    "relationship_types": f"""
        SELECT 'relationship_types', t.id, t.organization_id, t.slug, t.status,
               t.managed_by_template_agent_id, t.mirrored_hash,
               jsonb_build_object(
                   'slug', t.slug, 'name', t.name, 'description', t.description,
                   'metadata_schema', t.metadata_schema, 'is_symmetric', t.is_symmetric,
                   'inverse', (SELECT {_slug_of("i")} FROM entity_relationship_types i
                               WHERE i.id = t.inverse_type_id),
                   'rules', coalesce((
                       SELECT jsonb_agg(jsonb_build_object('source', {_slug_of("s")},
                                                           'target', {_slug_of("g")})
                                        ORDER BY s.slug COLLATE "C", g.slug COLLATE "C")
                       FROM entity_relationship_type_rules r
                       JOIN entity_types s ON s.id = r.source_entity_type_id
                       JOIN entity_types g ON g.id = r.target_entity_type_id
                       WHERE r.relationship_type_id = t.id), '[]'::jsonb)) AS content
        FROM entity_relationship_types t""",
    "classifiers": f"""
        SELECT 'classifiers', t.id, t.organization_id, t.slug, t.status,
               t.managed_by_template_agent_id, t.mirrored_hash,
               jsonb_build_object(
                   'slug', t.slug, 'name', t.name, 'description', t.description,
                   'attribute_key', t.attribute_key,
                   'entity_type', (SELECT {_slug_of("e")} FROM entity_types e
                                   WHERE e.id = t.entity_type_id),
                   'watcher', (SELECT {_slug_of("w")} FROM watchers w WHERE w.id = t.watcher_id),
                   'attribute_values', v.attribute_values, 'fallback_value', v.fallback_value,
                   'extraction_config', v.extraction_config) AS content
        FROM event_classifiers t
        LEFT JOIN event_classifier_versions v
            ON v.id = t.current_version_id AND v.classifier_id = t.id""",
    "watchers": """
        SELECT 'watchers', t.id, t.organization_id, t.slug, t.status,
               t.managed_by_template_agent_id, t.mirrored_hash,
               jsonb_build_object(
                   'slug', t.slug, 'name', t.name, 'description', t.description,
                   'schedule', t.schedule, 'prompt', v.prompt,
                   'extraction_schema', v.extraction_schema, 'sources_schema', v.sources_schema,
                   'reactions_guidance', v.reactions_guidance) AS content
        FROM watchers t
        LEFT JOIN watcher_versions v ON v.id = t.current_version_id AND v.watcher_id = t.id""",
}


# Every row of one org (`:org`), each with its content rebuilt.
ORG_ITEMS = "\nUNION ALL\n".join(
    f"({sql}\n        WHERE t.organization_id = CAST(:org AS uuid))"
    for sql in ITEM_CONTENT.values()
)


# (kind, slug, item, hash) of every item of release `:release`.
RELEASE_ITEMS = """
        SELECT i.kind, i.slug, i.item, i.content_hash AS hash
        FROM template_release_items i WHERE i.release_id = CAST(:release AS uuid)"""


def _content_of(kind_column: str, id_column: str) -> str:
    """The content of the org row `id_column` of kind `kind_column`, rebuilt on demand."""
    branches = "\n".join(
        f"            WHEN '{kind}' THEN (SELECT x.content FROM ({sql}) x WHERE x.id = {id_column})"
        for kind, sql in ITEM_CONTENT.items()
    )
    return f"CASE {kind_column}\n{branches}\n        END"


_ORG_ROWS = "\n    UNION ALL".join(
    f"""
    SELECT '{kind}' AS kind, id, slug, status, managed_by_template_agent_id AS managed_by,
           mirrored_hash
    FROM {table} WHERE organization_id = CAST(:org AS uuid)"""
    for kind, table in TABLES.items()
)

# Managed rows are compared by hash only: `mirrored_hash` says what was written, so a row's
# content is rebuilt (to tell a local edit) only where the release changes or revives it, and
# for every row when publishing (no provenance to go by).
PLAN_SQL = f"""
WITH new AS ({RELEASE_ITEMS}),
org AS ({_ORG_ROWS}),
joined AS MATERIALIZED (
    SELECT coalesce(n.kind, o.kind) AS kind, coalesce(n.slug, o.slug) AS slug,
           n.hash AS new_hash, o.id, o.status, o.managed_by, o.mirrored_hash,
           CASE WHEN n.hash IS NOT NULL
                     AND (NOT :mirrored OR n.hash IS DISTINCT FROM o.mirrored_hash
                          OR o.status = 'archived')
                THEN install_content_hash({_content_of("o.kind", "o.id")})
           END AS cur_hash,
           EXISTS (SELECT 1 FROM template_release_items p
                   WHERE p.release_id = CAST(:prev_release AS uuid)
                     AND p.kind = coalesce(n.kind, o.kind)
                     AND p.slug = coalesce(n.slug, o.slug)) AS in_prev
    FROM new n
    FULL JOIN org o ON o.kind = n.kind AND o.slug = n.slug
    WHERE n.slug IS NOT NULL
       OR (o.managed_by IS NOT DISTINCT FROM CAST(:owner AS uuid) AND o.status = 'active'
           AND o.slug NOT LIKE '$%')
),
flags AS (
    SELECT j.*,
           j.new_hash IS NOT NULL AND j.id IS NOT NULL
               AND j.managed_by IS NOT DISTINCT FROM CAST(:owner AS uuid) AS ours,
           -- archived by the org itself (not by a release that dropped it, nor by uninstall)
           j.status = 'archived' AND j.in_prev AND :install_active AS archived_locally
    FROM joined j
),
decided AS (
    SELECT f.*,
           -- edited since mirrored (an edit that already equals the new release is not);
           -- only ever read where the release changes or revives the row
           CASE WHEN :mirrored THEN (f.cur_hash IS DISTINCT FROM f.mirrored_hash
                                     AND f.cur_hash IS DISTINCT FROM f.new_hash)
                                    OR f.archived_locally
                ELSE false END AS edited,
           CASE WHEN :mirrored THEN f.new_hash IS DISTINCT FROM f.mirrored_hash
                ELSE f.new_hash IS DISTINCT FROM f.cur_hash END AS changes,
           f.status = 'archived' AND NOT f.archived_locally AS reactivates
    FROM flags f
)
SELECT kind, slug,
       CASE
           WHEN new_hash IS NULL THEN 'archive'
           WHEN id IS NULL THEN 'create'
           WHEN NOT ours THEN 'conflict'
           WHEN (changes OR reactivates) AND edited AND NOT :force THEN 'conflict'
           WHEN changes OR reactivates THEN 'update'
           ELSE 'unchanged'
       END AS action,
       CASE
           WHEN new_hash IS NULL OR id IS NULL THEN NULL
           WHEN NOT ours AND managed_by IS NULL THEN 'user_authored'
           WHEN NOT ours THEN 'managed_by_other_template'
           WHEN (changes OR reactivates) AND edited AND NOT :force THEN 'locally_modified'
           WHEN (changes OR reactivates) AND edited THEN 'forced'
           WHEN reactivates AND NOT changes THEN 'reactivated'
       END AS reason
FROM decided
ORDER BY array_position(ARRAY['entity_types', 'relationship_types', 'classifiers', 'watchers'],
                        kind), slug COLLATE "C"
"""

_PROVENANCE_COLUMNS = (
    "managed_by_template_agent_id, source_template_org_id, source_row_id, "
    "mirrored_release_id, mirrored_at, mirrored_hash"
)


def _provenance_values(table: str) -> str:
    return f"""CAST(:owner AS uuid), CAST(:source_org AS uuid),
        (SELECT s.id FROM {table} s WHERE s.organization_id = CAST(:source_org AS uuid)
                                      AND s.slug = i.slug),
        CASE WHEN :mirrored THEN CAST(:release AS uuid) END,
        CASE WHEN :mirrored THEN now() END,
        CASE WHEN :mirrored THEN i.content_hash END"""


def _ref(kind: str, slug: str) -> str:
    """The id of this org's row of `kind` with slug `slug`, written by this statement or not:
    a key look-up in one jsonb map, whatever plan the statement gets."""
    return f"(SELECT CAST(ids.map ->> ('{kind}:' || ({slug})) AS uuid) FROM ids)"


def _upsert(kind: str, columns: str, values: str, joins: str = "") -> str:
    """Write the planned items of one kind under their planned ids, updating rows this owner
    already has (never another's: such a row makes the count short, or a reference dangle)."""
    table = TABLES[kind]
    names = [c.strip() for c in (columns + ", status, " + _PROVENANCE_COLUMNS).split(",")]
    updates = ",\n        ".join(
        f"{c} = coalesce(excluded.{c}, t.{c})"
        if c == "current_version_id"
        else f"{c} = excluded.{c}"
        for c in names
        if c != "slug"
    )
    return f"""{kind}_written AS (
    INSERT INTO {table} AS t (id, organization_id, {columns}, status, {_PROVENANCE_COLUMNS})
    SELECT i.id, CAST(:org AS uuid), {values}, 'active', {_provenance_values(table)}
    FROM targets i {joins}
    WHERE i.kind = '{kind}'
    ON CONFLICT (organization_id, slug) DO UPDATE SET
        {updates},
        updated_at = now()
    WHERE t.managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
    RETURNING t.id, t.slug)"""


def _versions(kind: str, versions: str, owner: str, fields: dict[str, str]) -> tuple[str, str]:
    """Which written items need a new version (their versioned `fields` differ from the row's
    current version, or there is none), and the append of those versions. Old versions are
    never touched (the database refuses)."""
    table = TABLES[kind]
    new = ", ".join(f"i.item{expr}" for expr in fields.values())
    current = ", ".join(f"v.{name}" for name in fields)
    needed = f"""{kind}_versions AS MATERIALIZED (
    SELECT i.id AS row_id, i.item, gen_random_uuid() AS version_id,
           coalesce((SELECT max(x.version) FROM {versions} x WHERE x.{owner} = i.id), 0) + 1
               AS version
    FROM targets i
    LEFT JOIN {table} t ON t.id = i.id
    LEFT JOIN {versions} v ON v.id = t.current_version_id
    WHERE i.kind = '{kind}'
      AND NOT (v.id IS NOT NULL AND ROW({current}) IS NOT DISTINCT FROM ROW({new})))"""
    names = ", ".join(fields)
    values = ", ".join(f"n.item{expr}" for expr in fields.values())
    extra = ", name, change_notes" if kind == "watchers" else ""
    extra_values = ", n.item->>'name', CAST(:change_notes AS text)" if extra else ""
    appended = f"""{kind}_versions_appended AS (
    INSERT INTO {versions} (id, organization_id, {owner}, version, {names}{extra})
    SELECT n.version_id, CAST(:org AS uuid), n.row_id, n.version, {values}{extra_values}
    FROM {kind}_versions n JOIN {kind}_written w ON w.id = n.row_id)"""
    return needed, appended


def _new_version(kind: str) -> str:
    """Join `n` to the item's new version, if it needs one."""
    return f"LEFT JOIN {kind}_versions n ON n.row_id = i.id"


_WATCHER_VERSIONS = _versions(
    "watchers",
    "watcher_versions",
    "watcher_id",
    {
        "prompt": "->>'prompt'",
        "extraction_schema": "->'extraction_schema'",
        "sources_schema": "->'sources_schema'",
        "reactions_guidance": "->>'reactions_guidance'",
    },
)
_CLASSIFIER_VERSIONS = _versions(
    "classifiers",
    "event_classifier_versions",
    "classifier_id",
    {
        "attribute_values": "->'attribute_values'",
        "fallback_value": "->>'fallback_value'",
        "extraction_config": "->'extraction_config'",
    },
)


def _archive_ctes(*, every_owned_row: bool) -> list[str]:
    """Archive the owner's active rows: the listed slugs per kind (`:archive_<kind>`), or all
    of them (uninstall); each CTE returns one row per archived row."""
    only_listed = "" if every_owned_row else "AND slug = ANY(CAST(:archive_{kind} AS text[]))"
    return [
        f"""archived_{kind} AS (
    UPDATE {table} SET status = 'archived', updated_at = now()
    WHERE organization_id = CAST(:org AS uuid) AND status = 'active'
      AND managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
      AND slug NOT LIKE '$%'
      {only_listed.format(kind=kind)}
    RETURNING slug)"""
        for kind, table in TABLES.items()
    ]


_UPSERTS = ",\n".join(
    [
        _upsert(
            "entity_types",
            "slug, name, description, icon, color, metadata_schema, event_kinds",
            """i.slug, i.item->>'name', i.item->>'description', i.item->>'icon',
        i.item->>'color', i.item->'metadata_schema', i.item->'event_kinds'""",
        ),
        _upsert(
            "watchers",
            "slug, name, description, schedule, agent_id, current_version_id",
            """i.slug, i.item->>'name', i.item->>'description', i.item->>'schedule',
        CAST(:agent AS uuid), n.version_id""",
            joins=_new_version("watchers"),
        ),
        _upsert(
            "relationship_types",
            "slug, name, description, metadata_schema, is_symmetric, inverse_type_id",
            f"""i.slug, i.item->>'name', i.item->>'description', i.item->'metadata_schema',
        (i.item->>'is_symmetric')::boolean, {_ref("relationship_types", "i.item->>'inverse'")}""",
        ),
        _upsert(
            "classifiers",
            "slug, name, description, attribute_key, entity_type_id, watcher_id, "
            "current_version_id",
            f"""i.slug, i.item->>'name', i.item->>'description', i.item->>'attribute_key',
        {_ref("entity_types", "i.item->>'entity_type'")},
        {_ref("watchers", "i.item->>'watcher'")}, n.version_id""",
            joins=_new_version("classifiers"),
        ),
    ]
)
_ARCHIVE_LISTED = ",\n".join(_archive_ctes(every_owned_row=False))
_WRITTEN = "\nUNION ALL\n".join(
    f"SELECT '{kind}' AS kind, slug FROM {kind}_written" for kind in KINDS
)

# The whole plan written by ONE statement. Every planned item gets its id up front (its
# existing row's, or a new one) and every reference is resolved by slug through `ids`, so
# nothing waits for an earlier statement to see a row; foreign keys are checked at its end.
# Returns the written (kind, slug) pairs: fewer than planned means a row changed under it.
APPLY_SQL = f"""
WITH org AS ({_ORG_ROWS}),
targets AS MATERIALIZED (
    SELECT i.kind, i.slug, i.item, i.content_hash, coalesce(o.id, gen_random_uuid()) AS id,
           o.id IS NULL AS is_new
    FROM template_release_items i
    LEFT JOIN org o ON o.kind = i.kind AND o.slug = i.slug
    WHERE i.release_id = CAST(:release AS uuid)
      AND i.slug = ANY(CASE i.kind
          WHEN 'entity_types' THEN CAST(:entity_types AS text[])
          WHEN 'relationship_types' THEN CAST(:relationship_types AS text[])
          WHEN 'classifiers' THEN CAST(:classifiers AS text[])
          WHEN 'watchers' THEN CAST(:watchers AS text[]) END)),
ids AS MATERIALIZED (
    SELECT jsonb_object_agg(r.kind || ':' || r.slug, r.id) AS map FROM (
        SELECT kind, slug, id FROM org
        UNION ALL
        SELECT kind, slug, id FROM targets WHERE is_new) r),
{_WATCHER_VERSIONS[0]},
{_CLASSIFIER_VERSIONS[0]},
{_UPSERTS},
{_WATCHER_VERSIONS[1]},
{_CLASSIFIER_VERSIONS[1]},
-- Rules of the written relationship types: exactly the release's, re-pointed by slug.
rules_wanted AS (
    SELECT * FROM (
        SELECT i.id AS rt, {_ref("entity_types", "rule.r->>'source'")} AS src,
               {_ref("entity_types", "rule.r->>'target'")} AS tgt
        FROM targets i CROSS JOIN LATERAL jsonb_array_elements(i.item->'rules') AS rule(r)
        WHERE i.kind = 'relationship_types') wanted
    WHERE src IS NOT NULL AND tgt IS NOT NULL),
rules_stale AS (
    DELETE FROM entity_relationship_type_rules x
    USING targets i
    WHERE i.kind = 'relationship_types' AND x.relationship_type_id = i.id
      AND NOT EXISTS (SELECT 1 FROM rules_wanted w WHERE w.rt = x.relationship_type_id
                      AND w.src = x.source_entity_type_id AND w.tgt = x.target_entity_type_id)
    RETURNING 1),
rules_written AS (
    INSERT INTO entity_relationship_type_rules
        (organization_id, relationship_type_id, source_entity_type_id, target_entity_type_id)
    SELECT CAST(:org AS uuid), rt, src, tgt FROM rules_wanted
    ON CONFLICT DO NOTHING
    RETURNING 1),
{_ARCHIVE_LISTED}
{_WRITTEN}
"""


# Archive every active row the owner manages in the org (uninstall); their slugs per kind.
UNINSTALL_SQL = (
    "WITH "
    + ",\n".join(_archive_ctes(every_owned_row=True))
    + "\nSELECT "
    + ", ".join(
        f"(SELECT coalesce(array_agg(slug ORDER BY slug COLLATE \"C\"), '{{}}') "
        f"FROM archived_{kind}) AS {kind}"
        for kind in TABLES
    )
)

# Row locks on everything the owner manages in the org (rules included), taken after the
# install's own lock and before the plan that is applied: a user's edit either committed
# before (and the plan sees it) or waits until the install commits. Never lost.
LOCK_SQL = (
    "WITH "
    + ",\n".join(
        f"""locked_{kind} AS (
    SELECT 1 FROM {table}
    WHERE organization_id = CAST(:org AS uuid)
      AND managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
    FOR UPDATE)"""
        for kind, table in TABLES.items()
    )
    + """,
locked_rules AS (
    SELECT 1 FROM entity_relationship_type_rules r
    JOIN entity_relationship_types t ON t.id = r.relationship_type_id
    WHERE t.organization_id = CAST(:org AS uuid)
      AND t.managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
    FOR UPDATE OF r)
SELECT """
    + " + ".join(f"(SELECT count(*) FROM locked_{k})" for k in (*TABLES, "rules"))
)

# Managed rows of an install that no longer equal what was mirrored, or are gone or archived.
DRIFT_SQL = f"""
WITH installed AS ({RELEASE_ITEMS}),
org AS ({ORG_ITEMS})
SELECT i.kind, i.slug, o.id,
       CASE WHEN o.id IS NULL THEN 'deleted'
            WHEN o.status = 'archived' THEN 'archived'
            ELSE 'modified' END AS drift
FROM installed i
LEFT JOIN org o ON o.kind = i.kind AND o.slug = i.slug
               AND o.managed_by = CAST(:owner AS uuid)
WHERE o.id IS NULL OR o.status = 'archived'
   OR install_content_hash(o.content) IS DISTINCT FROM o.mirrored_hash
ORDER BY array_position(ARRAY['entity_types', 'relationship_types', 'classifiers', 'watchers'],
                        i.kind), i.slug COLLATE "C"
"""

# Written rows that do not equal their snapshot item after apply: must be none.
VERIFY_SQL = f"""
WITH new AS MATERIALIZED (
    SELECT i.kind, i.slug, i.content_hash AS hash
    FROM unnest(CAST(:written_kinds AS text[]), CAST(:written_slugs AS text[])) AS w(kind, slug)
    JOIN template_release_items i
        ON i.release_id = CAST(:release AS uuid) AND i.kind = w.kind AND i.slug = w.slug),
org AS ({_ORG_ROWS})
SELECT n.kind, n.slug
FROM new n LEFT JOIN org o ON o.kind = n.kind AND o.slug = n.slug
WHERE o.id IS NULL OR o.status <> 'active' OR o.managed_by IS DISTINCT FROM CAST(:owner AS uuid)
   OR install_content_hash({_content_of("o.kind", "o.id")}) <> n.hash
"""


class ConcurrentChange(Conflict):
    """Rows changed under the install; nothing was written and retrying is safe."""

    code = "concurrent_change"

    def __init__(self, kind: str, slugs: list[str]) -> None:
        super().__init__(
            f"the organization's {kind} changed while installing ({', '.join(slugs)}); "
            "nothing was written, retry",
            slugs=slugs,
        )


class PlanItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    kind: str
    slug: str
    action: str
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where a release is applied and under whose name."""

    organization_id: uuid.UUID
    release_id: uuid.UUID
    # The template agent managing the rows (installs), or None (publish into the template org).
    owner: uuid.UUID | None
    # The agent watchers belong to: the install, or the template agent itself.
    agent_id: uuid.UUID | None
    source_org_id: uuid.UUID | None = None
    previous_release_id: uuid.UUID | None = None
    install_active: bool = False
    change_notes: str | None = None

    @property
    def mirrored(self) -> bool:
        return self.owner is not None


@dataclass(kw_only=True)
class Plan:
    items: list[PlanItem]
    conflicts: list[PlanItem] = field(init=False)

    def __post_init__(self) -> None:
        self.conflicts = [item for item in self.items if item.action == "conflict"]

    def slugs(self, kind: str, *actions: str) -> list[str]:
        return [i.slug for i in self.items if i.kind == kind and i.action in actions]

    @property
    def writes(self) -> bool:
        return any(item.action in ("create", "update", "archive") for item in self.items)

    def changes(self) -> dict[str, dict[str, int]]:
        """Counts per kind and action, in the shape of the API's `changes`."""
        counts = Counter((i.kind, i.action) for i in self.items)
        names = {"create": "created", "update": "updated", "unchanged": "unchanged"}
        names["archive"] = "archived"
        return {
            kind: {label: counts[(kind, action)] for action, label in names.items()}
            for kind in KINDS
        }

    def raise_conflicts(self) -> None:
        if self.conflicts:
            raise InstallConflict(
                [{"kind": c.kind, "slug": c.slug, "reason": c.reason or ""} for c in self.conflicts]
            )


# One statement object per SQL string: SQLAlchemy then parses and keys each only once.
_statement = functools.cache(text)


def _params(target: Target, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "org": target.organization_id,
        "release": target.release_id,
        "owner": target.owner,
        "mirrored": target.mirrored,
    }
    params.update(extra)
    return params


async def lock(session: AsyncSession, target: Target) -> None:
    """Lock every row the owner manages in the org until the transaction ends."""
    await session.execute(_statement(LOCK_SQL), _params(target))


async def archive_all(session: AsyncSession, target: Target) -> dict[str, list[str]]:
    """Archive every active row the owner manages in the org (uninstall); the archived slugs
    per kind."""
    row = (await session.execute(_statement(UNINSTALL_SQL), _params(target))).one()
    return dict(row._mapping)


async def drift(session: AsyncSession, target: Target) -> list[dict[str, Any]]:
    """Rows of the installed release edited, archived or deleted in the org since mirrored."""
    rows = await session.execute(_statement(DRIFT_SQL), _params(target))
    return [dict(r._mapping) for r in rows]


async def plan(session: AsyncSession, target: Target, *, force: bool = False) -> Plan:
    """Compare the release with the org's rows; one read-only statement."""
    rows = await session.execute(
        _statement(PLAN_SQL),
        _params(
            target,
            prev_release=target.previous_release_id,
            install_active=target.install_active,
            force=force,
        ),
    )
    return Plan(
        items=[PlanItem(kind=r.kind, slug=r.slug, action=r.action, reason=r.reason) for r in rows]
    )


async def apply(session: AsyncSession, target: Target, planned: Plan) -> None:
    """Write the plan with one statement, whatever the number of rows, then verify it."""
    planned.raise_conflicts()
    slugs = {kind: planned.slugs(kind, "create", "update") for kind in KINDS}
    archive = {f"archive_{kind}": planned.slugs(kind, "archive") for kind in KINDS}
    params = _params(
        target,
        source_org=target.source_org_id,
        agent=target.agent_id,
        change_notes=target.change_notes,
        **slugs,
        **archive,
    )
    try:
        rows = await session.execute(_statement(APPLY_SQL), params)
        written = {(row.kind, row.slug) for row in rows}
    except IntegrityError as exc:
        # Rows created, claimed or renamed by someone else since the plan: a reference to a
        # planned row cannot resolve, or a planned id is taken. Nothing was written.
        if getattr(exc.orig, "sqlstate", None) not in CHANGED_UNDER_APPLY:
            raise
        cause = getattr(exc.orig, "__cause__", None)
        where = getattr(cause, "constraint_name", None) or getattr(cause, "table_name", None)
        raise ConcurrentChange("items", [str(where or "rows")]) from exc
    missing = sorted(
        f"{kind}:{slug}" for kind in KINDS for slug in slugs[kind] if (kind, slug) not in written
    )
    if missing:
        # A row with one of these slugs appeared in the org after the plan was made.
        raise ConcurrentChange("items", missing)
    await verify(session, target, planned)


async def verify(session: AsyncSession, target: Target, planned: Plan) -> None:
    """Check in the database that every written row now equals its snapshot item.

    This is what makes a dropped reference (a rule, an inverse, a classifier's watcher) an
    error that rolls the install back instead of a silent loss.
    """
    written = [i for i in planned.items if i.action in ("create", "update")]
    if written:
        broken = (
            await session.execute(
                _statement(VERIFY_SQL),
                _params(
                    target,
                    written_kinds=[i.kind for i in written],
                    written_slugs=[i.slug for i in written],
                ),
            )
        ).all()
        if broken:
            # Something outside this transaction changed rows the install relies on (say, a
            # rule added to a managed relationship type): roll back rather than half-apply.
            raise ConcurrentChange("items", [f"{r.kind}:{r.slug}" for r in broken])
