"""The one engine that makes an organization's schema rows equal a release, keeping the org's
own changes where the release lets it.

Publishing applies a document to its template org (rows authored there, no provenance); an
install applies a release to a target org (rows managed by the template, with provenance). Both
are the same steps:

- `plan`: one read-only statement compares the release with the org's rows by slug and says,
  per item, `create`, `update`, `unchanged`, `archive`, `adopt`, `detached` or `conflict` (with
  a reason and, per path, what happens). A managed row the org edited is merged with the
  release field by field (`install_merge`, created by migration 0005: the base is the release
  item the row was last mirrored from, the local value the row now, the new value the
  release's item, each top-level field under its policy). Only rows that need it are merged.
- `apply`: one statement writes exactly the planned rows under ids chosen up front, re-points
  every reference at the org's own rows by slug, appends watcher and classifier versions whose
  content changed and archives what the release dropped; a second verifies in the database
  that every written row now equals what the plan said it would be (the release item, or the
  merge result), references included.

Releases are read item by item from `template_release_items`, which the database fills from
each release's snapshot (content hashes and effective field policies included).

A row's *content* is rebuilt in SQL in exactly the shape of its release item (`ITEM_CONTENT`),
so `install_content_hash(content)` of a row and of its item agree when, and only when, the row
equals the item: `mirrored_hash` records the hash of the item a row was last mirrored from
(the merge's base), and drift and merges compare with it.

Nothing here commits, authorizes or records history; the callers do that around it.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.db.session import statement
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
# Plan actions that write rows.
WRITES = ("create", "update", "adopt", "archive", "rebase")
# The counts of a result's `changes`, per kind, and the plan actions each counts.
CHANGE_LABELS = {
    "created": ("create",),
    "updated": ("update",),
    "unchanged": ("unchanged", "rebase"),
    "archived": ("archive",),
    "adopted": ("adopt",),
    "detached": ("detached",),
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

KIND_ORDER = (
    "array_position(ARRAY['entity_types', 'relationship_types', 'classifiers', 'watchers'], {})"
)


def _content_of(kind_column: str, id_column: str) -> str:
    """The content of the org row `id_column` of kind `kind_column`, rebuilt on demand."""
    branches = "\n".join(
        f"            WHEN '{kind}' THEN (SELECT x.content FROM ({sql}) x WHERE x.id = {id_column})"
        for kind, sql in ITEM_CONTENT.items()
    )
    return f"CASE {kind_column}\n{branches}\n        END"


def _org_rows(where: str = "organization_id = CAST(:org AS uuid)") -> str:
    """Every row of every kind in the orgs `where` selects, with provenance, unioned."""
    return "\n    UNION ALL".join(
        f"""
    SELECT '{kind}' AS kind, organization_id, id, slug, status,
           managed_by_template_agent_id AS managed_by, mirrored_hash, mirrored_release_id,
           detached_from_template_agent_ids AS detached_from
    FROM {table} WHERE {where}"""
        for kind, table in TABLES.items()
    )


_ORG_ROWS = _org_rows()


# Plans the release against the org's rows. Managed rows are compared by hash first: the row's
# content is rebuilt only where the release changes, revives or enforces it, where a row is to
# be adopted or reconciled, and for every row when publishing (no provenance to go by); the
# merge runs only for rows the org edited among those. The release's items are read where a
# row's content is rebuilt, not carried along every row: a fleet plan pairs every org with
# every item.
#
# `:changed_only` (the fleet plan) leaves out, before anything is rebuilt, the rows that can
# only be `unchanged`: active rows this owner manages whose release item is the one they
# mirror, with no `template` field to enforce and no reconcile. For those every later step
# decides `unchanged` without reading their content, so the plan of every other row, and
# whether the org writes or conflicts, is the same; what it saves is carrying each such pair
# through every step (nearly all of them, for a release that changes a few items).
def _plan_body(org_rows: str) -> str:
    """The plan's common table expressions up to `planned`, over the org rows `org_rows`."""
    return f"""
WITH scope AS MATERIALIZED (
    SELECT s.org, s.prev_release, s.install_active
    FROM unnest(CAST(:orgs AS uuid[]), CAST(:prev_releases AS uuid[]),
                CAST(:installs_active AS boolean[])) AS s(org, prev_release, install_active)),
new AS (
    SELECT i.kind, i.slug, i.content_hash AS hash, i.policies,
           EXISTS (SELECT 1 FROM jsonb_each_text(i.policies) p WHERE p.value = 'template')
               AS enforces
    FROM template_release_items i WHERE i.release_id = CAST(:release AS uuid)),
org AS ({org_rows}),
paired AS (
    SELECT coalesce(s.org, o.organization_id) AS org,
           coalesce(n.kind, o.kind) AS kind, coalesce(n.slug, o.slug) AS slug,
           n.hash AS new_hash, n.policies, n.enforces,
           o.id, o.status, o.managed_by, o.mirrored_hash, o.mirrored_release_id,
           o.detached_from
    FROM (scope s CROSS JOIN new n)
    FULL JOIN org o ON o.organization_id = s.org AND o.kind = n.kind AND o.slug = n.slug
    WHERE (n.slug IS NOT NULL
           OR (o.managed_by IS NOT DISTINCT FROM CAST(:owner AS uuid) AND o.status = 'active'
               AND o.slug NOT LIKE '$%'))
      AND NOT coalesce(
          :changed_only AND :mirrored AND NOT :reconcile AND o.status = 'active'
          AND o.managed_by = CAST(:owner AS uuid) AND n.hash = o.mirrored_hash
          AND NOT (n.enforces AND s.prev_release IS DISTINCT FROM CAST(:release AS uuid)),
          false)
),
joined AS MATERIALIZED (
    SELECT p.*, sc.install_active,
           :mirrored AND sc.prev_release IS DISTINCT FROM CAST(:release AS uuid)
               AS enforce_template,
           EXISTS (SELECT 1 FROM template_release_items x
                   WHERE x.release_id = sc.prev_release
                     AND x.kind = p.kind AND x.slug = p.slug) AS in_prev
    FROM paired p JOIN scope sc ON sc.org = p.org
),
flags AS (
    SELECT j.*,
           j.new_hash IS NOT NULL AND j.id IS NOT NULL
               AND j.managed_by IS NOT DISTINCT FROM CAST(:owner AS uuid) AS ours,
           :mirrored AND j.id IS NOT NULL AND j.managed_by IS NULL
               AND (:adopt_all OR j.kind || ':' || j.slug = ANY(CAST(:adopt AS text[])))
               AS adopting,
           -- the org took the row over from this template (whoever manages it now, unless
           -- this template asks for it back); another template's detachment is not ours
           :mirrored AND CAST(:owner AS uuid) = ANY(j.detached_from)
               AND j.managed_by IS DISTINCT FROM CAST(:owner AS uuid)
               AND NOT (j.managed_by IS NOT NULL
                        AND j.kind || ':' || j.slug = ANY(CAST(:adopt AS text[])))
               AS detached,
           -- archived by the org itself (not by a release that dropped it, nor by uninstall)
           j.status = 'archived' AND j.in_prev AND j.install_active AS archived_locally,
           CAST(:resolutions AS jsonb) -> (j.kind || ':' || j.slug) AS resolutions,
           coalesce(CAST(:resolutions AS jsonb) -> (j.kind || ':' || j.slug) ->> '', '')
               AS whole_take,
           :mirrored AND j.new_hash IS DISTINCT FROM j.mirrored_hash AS release_changes
    FROM joined j
),
content AS MATERIALIZED (
    SELECT f.*,
           CASE WHEN f.new_hash IS NOT NULL AND f.id IS NOT NULL AND (
                    NOT :mirrored OR f.adopting
                    OR (f.ours AND (f.release_changes OR f.status = 'archived' OR :reconcile
                                    OR (f.enforce_template AND f.enforces))))
                THEN {_content_of("f.kind", "f.id")}
           END AS cur
    FROM flags f
),
-- MATERIALIZED: each row's hash is compared at several steps below; inlined, each hashed again.
hashed AS MATERIALIZED (
    SELECT c.*, install_content_hash(c.cur) AS cur_hash, n.item AS new_item,
           CASE WHEN c.cur IS NULL OR NOT c.ours THEN NULL
                WHEN :reconcile THEN n.item
                ELSE (SELECT b.item FROM template_release_items b
                      WHERE b.release_id = c.mirrored_release_id
                        AND b.kind = c.kind AND b.slug = c.slug)
           END AS base
    FROM content c
    LEFT JOIN template_release_items n
        ON c.cur IS NOT NULL AND n.release_id = CAST(:release AS uuid)
           AND n.kind = c.kind AND n.slug = c.slug
),
-- MATERIALIZED: the merge is read at many places below; inlined, each would call it again.
merged AS MATERIALIZED (
    SELECT h.*,
           CASE WHEN h.adopting AND NOT h.ours OR (
                    :mirrored AND h.ours AND h.cur IS NOT NULL
                    AND h.cur_hash IS DISTINCT FROM h.mirrored_hash
                    AND h.cur_hash IS DISTINCT FROM h.new_hash)
                THEN install_merge(
                    CASE WHEN h.ours THEN h.base END, h.cur, h.new_item,
                    CASE WHEN :reconcile THEN (
                             SELECT jsonb_object_agg(k, CASE WHEN h.policies ->> k = 'tenant'
                                                             THEN 'tenant' ELSE 'template' END)
                             FROM jsonb_object_keys(h.new_item) k)
                         ELSE h.policies END,
                    h.resolutions, CASE WHEN :force THEN 'template' END)
           END AS merge
    FROM hashed h
),
decided AS (
    SELECT m.*,
           CASE
               WHEN m.new_hash IS NULL THEN 'archive'
               WHEN m.id IS NULL THEN 'create'
               WHEN m.adopting AND NOT m.ours THEN 'adopt'
               WHEN m.detached THEN 'detached'
               WHEN NOT m.ours THEN 'conflict'
               WHEN NOT :mirrored THEN
                   CASE WHEN m.cur_hash IS DISTINCT FROM m.new_hash OR m.status = 'archived'
                        THEN 'update' ELSE 'unchanged' END
               WHEN m.archived_locally AND NOT (m.release_changes OR :reconcile) THEN 'unchanged'
               WHEN m.archived_locally AND m.whole_take = 'local' THEN 'rebase'
               WHEN m.archived_locally
                    AND NOT (:force OR :reconcile OR m.whole_take = 'template')
                   THEN 'conflict'
               WHEN jsonb_array_length(m.merge -> 'conflicts') > 0 THEN 'conflict'
               WHEN m.merge IS NOT NULL AND m.status = 'active'
                    AND install_content_hash(m.merge -> 'item') = m.cur_hash
                   THEN CASE WHEN m.release_changes THEN 'rebase' ELSE 'unchanged' END
               WHEN m.merge IS NOT NULL OR m.release_changes OR m.status = 'archived'
                   THEN 'update'
               ELSE 'unchanged'
           END AS action
    FROM merged m
),
planned AS (
SELECT org, kind, slug, action,
       CASE
           WHEN action = 'conflict' AND NOT ours AND managed_by IS NULL THEN 'user_authored'
           WHEN action = 'conflict' AND NOT ours THEN 'managed_by_other_template'
           WHEN action = 'conflict' THEN 'locally_modified'
           WHEN action IN ('update', 'rebase') AND (
                    :force AND (archived_locally OR EXISTS (
                        SELECT 1 FROM jsonb_array_elements(merge -> 'fields') x
                        WHERE x ? 'forced')))
               THEN 'forced'
           WHEN action = 'update' AND status = 'archived' AND merge IS NULL
                AND NOT release_changes THEN 'reactivated'
       END AS reason,
       CASE
           WHEN action = 'conflict' AND ours AND (archived_locally OR merge IS NULL)
               THEN '[{{"path": "", "outcome": "conflict"}}]'::jsonb
           WHEN merge IS NOT NULL AND action <> 'unchanged' THEN merge -> 'fields'
           WHEN action = 'update' AND ours AND base IS NOT NULL
               THEN (SELECT coalesce(jsonb_agg(jsonb_build_object('path', d.path,
                                                                  'outcome', 'merged')
                                               ORDER BY d.path COLLATE "C"), '[]'::jsonb)
                     FROM install_diff(base, new_item) d)
       END AS fields,
       CASE WHEN action IN ('update', 'adopt') AND merge IS NOT NULL THEN merge -> 'item' END
           AS item,
       CASE WHEN action = 'adopt' THEN cur END AS previous
FROM decided)"""


# One org's plan finds its rows by an equality on the org: the index, whatever a generic plan
# knows of the tables. Joined to the scope instead, a generic plan read every org's
# relationship types, classifiers and watchers (5.9 ms per plan at 300 orgs, against 2.3);
# matched by `= ANY` its orgs, one made while the statistics were stale did (28.6 ms per
# plan in a worker at 1,000 orgs).
PLAN_SQL = f"""{_plan_body(_org_rows("organization_id = (CAST(:orgs AS uuid[]))[1]"))}
SELECT kind, slug, action, reason, fields, item, previous
FROM planned
ORDER BY {KIND_ORDER.format("kind")}, slug COLLATE "C"
"""

# The same plan for many installs of one template at once (the fleet dry run), summed up
# per org: whether it would write, whether it conflicts, and every conflict.
FLEET_PLAN_SQL = f"""{_plan_body(_org_rows("organization_id IN (SELECT org FROM scope)"))}
SELECT org,
       bool_or(action IN {WRITES}) AS writes,
       coalesce(jsonb_agg(jsonb_build_object(
                    'kind', kind, 'slug', slug, 'reason', reason,
                    'fields', (SELECT coalesce(jsonb_agg(f -> 'path'), '[]'::jsonb)
                               FROM jsonb_array_elements(fields) f
                               WHERE f ->> 'outcome' = 'conflict'))
                    ORDER BY {KIND_ORDER.format("kind")}, slug COLLATE "C")
                FILTER (WHERE action = 'conflict'), '[]'::jsonb) AS conflicts
FROM planned GROUP BY org
"""

_PROVENANCE_COLUMNS = (
    "managed_by_template_agent_id, source_template_org_id, source_row_id, "
    "mirrored_release_id, mirrored_at, mirrored_hash, detached_from_template_agent_ids"
)


def _provenance_values(table: str) -> str:
    return f"""CAST(:owner AS uuid), CAST(:source_org AS uuid),
        (SELECT s.id FROM {table} s WHERE s.organization_id = CAST(:source_org AS uuid)
                                      AND s.slug = i.slug),
        CASE WHEN :mirrored THEN CAST(:release AS uuid) END,
        CASE WHEN :mirrored THEN now() END,
        CASE WHEN :mirrored THEN i.content_hash END,
        ARRAY[]::uuid[]"""


def _ref(kind: str, slug: str) -> str:
    """The id of this org's row of `kind` with slug `slug`, written by this statement or not:
    a key look-up in one jsonb map, whatever plan the statement gets."""
    return f"(SELECT CAST(ids.map ->> ('{kind}:' || ({slug})) AS uuid) FROM ids)"


def _upsert(kind: str, columns: str, values: str, joins: str = "") -> str:
    """Write the planned items of one kind under their planned ids, updating rows this owner
    already has and rows it adopts (never another's: such a row makes the count short, or a
    reference dangle)."""
    table = TABLES[kind]
    names = [c.strip() for c in (columns + ", status, " + _PROVENANCE_COLUMNS).split(",")]
    # Writing a row ends this template's detachment of it, never another template's.
    special = {
        "current_version_id": "coalesce(excluded.current_version_id, t.current_version_id)",
        "detached_from_template_agent_ids": (
            "array_remove(t.detached_from_template_agent_ids, CAST(:owner AS uuid))"
        ),
    }
    updates = ",\n        ".join(
        f"{c} = {special.get(c, f'excluded.{c}')}" for c in names if c != "slug"
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
       OR (t.managed_by_template_agent_id IS NULL
           AND t.slug = ANY(CAST(:adopt_{kind} AS text[])))
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


def _rebase_ctes() -> list[str]:
    """Rows whose content stays as the org has it while their base moves to this release (the
    merge kept every local value, or the org chose its own): provenance only."""
    return [
        f"""rebased_{kind} AS (
    UPDATE {table} t SET mirrored_release_id = CAST(:release AS uuid), mirrored_at = now(),
                         mirrored_hash = i.content_hash
    FROM template_release_items i
    WHERE t.organization_id = CAST(:org AS uuid)
      AND t.managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
      AND t.slug = ANY(CAST(:rebase_{kind} AS text[]))
      AND i.release_id = CAST(:release AS uuid) AND i.kind = '{kind}' AND i.slug = t.slug
    RETURNING t.slug)"""
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
_REBASE = ",\n".join(_rebase_ctes())
_WRITTEN = "\nUNION ALL\n".join(
    [f"SELECT '{kind}' AS kind, slug FROM {kind}_written" for kind in KINDS]
    + [f"SELECT '{kind}', slug FROM rebased_{kind}" for kind in KINDS]
)

# The item each planned row is written as: the merge result where the plan merged, else the
# release's own item.
_TARGET_ITEM = "coalesce(m.item, i.item)"
# The merge results by `kind:slug`, parsed once per statement (a cast of the parameter in a
# per-row expression would parse the whole map again for every row).
_MERGED = """merged AS MATERIALIZED (
    SELECT key, value AS item FROM jsonb_each(CAST(:merged AS jsonb)))"""

# The whole plan written by ONE statement. Every planned item gets its id up front (its
# existing row's, or a new one) and every reference is resolved by slug through `ids`, so
# nothing waits for an earlier statement to see a row; foreign keys are checked at its end.
# Returns the written (kind, slug) pairs: fewer than planned means a row changed under it.
APPLY_SQL = f"""
WITH org AS ({_ORG_ROWS}),
{_MERGED},
-- The planned items, found by key (a list searched per item made the cost per item grow
-- with the template).
targets AS MATERIALIZED (
    SELECT i.kind, i.slug, {_TARGET_ITEM} AS item, i.content_hash,
           coalesce(o.id, gen_random_uuid()) AS id, o.id IS NULL AS is_new
    FROM unnest(CAST(:target_kinds AS text[]), CAST(:target_slugs AS text[])) AS w(kind, slug)
    JOIN template_release_items i
        ON i.release_id = CAST(:release AS uuid) AND i.kind = w.kind AND i.slug = w.slug
    LEFT JOIN org o ON o.kind = i.kind AND o.slug = i.slug
    LEFT JOIN merged m ON m.key = i.kind || ':' || i.slug),
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
-- Rules of the written relationship types: exactly the item's, re-pointed by slug.
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
{_REBASE},
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

# Row locks on everything the owner manages in the org (rules included) and on the rows it is
# about to adopt, taken after the install's own lock and before the plan that is applied: a
# user's edit either committed before (and the plan sees it) or waits until the install
# commits. Never lost.
_LOCKED = """
    WHERE organization_id = CAST(:org AS uuid)
      AND (managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
           OR (managed_by_template_agent_id IS NULL
               AND (:adopt_all OR '{kind}:' || slug = ANY(CAST(:adopt AS text[])))))"""
LOCK_SQL = (
    "WITH "
    + ",\n".join(
        f"""locked_{kind} AS (
    SELECT 1 FROM {table} {_LOCKED.format(kind=kind)}
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

# Managed rows of an install that no longer equal what was mirrored, or are gone or archived,
# with every path where they differ from the release item they mirror.
DRIFT_SQL = f"""
WITH installed AS ({RELEASE_ITEMS}),
org AS ({ORG_ITEMS})
SELECT i.kind, i.slug, o.id,
       CASE WHEN o.id IS NULL THEN 'deleted'
            WHEN o.status = 'archived' THEN 'archived'
            ELSE 'modified' END AS drift,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('path', d.path, 'mirrored', d.a_value,
                                                     'current', d.b_value)
                                  ORDER BY d.path COLLATE "C"), '[]'::jsonb)
        FROM install_diff(i.item, o.content) d WHERE o.id IS NOT NULL) AS fields
FROM installed i
LEFT JOIN org o ON o.kind = i.kind AND o.slug = i.slug
               AND o.managed_by = CAST(:owner AS uuid)
WHERE (o.id IS NULL AND NOT EXISTS (
           SELECT 1 FROM ({_ORG_ROWS}) d
           WHERE d.kind = i.kind AND d.slug = i.slug
             AND CAST(:owner AS uuid) = ANY(d.detached_from)))
   OR o.status = 'archived'
   OR install_content_hash(o.content) IS DISTINCT FROM o.mirrored_hash
ORDER BY {KIND_ORDER.format("i.kind")}, i.slug COLLATE "C"
"""

# Written rows that do not equal what the plan said (the merge result or the release item)
# after apply: must be none.
VERIFY_SQL = f"""
WITH {_MERGED},
new AS MATERIALIZED (
    SELECT i.kind, i.slug,
           CASE WHEN m.item IS NULL THEN i.content_hash
                ELSE install_content_hash(m.item) END AS hash
    FROM unnest(CAST(:written_kinds AS text[]), CAST(:written_slugs AS text[])) AS w(kind, slug)
    JOIN template_release_items i
        ON i.release_id = CAST(:release AS uuid) AND i.kind = w.kind AND i.slug = w.slug
    LEFT JOIN merged m ON m.key = i.kind || ':' || i.slug),
org AS ({_ORG_ROWS})
SELECT n.kind, n.slug
FROM new n LEFT JOIN org o ON o.kind = n.kind AND o.slug = n.slug
WHERE o.id IS NULL OR o.status <> 'active' OR o.managed_by IS DISTINCT FROM CAST(:owner AS uuid)
   OR install_content_hash({_content_of("o.kind", "o.id")}) <> n.hash
"""


def _unchanged_counts(org: str, release: str, owner: str) -> str:
    """A scalar SQL expression: the number of items per kind of release `release` when each
    is mirrored by an active row `owner` manages in org `org` whose mirrored hash is the
    item's, and the owner manages no other active row there; else NULL.

    For an active install already at `release` that is enough to know its plan, with no
    adoptions or resolutions asked for, says `unchanged` for every item: no row is missing,
    archived, another's or dropped by the release, and the release changes nothing any row
    mirrors (nor, at the same release, enforces anything), so no row's content is read. Any
    other state is left to the plan, which answers it exactly."""
    mirrored = "\n                UNION ALL".join(
        f"""
                SELECT 1 FROM {table} t
                WHERE i.kind = '{kind}' AND t.organization_id = {org} AND t.slug = i.slug
                  AND t.status = 'active' AND t.managed_by_template_agent_id = {owner}
                  AND t.mirrored_hash = i.content_hash"""
        for kind, table in TABLES.items()
    )
    managed = " + ".join(
        f"""(SELECT count(*) FROM {table} t
             WHERE t.organization_id = {org} AND t.managed_by_template_agent_id = {owner}
               AND t.status = 'active' AND t.slug NOT LIKE '$%')"""
        for table in TABLES.values()
    )
    counts = ", ".join(f"'{kind}', count(*) FILTER (WHERE i.kind = '{kind}')" for kind in KINDS)
    return f"""(
        SELECT CASE WHEN coalesce(bool_and(EXISTS ({mirrored})), true)
                         AND count(*) = {managed}
                    THEN jsonb_build_object({counts}) END
        FROM template_release_items i WHERE i.release_id = {release})"""


UNCHANGED_SQL = "SELECT " + _unchanged_counts(
    "CAST(:org AS uuid)", "CAST(:release AS uuid)", "CAST(:owner AS uuid)"
)


# Every item two releases of one template differ in, path by path.
RELEASE_DIFF_SQL = f"""
WITH a AS (SELECT kind, slug, item, content_hash FROM template_release_items
           WHERE release_id = CAST(:from_release AS uuid)),
b AS (SELECT kind, slug, item, content_hash FROM template_release_items
      WHERE release_id = CAST(:to_release AS uuid))
SELECT coalesce(a.kind, b.kind) AS kind, coalesce(a.slug, b.slug) AS slug,
       CASE WHEN a.slug IS NULL THEN 'added' WHEN b.slug IS NULL THEN 'removed'
            ELSE 'changed' END AS change,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('path', d.path, 'old', d.a_value,
                                                     'new', d.b_value) ORDER BY d.path COLLATE "C"),
                        '[]'::jsonb)
        FROM install_diff(a.item, b.item) d) AS paths
FROM a FULL JOIN b ON a.kind = b.kind AND a.slug = b.slug
WHERE a.content_hash IS DISTINCT FROM b.content_hash
ORDER BY {KIND_ORDER.format("coalesce(a.kind, b.kind)")}, coalesce(a.slug, b.slug) COLLATE "C"
"""

# The template's own fields two releases differ in (name, description, visibility, policies,
# requirements): everything in their snapshots but the items, path by path. A release that
# changes only these changes no item, yet it is a release.
TEMPLATE_DIFF_SQL = """
SELECT d.path, d.a_value AS old, d.b_value AS new
FROM template_releases a
JOIN template_releases b ON b.id = CAST(:to_release AS uuid)
CROSS JOIN LATERAL install_diff(a.snapshot - CAST(:kinds AS text[]),
                                b.snapshot - CAST(:kinds AS text[])) d
WHERE a.id = CAST(:from_release AS uuid)
ORDER BY d.path COLLATE "C"
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


class FieldOutcome(msgspec.Struct, kw_only=True):
    """What happened at one path of an item: `merged` (the release's value taken),
    `kept_local`, `overwritten` (the org's value replaced; it is kept in the history) or
    `conflict` (changed differently on both sides)."""

    path: str
    outcome: str


class PlanItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    kind: str
    slug: str
    action: str
    reason: str | None = None
    fields: list[FieldOutcome] | None = None


@dataclass(frozen=True, kw_only=True)
class Planned:
    """One item of a plan, with what the apply and the history need beyond the API's view."""

    kind: str
    slug: str
    # create, update, unchanged, archive, conflict, adopt, detached, or rebase (the row stays
    # as the org has it while its base moves to this release; shown as unchanged).
    action: str
    reason: str | None = None
    fields: list[dict[str, Any]] | None = None
    # The merge result to write, where it is not the release's item.
    item: dict[str, Any] | None = None
    # An adopted row's content before it was adopted.
    previous: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.slug}"

    def public(self) -> PlanItem:
        return PlanItem(
            kind=self.kind,
            slug=self.slug,
            action="unchanged" if self.action == "rebase" else self.action,
            reason=self.reason,
            fields=None
            if self.fields is None
            else [FieldOutcome(path=f["path"], outcome=f["outcome"]) for f in self.fields],
        )

    def overwritten(self) -> list[dict[str, Any]]:
        """Every local value this item's write replaces: kept in the history event."""
        return [
            {"kind": self.kind, "slug": self.slug, "path": f["path"], "local": f["local"]}
            for f in self.fields or ()
            if f["outcome"] == "overwritten"
        ]


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


@dataclass(frozen=True, kw_only=True)
class Options:
    """How the plan treats the org's own changes.

    `force` takes the release's value at every conflicting path (never over `tenant` fields,
    never adopting); `resolutions` map `kind:slug` to `{path: 'template'|'local'}` (path `''`:
    the whole item); `adopt` lists `kind:slug` of the org's own rows to take over (`adopt_all`:
    every colliding one); `reconcile` makes drifted rows equal the release again (`tenant`
    fields aside)."""

    force: bool = False
    resolutions: dict[str, dict[str, str]] = field(default_factory=dict)
    adopt: tuple[str, ...] = ()
    adopt_all: bool = False
    reconcile: bool = False


@dataclass(kw_only=True)
class Plan:
    items: list[Planned]
    conflicts: list[Planned] = field(init=False)

    def __post_init__(self) -> None:
        self.conflicts = [item for item in self.items if item.action == "conflict"]

    def slugs(self, kind: str, *actions: str) -> list[str]:
        return [i.slug for i in self.items if i.kind == kind and i.action in actions]

    @property
    def writes(self) -> bool:
        return any(item.action in WRITES for item in self.items)

    def public(self) -> list[PlanItem]:
        return [item.public() for item in self.items]

    def changes(self) -> dict[str, dict[str, int]]:
        """Counts per kind and action, in the shape of the API's `changes`."""
        counts = Counter((i.kind, i.action) for i in self.items)
        return {
            kind: {
                label: sum(counts[(kind, action)] for action in actions)
                for label, actions in CHANGE_LABELS.items()
            }
            for kind in KINDS
        }

    def overwritten(self) -> list[dict[str, Any]]:
        return [value for item in self.items for value in item.overwritten()]

    def adopted(self) -> list[dict[str, Any]]:
        return [
            {"kind": i.kind, "slug": i.slug, "previous": i.previous}
            for i in self.items
            if i.action == "adopt"
        ]

    def raise_conflicts(self) -> None:
        if self.conflicts:
            raise InstallConflict(
                [
                    {
                        "kind": c.kind,
                        "slug": c.slug,
                        "reason": c.reason or "",
                        "fields": [f["path"] for f in c.fields or () if f["outcome"] == "conflict"],
                    }
                    for c in self.conflicts
                ]
            )


def _params(target: Target, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "org": target.organization_id,
        "release": target.release_id,
        "owner": target.owner,
        "mirrored": target.mirrored,
    }
    params.update(extra)
    return params


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


async def lock(session: AsyncSession, target: Target, options: Options = Options()) -> None:
    """Lock every row the owner manages in the org, and the rows it is to adopt, until the
    transaction ends."""
    await session.execute(
        statement(LOCK_SQL),
        _params(target, adopt=list(options.adopt), adopt_all=options.adopt_all),
    )


async def archive_all(session: AsyncSession, target: Target) -> dict[str, list[str]]:
    """Archive every active row the owner manages in the org (uninstall); the archived slugs
    per kind."""
    row = (await session.execute(statement(UNINSTALL_SQL), _params(target))).one()
    return dict(row._mapping)


async def drift(session: AsyncSession, target: Target) -> list[dict[str, Any]]:
    """Rows of the installed release edited, archived or deleted in the org since mirrored,
    each with the paths where it differs (`{path, mirrored, current}`)."""
    rows = await session.execute(statement(DRIFT_SQL), _params(target))
    return [dict(r._mapping) for r in rows]


async def release_diff(
    session: AsyncSession, from_release: uuid.UUID, to_release: uuid.UUID
) -> list[dict[str, Any]]:
    """Every item two releases differ in: added, removed or changed, with its paths."""
    rows = await session.execute(
        statement(RELEASE_DIFF_SQL), {"from_release": from_release, "to_release": to_release}
    )
    return [dict(r._mapping) for r in rows]


async def template_diff(
    session: AsyncSession, from_release: uuid.UUID, to_release: uuid.UUID
) -> list[dict[str, Any]]:
    """Every path of the template's own fields two releases differ in, with both values."""
    rows = await session.execute(
        statement(TEMPLATE_DIFF_SQL),
        {"from_release": from_release, "to_release": to_release, "kinds": list(KINDS)},
    )
    return [dict(r._mapping) for r in rows]


async def unchanged(session: AsyncSession, target: Target) -> dict[str, int] | None:
    """The items per kind when the release matches every row it mirrors and nothing else is
    managed (see `_unchanged_counts`), else None; one read-only statement. An install already
    at the release, with nothing to adopt or resolve, then plans all `unchanged`."""
    counts: dict[str, int] | None = await session.scalar(statement(UNCHANGED_SQL), _params(target))
    return counts


async def plan(session: AsyncSession, target: Target, options: Options = Options()) -> Plan:
    """Compare the release with the org's rows, merging where the org edited them; one
    read-only statement."""
    rows = await session.execute(
        statement(PLAN_SQL),
        _plan_params(
            target.release_id,
            target.owner,
            [(target.organization_id, target.previous_release_id, target.install_active)],
            options,
        ),
    )
    return Plan(
        items=[
            Planned(
                kind=r.kind,
                slug=r.slug,
                action=r.action,
                reason=r.reason,
                fields=r.fields,
                item=r.item,
                previous=r.previous,
            )
            for r in rows
        ]
    )


def _plan_params(
    release_id: uuid.UUID,
    owner: uuid.UUID | None,
    scope: Sequence[tuple[uuid.UUID, uuid.UUID | None, bool]],
    options: Options,
    *,
    changed_only: bool = False,
) -> dict[str, Any]:
    """Bind parameters of the plan: the release, its owner, and per org its installed
    release and whether its install is active. Template-policy fields are enforced where the
    install moves to another release (re-installing the installed release stays a no-op).
    `changed_only` leaves out the rows that can only be unchanged (see `_plan_body`)."""
    return {
        "release": release_id,
        "owner": owner,
        "mirrored": owner is not None,
        "orgs": [org for org, _, _ in scope],
        "prev_releases": [prev for _, prev, _ in scope],
        "installs_active": [active for _, _, active in scope],
        "force": options.force,
        "resolutions": _json(options.resolutions),
        "adopt": list(options.adopt),
        "adopt_all": options.adopt_all,
        "reconcile": options.reconcile,
        "changed_only": changed_only,
    }


@dataclass(frozen=True, kw_only=True)
class FleetOutcome:
    """What upgrading one org's install would do: whether it writes anything, and every
    conflict (as a 409 would list it)."""

    organization_id: uuid.UUID
    writes: bool
    conflicts: list[dict[str, Any]]


async def plan_many(
    session: AsyncSession,
    release_id: uuid.UUID,
    owner: uuid.UUID,
    scope: Sequence[tuple[uuid.UUID, uuid.UUID | None, bool]],
    options: Options = Options(),
) -> dict[uuid.UUID, FleetOutcome]:
    """The plan of many installs of one template at once, one statement, summed up per org:
    the same plan (and merge) each install would get on its own. `scope` lists each org with
    its installed release and whether its install is active. Only the rows that may change
    are planned; an org none of whose rows may is one that writes nothing and conflicts
    nowhere."""
    rows = await session.execute(
        statement(FLEET_PLAN_SQL),
        _plan_params(release_id, owner, scope, options, changed_only=True),
    )
    outcomes = {
        org: FleetOutcome(organization_id=org, writes=False, conflicts=[]) for org, _, _ in scope
    }
    for r in rows:
        outcomes[r.org] = FleetOutcome(
            organization_id=r.org, writes=r.writes, conflicts=r.conflicts
        )
    return outcomes


async def apply(session: AsyncSession, target: Target, planned: Plan) -> None:
    """Write the plan with one statement, whatever the number of rows, then verify it."""
    planned.raise_conflicts()
    targets = [i for i in planned.items if i.action in ("create", "update", "adopt")]
    lists = {
        f"{name}_{kind}": planned.slugs(kind, name)
        for name in ("archive", "rebase", "adopt")
        for kind in KINDS
    }
    merged = {i.key: i.item for i in planned.items if i.item is not None}
    params = _params(
        target,
        source_org=target.source_org_id,
        agent=target.agent_id,
        change_notes=target.change_notes,
        merged=_json(merged),
        target_kinds=[i.kind for i in targets],
        target_slugs=[i.slug for i in targets],
        **lists,
    )
    try:
        rows = await session.execute(statement(APPLY_SQL), params)
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
        i.key
        for i in planned.items
        if i.action in ("create", "update", "adopt", "rebase") and (i.kind, i.slug) not in written
    )
    if missing:
        # A row with one of these slugs appeared in the org after the plan was made.
        raise ConcurrentChange("items", missing)
    await verify(session, target, planned, merged)


async def verify(
    session: AsyncSession, target: Target, planned: Plan, merged: dict[str, Any]
) -> None:
    """Check in the database that every written row now equals what the plan wrote: its
    release item, or its merge result.

    This is what makes a dropped reference (a rule, an inverse, a classifier's watcher) an
    error that rolls the install back instead of a silent loss.
    """
    written = [i for i in planned.items if i.action in ("create", "update", "adopt")]
    if written:
        broken = (
            await session.execute(
                statement(VERIFY_SQL),
                _params(
                    target,
                    written_kinds=[i.kind for i in written],
                    written_slugs=[i.slug for i in written],
                    merged=_json(merged),
                ),
            )
        ).all()
        if broken:
            # Something outside this transaction changed rows the install relies on (say, a
            # rule added to a managed relationship type): roll back rather than half-apply.
            raise ConcurrentChange("items", [f"{r.kind}:{r.slug}" for r in broken])
