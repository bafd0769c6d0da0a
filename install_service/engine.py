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

A row's *content* is the row in exactly the shape of its release item, `install_content(row)`
in the database (migration 0011), so `install_content_hash(content)` of a row and of its item
agree when, and only when, the row equals the item. Every row stores that hash of its current
content (`content_hash`, kept true by the database whoever writes the row) and `mirrored_hash`,
the hash of the item it was last mirrored from (the merge's base): drift, the plan and
verification compare the two, and rebuild a row's content only where it must be merged or
shown.

A release may require other templates (contract §13) and reference their items as
`<template>:<slug>`. In an org such a reference is the org's row with that slug (the one the
requirement's install manages there, or the org's own once detached), so a release item is
compared and merged in its unqualified form (`install_unqualified`, which its stored hash is
of) and the apply resolves a qualified reference in the org like any other. A template org
resolves it in the required template's org, and its rows show such references qualified, so
it is compared with the item as written. A sync checks the release's requirements in
each org first (`missing_requirements`) and installs them where asked (`with_requirements`);
the plan refuses to archive a row a dependent's install in the org references (`required_by`).

Nothing here commits, authorizes or records history; the callers do that around it.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import msgspec
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import context
from install_service.actor import Actor
from install_service.audit import service as audit
from install_service.db.session import statement
from install_service.errors import Conflict, InstallConflict, Invalid
from install_service.events import outbox
from install_service.vocabulary import WATCHER_UNSCHEDULED
from install_service.watchers import schedules

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
# Plan actions whose row the apply statement returns as written.
APPLIED = ("create", "update", "adopt", "rebase")
# The counts of a result's `changes`, per kind, and the plan actions each counts.
CHANGE_LABELS = {
    "created": ("create",),
    "updated": ("update",),
    "unchanged": ("unchanged", "rebase"),
    "archived": ("archive",),
    "adopted": ("adopt",),
    "detached": ("detached",),
}


# (kind, slug, item, hash) of every item of release `:release`.
RELEASE_ITEMS = """
        SELECT i.kind, i.slug, i.item, i.content_hash AS hash
        FROM template_release_items i WHERE i.release_id = CAST(:release AS uuid)"""

# The hash a row equal to release item `i` has: in an org the release is installed in, that
# of the item with its references unqualified (`content_hash`); in a template org, whose rows
# reference a required template's rows in that template's org (and show them qualified), the
# hash of the item as the document wrote it.
_ITEM_HASH = "CASE WHEN :mirrored THEN i.content_hash ELSE install_content_hash(i.item) END"

KIND_ORDER = (
    "array_position(ARRAY['entity_types', 'relationship_types', 'classifiers', 'watchers'], {})"
)


def content_of(kind_column: str, id_column: str) -> str:
    """The content of the org row `id_column` of kind `kind_column`, rebuilt on demand."""
    branches = "\n".join(
        f"            WHEN '{kind}' THEN (SELECT install_content(x) FROM {table} x "
        f"WHERE x.id = {id_column})"
        for kind, table in TABLES.items()
    )
    return f"CASE {kind_column}\n{branches}\n        END"


def _org_rows(where: str = "organization_id = CAST(:org AS uuid)") -> str:
    """Every row of every kind in the orgs `where` selects, with provenance, unioned."""
    return "\n    UNION ALL".join(
        f"""
    SELECT '{kind}' AS kind, organization_id, id, slug, status,
           managed_by_template_agent_id AS managed_by, mirrored_hash, mirrored_release_id,
           detached_from_template_agent_ids AS detached_from, content_hash
    FROM {table} WHERE {where}"""
        for kind, table in TABLES.items()
    )


ORG_ROWS = _org_rows()


def _row_of(columns: str, org: str, kind: str, slug: str) -> str:
    """`columns` of the org's row of the kind `kind` names with slug `slug`, by the
    (organization_id, slug) key of its table: one branch runs, whatever the plan."""
    return "\n        UNION ALL ".join(
        f"SELECT {columns} FROM {table} "
        f"WHERE {kind} = '{k}' AND organization_id = {org} AND slug = {slug}"
        for k, table in TABLES.items()
    )


# The filter of `paired`, triple by triple: an item of the release, or a row the owner
# manages that it may archive; in a batch, not a row that can only stay `unchanged`.
_PAIRED_WHERE = """
    WHERE (n.slug IS NOT NULL
           OR (o.managed_by IS NOT DISTINCT FROM CAST(:owner AS uuid) AND o.status = 'active'
               AND o.slug NOT LIKE '$%'))
      AND NOT coalesce(
          :batch AND :mirrored AND NOT :reconcile AND o.status = 'active'
          AND o.managed_by = CAST(:owner AS uuid) AND n.hash = o.mirrored_hash
          AND NOT (n.enforces AND s.prev_release IS DISTINCT FROM CAST(:release AS uuid)),
          false)"""
_PAIRED_COLUMNS = """
           n.hash AS new_hash, n.policies, n.enforces, n.schedule AS new_schedule,
           o.id, o.status, o.managed_by, o.mirrored_hash, o.mirrored_release_id,
           o.detached_from, o.content_hash AS cur_hash"""


def _every_pair(org_rows: str) -> str:
    """`paired` over every item of the release and every row of the orgs `org_rows`."""
    return f"""org AS ({org_rows}),
paired AS (
    SELECT q.*, sc.prev_release, sc.install_active FROM (
        SELECT coalesce(s.org, o.organization_id) AS org,
               coalesce(n.kind, o.kind) AS kind, coalesce(n.slug, o.slug) AS slug,
               {_PAIRED_COLUMNS}
        FROM (scope s CROSS JOIN new n)
        FULL JOIN org o ON o.organization_id = s.org AND o.kind = n.kind AND o.slug = n.slug
        {_PAIRED_WHERE}) q
    JOIN scope sc ON sc.org = q.org
)"""


def _unlike_mirrored(kind: str, table: str) -> str:
    """The keys of the rows of `table` in the orgs that are not as the owner's install left
    them: managed by it and archived or not equal to what was mirrored, or taken over from it
    by the org (`unlike_mirrored` and its partial index, migration 0016). Joined to the
    scope rather than matched by `= ANY` of its orgs: over 10,000 orgs that compared every
    entry of each partial index with the whole list (19 ms, against 4), and the list, as a
    constant in each of five places, took most of the time of planning the statement."""
    return f"""
    SELECT s.org, '{kind}', t.slug, s.prev_release, s.install_active FROM scope s JOIN {table} t
        ON t.organization_id = s.org AND t.unlike_mirrored
    WHERE t.managed_by_template_agent_id = CAST(:owner AS uuid)
       OR CAST(:owner AS uuid) = ANY(t.detached_from_template_agent_ids)"""


_UNION_ALL = "\n    UNION ALL"

# `paired` for a batch, and the rows it plans without pairing them. An active install's rows
# are as it left them (each active, managed by it, its content what it mirrored, which is its
# installed release's item: every sync that writes an org writes each row whose item changes)
# except the rows `unlike` finds by index, and the slugs of managed rows deleted by hand. So
# an org's plan can differ from `unchanged` only at the items the release moves away from its
# installed release (`moved`: added, changed or dropped) and at those rows. Of these, a row as
# its install left it whose item the release changes is an `update` whatever the options
# (`untouched`: its hash, the one the write checks, is its installed release item's): it is
# planned without reading it. Everything else is paired and planned as `_every_pair` pairs it
# (an org without an active install at a release: with every item). Tested against
# `_every_pair` (tests/test_batches.py): the same plan, less `unchanged` items.
_MOVED_PAIRS = f"""prev AS MATERIALIZED (
    SELECT DISTINCT prev_release FROM scope
    WHERE install_active AND prev_release IS NOT NULL),
moved AS MATERIALIZED (
    SELECT p.prev_release, n.kind, n.slug, b.content_hash AS prev_hash,
           b.content_hash IS NOT NULL AS changed
    FROM prev p CROSS JOIN new n
    LEFT JOIN template_release_items b
        ON b.release_id = p.prev_release AND b.kind = n.kind AND b.slug = n.slug
    WHERE b.content_hash IS DISTINCT FROM n.hash
    UNION ALL
    SELECT b.release_id, b.kind, b.slug, b.content_hash, false FROM template_release_items b
    WHERE b.release_id IN (SELECT prev_release FROM prev)
      AND NOT EXISTS (SELECT 1 FROM new n WHERE n.kind = b.kind AND n.slug = b.slug)),
unlike AS MATERIALIZED (
    SELECT s.org, d.kind, d.slug, s.prev_release, s.install_active
    FROM scope s JOIN mirrored_deletions d
        ON d.organization_id = s.org AND d.template_agent_id = CAST(:owner AS uuid)
    UNION ALL{_UNION_ALL.join(_unlike_mirrored(k, t) for k, t in TABLES.items())}),
-- Orgs without an active install at a release (few: a list, not a scan per item).
fresh AS MATERIALIZED (
    SELECT * FROM scope WHERE NOT install_active OR prev_release IS NULL),
untouched AS (
    SELECT s.org, m.kind, m.slug, m.prev_hash
    FROM scope s JOIN moved m ON m.prev_release = s.prev_release AND m.changed
    WHERE s.install_active AND NOT :reconcile
      AND NOT EXISTS (SELECT 1 FROM unlike u
                      WHERE u.org = s.org AND u.kind = m.kind AND u.slug = m.slug)),
-- Each key with its org's installed release and whether its install is active, so that no
-- later step joins the scope again (over 100,000 orgs each such join sorted them all).
keys AS MATERIALIZED (
    SELECT s.org, m.kind, m.slug, s.prev_release, s.install_active
    FROM scope s JOIN moved m ON m.prev_release = s.prev_release
    WHERE s.install_active AND (NOT m.changed OR :reconcile)
    UNION
    SELECT f.org, n.kind, n.slug, f.prev_release, f.install_active FROM fresh f CROSS JOIN new n
    UNION
    SELECT * FROM unlike),
paired AS (
    SELECT s.org, s.kind, s.slug,{_PAIRED_COLUMNS}, s.prev_release, s.install_active
    FROM keys s
    LEFT JOIN new n ON n.kind = s.kind AND n.slug = s.slug
    LEFT JOIN LATERAL ({
    _row_of(
        "id, slug, status, managed_by_template_agent_id AS managed_by, mirrored_hash, "
        "mirrored_release_id, detached_from_template_agent_ids AS detached_from, content_hash",
        "s.org",
        "s.kind",
        "s.slug",
    )
}) o ON true
    {_PAIRED_WHERE}
)"""
# The plan of the `untouched` rows, as `planned` lists a plain update.
_UNTOUCHED_PLANNED = """
UNION ALL
SELECT u.org, u.kind, u.slug, 'update', NULL, NULL, NULL, NULL, u.prev_hash, NULL, n.schedule
FROM untouched u JOIN new n ON n.kind = u.kind AND n.slug = u.slug"""


# Plans the release against the org's rows. Rows are compared by their stored hashes: the
# release's item and the row's base are read only where the release changes, revives or
# enforces a row the owner manages (or reconciles it), and the row's content is rebuilt only
# where it must be merged (the org edited it: its hash is neither its base's nor the new
# item's) or adopted. Publishing compares hashes alone. The release's items are not carried
# along every row: a fleet plan pairs every org with every item.
#
# `:batch` (the plan of a batch of orgs, or of the fleet) leaves out, before anything is
# rebuilt, the rows that can only be `unchanged`: active rows this owner manages whose
# release item is the one they mirror, with no `template` field to enforce and no reconcile.
# For those every later step decides `unchanged` without reading their content, so the plan
# of every other row, and whether the org writes or conflicts, is the same; what it saves is
# carrying each such pair through every step (nearly all of them, for a release that changes
# a few items). Nor does it list the paths of a plain update, which only one org's answer
# shows.
def _plan_body(pairs: str, more: str = "") -> str:
    """The plan's common table expressions up to `planned`, over `paired`, the (org, item,
    row) triples `pairs` defines (`_every_pair` or `_MOVED_PAIRS`), with the rows `more`
    plans without pairing them."""
    return f"""
WITH scope AS MATERIALIZED (
    SELECT s.org, s.prev_release, s.install_active
    FROM unnest(CAST(:orgs AS uuid[]), CAST(:prev_releases AS uuid[]),
                CAST(:installs_active AS boolean[])) AS s(org, prev_release, install_active)),
new AS (
    SELECT i.kind, i.slug, {_ITEM_HASH} AS hash, i.policies,
           EXISTS (SELECT 1 FROM jsonb_each_text(i.policies) p WHERE p.value = 'template')
               AS enforces,
           CASE WHEN i.kind = 'watchers' THEN i.item ->> 'schedule' END AS schedule
    FROM template_release_items i WHERE i.release_id = CAST(:release AS uuid)),
{pairs},
joined AS MATERIALIZED (
    SELECT p.*,
           :mirrored AND p.prev_release IS DISTINCT FROM CAST(:release AS uuid)
               AS enforce_template,
           EXISTS (SELECT 1 FROM template_release_items x
                   WHERE x.release_id = p.prev_release
                     AND x.kind = p.kind AND x.slug = p.slug) AS in_prev
    FROM paired p
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
           :mirrored AND j.new_hash IS DISTINCT FROM j.mirrored_hash AS release_changes,
           -- A row the release drops that an active install of a dependent template in the
           -- org references (contract §13): the dependent's items that reference it.
           CASE WHEN j.new_hash IS NULL AND :mirrored AND j.status = 'active' THEN (
               SELECT jsonb_agg(jsonb_build_object('template', q.slug, 'kind', r.item_kind,
                                                   'slug', r.item_slug)
                                ORDER BY q.slug, r.item_kind, r.item_slug)
               FROM agents d
               JOIN template_release_references r ON r.release_id = d.installed_release_id
               JOIN agents dt ON dt.id = d.template_agent_id
               JOIN organizations q ON q.id = dt.organization_id
               WHERE d.organization_id = j.org AND d.status = 'active'
                 AND r.required_template_agent_id = CAST(:owner AS uuid)
                 AND r.kind = j.kind AND r.slug = j.slug)
           END AS required_by
    FROM joined j
),
looked AS (
    SELECT f.*,
           f.new_hash IS NOT NULL AND f.id IS NOT NULL AND :mirrored AND f.ours
               AND (f.release_changes OR f.status = 'archived' OR :reconcile
                    OR (f.enforce_template AND f.enforces)) AS looked_at
    FROM flags f
),
content AS MATERIALIZED (
    SELECT f.*,
           CASE WHEN f.adopting
                     OR (f.looked_at AND f.cur_hash IS DISTINCT FROM f.mirrored_hash
                         AND f.cur_hash IS DISTINCT FROM f.new_hash)
                THEN {content_of("f.kind", "f.id")}
           END AS cur
    FROM looked f
),
-- The release's item and the row's base, where the plan looks at the row (in a batch, only
-- where it merges: the paths of a plain update are not listed).
read AS (
    SELECT c.*,
           -- (called for a null item too, where a batch reads none: once per planned row)
           CASE WHEN n.item IS NOT NULL THEN install_unqualified(c.kind, n.item) END
               AS new_item,
           CASE WHEN NOT c.looked_at OR (:batch AND c.cur IS NULL) THEN NULL
                WHEN :reconcile THEN install_unqualified(c.kind, n.item)
                ELSE (SELECT install_unqualified(c.kind, b.item) FROM template_release_items b
                      WHERE b.release_id = c.mirrored_release_id
                        AND b.kind = c.kind AND b.slug = c.slug)
           END AS base
    FROM content c
    LEFT JOIN template_release_items n
        ON (c.cur IS NOT NULL OR (c.looked_at AND NOT :batch))
           AND n.release_id = CAST(:release AS uuid)
           AND n.kind = c.kind AND n.slug = c.slug
),
-- MATERIALIZED: the merge is read at many places below; inlined, each would call it again.
merged AS MATERIALIZED (
    SELECT h.*,
           -- Every row whose content was rebuilt is merged (adopted, or edited by the org).
           CASE WHEN h.cur IS NOT NULL
                THEN install_merge(
                    CASE WHEN h.ours THEN h.base END, h.cur, h.new_item,
                    CASE WHEN :reconcile THEN (
                             SELECT jsonb_object_agg(k, CASE WHEN h.policies ->> k = 'tenant'
                                                             THEN 'tenant' ELSE 'template' END)
                             FROM jsonb_object_keys(h.new_item) k)
                         ELSE h.policies END,
                    h.resolutions, CASE WHEN :force THEN 'template' END)
           END AS merge
    FROM read h
),
decided AS (
    SELECT m.*,
           CASE
               WHEN m.new_hash IS NULL AND m.required_by IS NOT NULL THEN 'conflict'
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
           WHEN action = 'conflict' AND required_by IS NOT NULL THEN 'required_by'
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
           WHEN action = 'conflict' AND (required_by IS NOT NULL OR ours)
                AND (archived_locally OR merge IS NULL)
               THEN '[{{"path": "", "outcome": "conflict"}}]'::jsonb
           WHEN merge IS NOT NULL AND action <> 'unchanged' THEN merge -> 'fields'
           -- the paths of a plain update (the org's row as the base was), for one org's
           -- answer; a batch needs no per-path account of them
           WHEN action = 'update' AND ours AND base IS NOT NULL AND NOT :batch
               THEN (SELECT coalesce(jsonb_agg(jsonb_build_object('path', d.path,
                                                                  'outcome', 'merged')
                                               ORDER BY d.path COLLATE "C"), '[]'::jsonb)
                     FROM install_diff(base, new_item) d)
       END AS fields,
       CASE WHEN action IN ('update', 'adopt') AND merge IS NOT NULL THEN merge -> 'item' END
           AS item,
       CASE WHEN action = 'adopt' THEN cur END AS previous,
       -- the content hash the plan saw: the row is written only if it is still that
       cur_hash AS seen, required_by,
       -- A written watcher's schedule (its next run is set when the operation is recorded).
       CASE WHEN action IN ('create', 'update', 'adopt')
            THEN coalesce(merge -> 'item' ->> 'schedule', new_schedule) END AS schedule
FROM decided{more})"""


# One org's plan finds its rows by an equality on the org: the index, whatever a generic plan
# knows of the tables. Joined to the scope instead, a generic plan read every org's
# relationship types, classifiers and watchers (5.9 ms per plan at 300 orgs, against 2.3);
# matched by `= ANY` its orgs, one made while the statistics were stale did (28.6 ms per
# plan in a worker at 1,000 orgs).
PLAN_SQL = f"""{_plan_body(_every_pair(_org_rows("organization_id = (CAST(:orgs AS uuid[]))[1]")))}
SELECT org, kind, slug, action, reason, fields, item, previous, schedule, seen, required_by,
       now() AS planned_at
FROM planned
ORDER BY {KIND_ORDER.format("kind")}, slug COLLATE "C"
"""

# The plan of a batch of orgs (a resync's items, a bulk install, the fleet dry run): what
# `_MOVED_PAIRS` pairs, and the `untouched` rows it plans without pairing them.
BATCH_BODY = _plan_body(_MOVED_PAIRS, _UNTOUCHED_PLANNED)

# The same plan for a batch of orgs at once (a resync's items, a bulk install), every item of
# every org whose plan may not be `unchanged` (see `_plan_body`'s `:batch`).
BATCH_PLAN_SQL = f"""{BATCH_BODY}
SELECT org, kind, slug, action, reason, fields, item, previous, schedule, seen, required_by,
       now() AS planned_at
FROM planned
ORDER BY org, {KIND_ORDER.format("kind")}, slug COLLATE "C"
"""

# The same plan for many installs of one template at once (the fleet dry run), summed up
# for the fleet: the orgs that would write, and every conflict of each org that has some.
# One row: a fleet's answer is as many orgs as it plans, and a row per org cost more to
# read than the rest of the answer. Whether an org writes is counted apart from the
# conflicts, which are listed in order: only conflicting orgs' rows are sorted.
FLEET_PLAN_SQL = f"""{BATCH_BODY},
conflicts AS (
    SELECT org,
           jsonb_agg(jsonb_build_object(
                        'kind', kind, 'slug', slug, 'reason', reason,
                        'fields', (SELECT coalesce(jsonb_agg(f -> 'path'), '[]'::jsonb)
                                   FROM jsonb_array_elements(fields) f
                                   WHERE f ->> 'outcome' = 'conflict'))
                        || CASE WHEN required_by IS NOT NULL
                                THEN jsonb_build_object('required_by', required_by)
                                ELSE '{{}}'::jsonb END
                        ORDER BY {KIND_ORDER.format("kind")}, slug COLLATE "C") AS conflicts
    FROM planned WHERE action = 'conflict' GROUP BY org)
SELECT (SELECT array_agg(org ORDER BY org)
        FROM (SELECT org FROM planned GROUP BY org
              HAVING bool_or(action IN {WRITES})) w) AS writing,
       (SELECT jsonb_object_agg(org, conflicts) FROM conflicts) AS conflicts
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
    """The id of the row of `kind` that the reference `slug` names, for the target row `i`: a
    row this statement creates (from the map of new ids), or the org's existing row (by its
    key). A reference resolves inside its own org, or not at all: a qualified one
    (`<template>:<slug>`, an item of a required template) is the org's row with that slug,
    which the requirement's install manages there. Only a template org (`:mirrored` false)
    resolves a qualified reference in the required template's own org."""
    bare = f"regexp_replace({slug}, '^.*:', '')"
    return f"""coalesce(
            CAST((SELECT map FROM ids) ->> (i.org::text || ':{kind}:' || {bare}) AS uuid),
            (SELECT x.id FROM {TABLES[kind]} x
             WHERE x.organization_id = i.org AND x.slug = {bare}
               AND (:mirrored OR strpos({slug}, ':') = 0)),
            (SELECT x.id FROM {TABLES[kind]} x
             JOIN organizations q ON q.id = x.organization_id
             WHERE NOT :mirrored AND strpos({slug}, ':') > 0
               AND q.slug = split_part({slug}, ':', 1) AND x.slug = {bare}))"""


def _upsert(kind: str, columns: str, values: str, source: str = "targets") -> str:
    """Write the planned items of one kind under their planned ids, updating rows this owner
    already has and rows it adopts (never another's: such a row makes the count short, or a
    reference dangle). Each row gets the content hash it will have when written as planned;
    the database checks it at the end of the statement and puts right any that is not (so
    that verification sees it)."""
    table = TABLES[kind]
    columns += ", content_hash"
    values += ", i.target_hash"
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
    SELECT i.id, i.org, {values}, 'active', {_provenance_values(table)}
    FROM {source} i
    WHERE i.kind = '{kind}'
    ON CONFLICT (organization_id, slug) DO UPDATE SET
        {updates},
        updated_at = now()
    WHERE (t.managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
           OR (t.managed_by_template_agent_id IS NULL
               AND t.organization_id::text || ':{kind}:' || t.slug
                   = ANY(CAST(:adopt_keys AS text[]))))
      -- as the plan saw it: an edit committed since is not written over (the count falls
      -- short, and the org is planned again)
      AND t.content_hash IS NOT DISTINCT FROM ((SELECT map FROM seen) ->> t.id::text)
    RETURNING t.id, t.organization_id AS org, t.slug)"""


def _versions(kind: str, versions: str, owner: str, fields: dict[str, str]) -> tuple[str, str]:
    """The targets of one versioned kind, each with the id and number of its new version where
    it needs one (its versioned `fields` differ from the row's current version, or there is
    none), and the append of those versions for the rows written. Old versions are never
    touched (the database refuses). The upsert reads its rows from the first, so neither step
    joins two lists of the statement (whose sizes the planner cannot know: a join of them
    compared every row of the batch with every other)."""
    table = TABLES[kind]
    new = ", ".join(f"i.item{expr}" for expr in fields.values())
    current = ", ".join(f"v.{name}" for name in fields)
    needed = f"""{kind}_targets AS MATERIALIZED (
    SELECT i.*,
           CASE WHEN needs THEN gen_random_uuid() END AS version_id,
           CASE WHEN needs THEN coalesce(
               (SELECT max(x.version) FROM {versions} x WHERE x.{owner} = i.id), 0) + 1
           END AS version
    FROM (
        SELECT i.*,
               NOT (v.id IS NOT NULL AND ROW({current}) IS NOT DISTINCT FROM ROW({new})) AS needs
        FROM targets i
        LEFT JOIN {table} t ON t.id = i.id
        LEFT JOIN {versions} v ON v.id = t.current_version_id
        WHERE i.kind = '{kind}') i)"""
    names = ", ".join(fields)
    values = ", ".join(f"n.item{expr}" for expr in fields.values())
    extra = ", name, change_notes" if kind == "watchers" else ""
    extra_values = ", n.item->>'name', CAST(:change_notes AS text)" if extra else ""
    appended = f"""{kind}_versions_appended AS (
    INSERT INTO {versions} (id, organization_id, {owner}, version, {names}{extra})
    SELECT n.version_id, n.org, n.id, n.version, {values}{extra_values}
    FROM {kind}_targets n
    WHERE n.version_id IS NOT NULL
      AND (SELECT jsonb_object_agg(w.id::text, true) FROM {kind}_written w) ? n.id::text)"""
    return needed, appended


# The versions of each versioned kind: their table, and the column naming their row.
VERSION_TABLES = {
    "watchers": ("watcher_versions", "watcher_id"),
    "classifiers": ("event_classifier_versions", "classifier_id"),
}
# Versioned content, with each field's type: a change to any of these appends a version.
VERSIONED = {
    "watchers": {
        "prompt": "text",
        "extraction_schema": "jsonb",
        "sources_schema": "jsonb",
        "reactions_guidance": "text",
    },
    "classifiers": {
        "attribute_values": "jsonb",
        "fallback_value": "text",
        "extraction_config": "jsonb",
    },
}


def _versions_of(kind: str) -> tuple[str, str]:
    fields = {f: ("->>" if t == "text" else "->") + f"'{f}'" for f, t in VERSIONED[kind].items()}
    return _versions(kind, *VERSION_TABLES[kind], fields)


_WATCHER_VERSIONS = _versions_of("watchers")
_CLASSIFIER_VERSIONS = _versions_of("classifiers")


def _listed(name: str) -> str:
    """The (org, kind, slug, seen) items the apply's list `name` holds: `seen` is the content
    hash the plan saw the org's row with."""
    return (
        f"unnest(CAST(:{name}_orgs AS uuid[]), CAST(:{name}_kinds AS text[]), "
        f"CAST(:{name}_slugs AS text[]), CAST(:{name}_seen AS text[])) "
        f"AS {name}(org, kind, slug, seen)"
    )


def _archive_ctes(*, every_owned_row: bool) -> list[str]:
    """Archive the owner's active rows: the listed ones (`:archive_*`, in any org), or all of
    them in the org `:org` (uninstall); each CTE returns one row per archived row."""
    if every_owned_row:
        source, which = "", "t.organization_id = CAST(:org AS uuid)"
    else:
        source = f"FROM {_listed('archive')}"
        which = (
            "archive.kind = '{kind}' AND t.organization_id = archive.org AND t.slug = archive.slug"
        )
    return [
        f"""archived_{kind} AS (
    UPDATE {table} t SET status = 'archived', updated_at = now()
    {source}
    WHERE {which.format(kind=kind)} AND t.status = 'active'
      AND t.managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
      AND t.slug NOT LIKE '$%'
    RETURNING t.organization_id AS org, t.slug)"""
        for kind, table in TABLES.items()
    ]


def _rebase_ctes() -> list[str]:
    """Rows whose content stays as the org has it while their base moves to this release (the
    merge kept every local value, or the org chose its own): provenance only."""
    return [
        f"""rebased_{kind} AS (
    UPDATE {table} t SET mirrored_release_id = CAST(:release AS uuid), mirrored_at = now(),
                         mirrored_hash = i.content_hash
    FROM {_listed("rebase")}
    JOIN template_release_items i
        ON i.release_id = CAST(:release AS uuid) AND i.kind = rebase.kind
           AND i.slug = rebase.slug
    WHERE rebase.kind = '{kind}' AND t.organization_id = rebase.org AND t.slug = rebase.slug
      AND t.managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
      AND t.content_hash IS NOT DISTINCT FROM rebase.seen
    RETURNING t.organization_id AS org, t.slug)"""
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
        i.agent, i.version_id""",
            source="watchers_targets",
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
        {_ref("watchers", "i.item->>'watcher'")}, i.version_id""",
            source="classifiers_targets",
        ),
    ]
)
_ARCHIVE_LISTED = ",\n".join(_archive_ctes(every_owned_row=False))
_REBASE = ",\n".join(_rebase_ctes())
_WRITTEN = "\nUNION ALL\n".join(
    [f"SELECT '{kind}' AS kind, org, slug FROM {kind}_written" for kind in KINDS]
    + [f"SELECT '{kind}', org, slug FROM rebased_{kind}" for kind in KINDS]
)

# The item each planned row is written as: the merge result where the plan merged, else the
# release's own item, taken out of its compressed storage once here (`|| '{}'` builds it
# afresh): kept as stored, every field read from it below (a watcher's, a dozen) uncompressed
# the whole item again.
_TARGET_ITEM = "coalesce(m.item, i.item || '{}'::jsonb)"
# The merge results by `org:kind:slug`, parsed once per statement (a cast of the parameter in
# a per-row expression would parse the whole map again for every row).
_MERGED = """merged AS MATERIALIZED (
    SELECT key, value AS item FROM jsonb_each(CAST(:merged AS jsonb)))"""

# The plans of every org of a batch written by ONE statement. Every planned item gets its id
# up front (its existing row's, or a new one) and every reference is resolved by slug in its
# own org (a new row's id from the map `ids`, an existing row's by its key), so nothing waits
# for an earlier statement to see a row; foreign keys are checked at its end. Returns the
# written (kind, org, slug): fewer than planned means a row changed under it.
APPLY_SQL = f"""
WITH scope AS MATERIALIZED (
    SELECT s.org, s.agent
    FROM unnest(CAST(:orgs AS uuid[]), CAST(:agents AS uuid[])) AS s(org, agent)),
{_MERGED},
-- The planned items, found by key (a list searched per item made the cost per item grow
-- with the template).
targets AS MATERIALIZED (
    SELECT target.org, s.agent, i.kind, i.slug, {_TARGET_ITEM} AS item, i.content_hash,
           CASE WHEN m.item IS NOT NULL THEN install_content_hash(m.item) ELSE {_ITEM_HASH} END
               AS target_hash,
           coalesce(o.id, gen_random_uuid()) AS id, o.id IS NULL AS is_new, target.seen
    FROM {_listed("target")}
    JOIN scope s ON s.org = target.org
    JOIN template_release_items i
        ON i.release_id = CAST(:release AS uuid) AND i.kind = target.kind
           AND i.slug = target.slug
    LEFT JOIN LATERAL ({_row_of("id", "target.org", "target.kind", "target.slug")}) o ON true
    LEFT JOIN merged m ON m.key = target.org::text || ':' || i.kind || ':' || i.slug),
ids AS MATERIALIZED (
    SELECT jsonb_object_agg(org::text || ':' || kind || ':' || slug, id) AS map
    FROM targets WHERE is_new),
-- The content hash the plan saw each existing row with, by id.
seen AS MATERIALIZED (
    SELECT jsonb_object_agg(id::text, seen) AS map FROM targets WHERE NOT is_new),
{_WATCHER_VERSIONS[0]},
{_CLASSIFIER_VERSIONS[0]},
{_UPSERTS},
{_WATCHER_VERSIONS[1]},
{_CLASSIFIER_VERSIONS[1]},
-- Rules of the written relationship types: exactly the item's, re-pointed by slug.
rules_wanted AS (
    SELECT * FROM (
        SELECT i.org, i.id AS rt, {_ref("entity_types", "rule.r->>'source'")} AS src,
               {_ref("entity_types", "rule.r->>'target'")} AS tgt
        FROM targets i CROSS JOIN LATERAL jsonb_array_elements(i.item->'rules') AS rule(r)
        WHERE i.kind = 'relationship_types') wanted
    WHERE src IS NOT NULL AND tgt IS NOT NULL),
rules_stale AS (
    DELETE FROM entity_relationship_type_rules x
    USING targets i
    WHERE i.kind = 'relationship_types' AND NOT i.is_new AND x.relationship_type_id = i.id
      AND NOT EXISTS (SELECT 1 FROM rules_wanted w WHERE w.rt = x.relationship_type_id
                      AND w.src = x.source_entity_type_id AND w.tgt = x.target_entity_type_id)
    RETURNING 1),
rules_written AS (
    INSERT INTO entity_relationship_type_rules
        (organization_id, relationship_type_id, source_entity_type_id, target_entity_type_id)
    SELECT org, rt, src, tgt FROM rules_wanted
    ON CONFLICT DO NOTHING
    RETURNING 1),
{_REBASE},
{_ARCHIVE_LISTED},
written AS (
{_WRITTEN})
-- How many planned rows were written; which ones only when some were not (every written row
-- sent back cost the worker more than the rest of the batch's answers together).
SELECT c.n, w.kind, w.org, w.slug
FROM (SELECT count(*) AS n FROM written) c
LEFT JOIN written w ON c.n < CAST(:expected AS bigint)
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

# Row locks on everything the owner manages in the orgs (rules included) and on the rows it is
# about to adopt, taken after the installs' own locks and before the plan that is applied: a
# user's edit either committed before (and the plan sees it) or waits until the install
# commits. Never lost.
_LOCKED = """
    WHERE organization_id = ANY(CAST(:orgs AS uuid[]))
      AND (managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
           OR (managed_by_template_agent_id IS NULL
               AND (:adopt_all OR organization_id::text || ':{kind}:' || slug
                                  = ANY(CAST(:adopt_keys AS text[])))))"""
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
    WHERE t.organization_id = ANY(CAST(:orgs AS uuid[]))
      AND t.managed_by_template_agent_id IS NOT DISTINCT FROM CAST(:owner AS uuid)
    FOR UPDATE OF r)
SELECT """
    + " + ".join(f"(SELECT count(*) FROM locked_{k})" for k in (*TABLES, "rules"))
)

# Managed rows of an install that no longer equal what was mirrored (by their stored hashes),
# or are gone or archived, with every path where they differ from the release item they
# mirror (their content rebuilt for those rows only).
DRIFT_SQL = f"""
WITH installed AS ({RELEASE_ITEMS}),
org AS ({ORG_ROWS})
SELECT i.kind, i.slug, o.id,
       CASE WHEN o.id IS NULL THEN 'deleted'
            WHEN o.status = 'archived' THEN 'archived'
            ELSE 'modified' END AS drift,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('path', d.path, 'mirrored', d.a_value,
                                                     'current', d.b_value)
                                  ORDER BY d.path COLLATE "C"), '[]'::jsonb)
        FROM install_diff(install_unqualified(i.kind, i.item), {content_of("o.kind", "o.id")}) d
        WHERE o.id IS NOT NULL) AS fields
FROM installed i
LEFT JOIN org o ON o.kind = i.kind AND o.slug = i.slug
               AND o.managed_by = CAST(:owner AS uuid)
WHERE (o.id IS NULL AND NOT EXISTS (
           SELECT 1 FROM ({ORG_ROWS}) d
           WHERE d.kind = i.kind AND d.slug = i.slug
             AND CAST(:owner AS uuid) = ANY(d.detached_from)))
   OR o.status = 'archived'
   OR o.content_hash IS DISTINCT FROM o.mirrored_hash
ORDER BY {KIND_ORDER.format("i.kind")}, i.slug COLLATE "C"
"""

# Written rows that do not equal what the plan said (the merge result or the release item)
# after apply: must be none. The apply writes the hash it expects each row to have, and the
# database's triggers put right any that is not the row's (see `_upsert`), so comparing the
# stored hash is comparing the content.
VERIFY_SQL = f"""
WITH {_MERGED},
new AS MATERIALIZED (
    SELECT written.org, i.kind, i.slug,
           CASE WHEN m.item IS NOT NULL THEN install_content_hash(m.item) ELSE {_ITEM_HASH} END
               AS hash
    FROM {_listed("written")}
    JOIN template_release_items i
        ON i.release_id = CAST(:release AS uuid) AND i.kind = written.kind
           AND i.slug = written.slug
    LEFT JOIN merged m ON m.key = written.org::text || ':' || i.kind || ':' || i.slug)
SELECT n.org, n.kind, n.slug
FROM new n
LEFT JOIN LATERAL (
    {
    _row_of(
        "id, status, managed_by_template_agent_id AS managed_by, content_hash",
        "n.org",
        "n.kind",
        "n.slug",
    )
}) o ON true
WHERE o.id IS NULL OR o.status <> 'active' OR o.managed_by IS DISTINCT FROM CAST(:owner AS uuid)
   OR o.content_hash IS DISTINCT FROM n.hash
"""


def unchanged_counts(org: str, release: str, owner: str) -> str:
    """A scalar SQL expression: the number of items per kind of release `release` when each
    is mirrored by an active row `owner` manages in org `org` whose mirrored hash is the
    item's, and the owner manages no other active row there; else NULL.

    For an active install already at `release` that is enough to know its plan, with no
    adoptions or resolutions asked for, says `unchanged` for every item: no row is missing,
    archived, another's or dropped by the release, and the release changes nothing any row
    mirrors (nor, at the same release, enforces anything), so no row's content is read. Any
    other state is left to the plan, which answers it exactly.

    One join of the release's items with the rows the owner manages there (an item without
    its row, or a row without its item, pairs with nothing): a probe per item would cost a
    generic plan an index descent each, six times the whole join at ten times the template."""
    managed = "\n            UNION ALL".join(
        f"""
            SELECT '{kind}' AS kind, t.slug, t.mirrored_hash FROM {table} t
            WHERE t.organization_id = {org} AND t.managed_by_template_agent_id = {owner}
              AND t.status = 'active' AND t.slug NOT LIKE '$%'"""
        for kind, table in TABLES.items()
    )
    counts = ", ".join(f"'{kind}', count(*) FILTER (WHERE i.kind = '{kind}')" for kind in KINDS)
    return f"""(
        SELECT CASE WHEN coalesce(bool_and(coalesce(t.mirrored_hash = i.content_hash, false)),
                                  true)
                    THEN jsonb_build_object({counts}) END
        FROM (SELECT kind, slug, content_hash FROM template_release_items
              WHERE release_id = {release}) i
        FULL JOIN ({managed}) t ON t.kind = i.kind AND t.slug = i.slug)"""


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
    required_by: list[dict[str, str]] | None = None


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
    # A written watcher's schedule.
    schedule: str | None = None
    # The content hash the plan saw the org's row with (None: it had none).
    seen: str | None = None
    # A dropped item that dependents in the org still reference: `{template, kind, slug}` of
    # each of their items that does (a `required_by` conflict).
    required_by: list[dict[str, str]] | None = None

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
            required_by=self.required_by,
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
    # When it was made (the database's clock): written watchers' next runs count from it.
    at: datetime | None = None
    # Per kind, how many items the release has, for a plan that leaves out the items that can
    # only be unchanged (a batch's): they are counted as the difference.
    totals: dict[str, int] | None = None
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
        if self.totals is not None:
            for kind in KINDS:
                listed = sum(
                    n for (k, action), n in counts.items() if k == kind and action != "archive"
                )
                counts[(kind, "unchanged")] += self.totals.get(kind, 0) - listed
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

    def conflict(self) -> InstallConflict | None:
        """The 409 every conflict of the plan makes, if it has any."""
        if not self.conflicts:
            return None
        return InstallConflict(
            [
                {
                    "kind": c.kind,
                    "slug": c.slug,
                    "reason": c.reason or "",
                    "fields": [f["path"] for f in c.fields or () if f["outcome"] == "conflict"],
                    **({"required_by": c.required_by} if c.required_by else {}),
                }
                for c in self.conflicts
            ]
        )

    def raise_conflicts(self) -> None:
        if (conflict := self.conflict()) is not None:
            raise conflict


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


def _keys(target: Target, keys: Sequence[str]) -> list[str]:
    """`kind:slug` keys of one target as the batch statements' `org:kind:slug`."""
    return [f"{target.organization_id}:{key}" for key in keys]


async def lock(
    session: AsyncSession, targets: Sequence[Target], options: Options = Options()
) -> None:
    """Lock every row the owner manages in the targets' orgs, and the rows it is to adopt,
    until the transaction ends; one statement."""
    first = targets[0]
    await session.execute(
        statement(LOCK_SQL),
        {
            "orgs": [t.organization_id for t in targets],
            "owner": first.owner,
            "adopt_keys": [key for t in targets for key in _keys(t, options.adopt)],
            "adopt_all": options.adopt_all,
        },
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


def _planned(row: Any) -> Planned:
    return Planned(
        kind=row.kind,
        slug=row.slug,
        action=row.action,
        reason=row.reason,
        fields=row.fields,
        item=row.item,
        previous=row.previous,
        schedule=row.schedule,
        seen=row.seen,
        required_by=row.required_by,
    )


async def plan(session: AsyncSession, target: Target, options: Options = Options()) -> Plan:
    """Compare the release with the org's rows, merging where the org edited them; one
    read-only statement. Every item of the release, and every row it archives, is listed."""
    rows = (
        await session.execute(
            statement(PLAN_SQL),
            _plan_params(
                target.release_id,
                target.owner,
                [(target.organization_id, target.previous_release_id, target.install_active)],
                options,
            ),
        )
    ).all()
    return Plan(items=[_planned(r) for r in rows], at=rows[0].planned_at if rows else None)


async def plan_batch(
    session: AsyncSession,
    targets: Sequence[Target],
    totals: dict[str, int],
    options: Options = Options(),
) -> dict[uuid.UUID, Plan]:
    """The plans of many orgs, every target of one release, with one read-only statement:
    the same plan (and merge) each org would get on its own, listing only the items that
    may not be `unchanged` (`totals`, the release's items per kind, counts the others)."""
    first = targets[0]
    rows = (
        await session.execute(
            statement(BATCH_PLAN_SQL),
            _plan_params(
                first.release_id,
                first.owner,
                [(t.organization_id, t.previous_release_id, t.install_active) for t in targets],
                options,
                batch=True,
            ),
        )
    ).all()
    found: dict[uuid.UUID, list[Planned]] = {t.organization_id: [] for t in targets}
    for row in rows:
        found[row.org].append(_planned(row))
    at = rows[0].planned_at if rows else None
    return {org: Plan(items=items, at=at, totals=totals) for org, items in found.items()}


def _plan_params(
    release_id: uuid.UUID,
    owner: uuid.UUID | None,
    scope: Sequence[tuple[uuid.UUID, uuid.UUID | None, bool]],
    options: Options,
    *,
    batch: bool = False,
) -> dict[str, Any]:
    """Bind parameters of the plan: the release, its owner, and per org its installed
    release and whether its install is active. Template-policy fields are enforced where the
    install moves to another release (re-installing the installed release stays a no-op).
    `batch` leaves out the rows that can only be unchanged, and the paths of plain updates
    (see `_plan_body`); only an install's plan is planned in batches (`_MOVED_PAIRS`)."""
    if batch and owner is None:
        raise ValueError("a template organization's plan is not planned in batches")
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
        "batch": batch,
    }


# For the rest of the transaction, plan each prepared statement for its parameters. After five
# runs on a connection PostgreSQL may settle on a generic plan of the fleet plan, which does
# not know how many orgs it plans or which rows they edited: over 10,000 installs it ran in
# 0.8 s against 0.33 s.
_CUSTOM_PLANS = "SELECT set_config('plan_cache_mode', 'force_custom_plan', true)"


class FleetPlanned(msgspec.Struct, frozen=True, kw_only=True):
    """What upgrading each org of a fleet would do: which orgs would write anything, and
    every conflict (as a 409 would list it) of each org that has some."""

    writing: frozenset[uuid.UUID]
    conflicts: dict[uuid.UUID, list[dict[str, Any]]]


async def plan_many(
    session: AsyncSession,
    release_id: uuid.UUID,
    owner: uuid.UUID,
    scope: Sequence[tuple[uuid.UUID, uuid.UUID | None, bool]],
    options: Options = Options(),
) -> FleetPlanned:
    """The plan of many installs of one template at once, one statement, summed up for the
    fleet: the same plan (and merge) each install would get on its own. `scope` lists each
    org with its installed release and whether its install is active. Only the rows that
    may change are planned: an org neither writing nor conflicting writes nothing."""
    await session.execute(statement(_CUSTOM_PLANS))
    answer = (
        await session.execute(
            statement(FLEET_PLAN_SQL),
            _plan_params(release_id, owner, scope, options, batch=True),
        )
    ).one()
    return FleetPlanned(
        writing=frozenset(answer.writing or ()),
        conflicts={uuid.UUID(org): found for org, found in (answer.conflicts or {}).items()},
    )


async def apply(session: AsyncSession, writes: Sequence[tuple[Target, Plan]]) -> None:
    """Write the plans of many orgs, every target of one release, with one statement,
    whatever the number of orgs and rows, then verify them with one."""
    if not writes:
        return
    first = writes[0][0]
    for target, planned in writes:
        planned.raise_conflicts()
        if (target.release_id, target.owner) != (first.release_id, first.owner):
            raise ValueError("one apply writes one release")
    lists: dict[str, list[Any]] = {}
    for name, actions in (
        ("target", ("create", "update", "adopt")),
        ("archive", ("archive",)),
        ("rebase", ("rebase",)),
        ("written", ("create", "update", "adopt")),
    ):
        chosen = [(t, i) for t, p in writes for i in p.items if i.action in actions]
        lists[f"{name}_orgs"] = [t.organization_id for t, _ in chosen]
        lists[f"{name}_kinds"] = [i.kind for _, i in chosen]
        lists[f"{name}_slugs"] = [i.slug for _, i in chosen]
        lists[f"{name}_seen"] = [i.seen for _, i in chosen]
    merged = _json(
        {
            f"{t.organization_id}:{i.key}": i.item
            for t, p in writes
            for i in p.items
            if i.item is not None
        }
    )
    params: dict[str, Any] = {
        "release": first.release_id,
        "owner": first.owner,
        "mirrored": first.mirrored,
        "source_org": first.source_org_id,
        "change_notes": first.change_notes,
        "orgs": [t.organization_id for t, _ in writes],
        "agents": [t.agent_id for t, _ in writes],
        "adopt_keys": [
            f"{t.organization_id}:{i.key}"
            for t, p in writes
            for i in p.items
            if i.action == "adopt"
        ],
        "merged": merged,
        **{k: v for k, v in lists.items() if not k.startswith("written")},
        "expected": sum(1 for _, p in writes for i in p.items if i.action in APPLIED),
    }
    try:
        rows = (await session.execute(statement(APPLY_SQL), params)).all()
    except IntegrityError as exc:
        # Rows created, claimed or renamed by someone else since the plan: a reference to a
        # planned row cannot resolve, or a planned id is taken. Nothing was written.
        if getattr(exc.orig, "sqlstate", None) not in CHANGED_UNDER_APPLY:
            raise
        cause = getattr(exc.orig, "__cause__", None)
        where = getattr(cause, "constraint_name", None) or getattr(cause, "table_name", None)
        raise ConcurrentChange("items", [str(where or "rows")]) from exc
    if rows[0].n < params["expected"]:
        written = {(row.org, row.kind, row.slug) for row in rows}
        missing = sorted(
            i.key
            for t, p in writes
            for i in p.items
            if i.action in APPLIED and (t.organization_id, i.kind, i.slug) not in written
        )
        # A row with one of these slugs appeared in the org after the plan was made.
        raise ConcurrentChange("items", missing)
    if lists["written_orgs"]:
        broken = (
            await session.execute(
                statement(VERIFY_SQL),
                {
                    "release": first.release_id,
                    "owner": first.owner,
                    "mirrored": first.mirrored,
                    "merged": merged,
                    **{k: v for k, v in lists.items() if k.startswith("written")},
                },
            )
        ).all()
        if broken:
            # Something outside this transaction changed rows the install relies on (say, a
            # rule added to a managed relationship type): roll back rather than half-apply.
            raise ConcurrentChange("items", [f"{r.kind}:{r.slug}" for r in broken])


# --- Recording: history, change feed, audit, schedules -----------------------------------

# Every operation of a batch recorded by ONE statement: each install moves to its release and
# status, and gets its history event, its change-feed event and its audit row; watchers the
# operations left without a next run (the database clears it when a write changes a
# schedule) get theirs, for the schedules the caller computed (`:schedules`, `:times`).
RECORD_SQL = f"""
WITH done AS MATERIALIZED (
    SELECT * FROM unnest(CAST(:installs AS uuid[]), CAST(:actions AS text[]),
                         CAST(:event_types AS text[]), CAST(:from_releases AS uuid[]),
                         CAST(:to_releases AS uuid[]), CAST(:statuses AS text[]),
                         CAST(:changes AS jsonb[]), CAST(:items AS jsonb[]))
        WITH ORDINALITY
        AS d(install, action, event_type, from_release, to_release, status, changes, items, n)),
updated AS (
    UPDATE agents a SET installed_release_id = d.to_release, status = d.status,
                        last_synced_at = now()
    FROM done d WHERE a.id = d.install
    RETURNING a.id, a.organization_id),
history AS (
    INSERT INTO install_events (organization_id, install_id, action, from_release_id,
                                to_release_id, actor_user_id, changes)
    SELECT u.organization_id, d.install, d.action, d.from_release, d.to_release,
           CAST(:actor AS uuid), d.changes
    FROM done d JOIN updated u ON u.id = d.install),
event_source AS (
    SELECT d.n, u.organization_id, d.install AS install_id, d.event_type AS type,
           CAST(:template AS text) AS template, d.from_release, d.to_release, d.items,
           NULL::jsonb AS extra
    FROM done d JOIN updated u ON u.id = d.install),
{outbox.EVENTS_CTES},
audited AS (
    {audit.AUDIT_INSERT}
    SELECT CAST(:actor AS uuid), d.event_type, 'install', d.install::text, u.organization_id,
           CAST(:request_id AS text),
           jsonb_build_object('from_release', d.from_release, 'to_release', d.to_release,
                              'changes', d.changes)
    FROM done d JOIN updated u ON u.id = d.install),
scheduled AS (
    UPDATE watchers w SET next_run_at = x.next_run_at
    FROM unnest(CAST(:schedules AS text[]), CAST(:times AS timestamptz[]))
        AS x(schedule, next_run_at)
    WHERE w.schedule = x.schedule
      AND w.id IN (SELECT id FROM watchers
                   WHERE organization_id IN (SELECT organization_id FROM updated)
                     AND {WATCHER_UNSCHEDULED}
                   FOR UPDATE SKIP LOCKED))
SELECT count(*) FROM updated
"""


@dataclass(frozen=True, kw_only=True)
class Record:
    """One install's operation, as history, feed and audit keep it."""

    install_id: uuid.UUID
    action: str  # install, upgrade, rollback, reinstall, reconcile, uninstall, detach
    from_release: uuid.UUID | None
    to_release: uuid.UUID | None
    status: str
    changes: dict[str, Any]
    items: Sequence[outbox.Item]


async def record(
    session: AsyncSession,
    records: Sequence[Record],
    *,
    template: str,
    actor: Actor,
    schedules: dict[str, datetime] | None = None,
) -> None:
    """Record operations on installs of one template, one statement whatever their number:
    each install's release and status, history event, change-feed event and audit row, and
    the next run of the watchers they left unscheduled (`schedules`: each schedule's)."""
    if not records:
        return
    times = schedules or {}
    await session.execute(
        statement(RECORD_SQL),
        {
            "installs": [r.install_id for r in records],
            "actions": [r.action for r in records],
            "event_types": [outbox.INSTALL_EVENT_TYPES[r.action] for r in records],
            "from_releases": [r.from_release for r in records],
            "to_releases": [r.to_release for r in records],
            "statuses": [r.status for r in records],
            "changes": [_json(r.changes) for r in records],
            "items": [outbox.items_json(r.items) for r in records],
            "template": template,
            "actor": actor.user_id,
            "request_id": context.request_id.get(),
            "schedules": list(times),
            "times": list(times.values()),
        },
    )


def history_changes(planned: Plan) -> dict[str, Any]:
    """What a history event keeps: counts per kind, and every local value the write replaced
    and every adopted row's previous content, so nothing an org wrote is ever lost."""
    changes: dict[str, Any] = dict(planned.changes())
    if overwritten := planned.overwritten():
        changes["overwritten"] = overwritten
    if adopted := planned.adopted():
        changes["adopted"] = adopted
    return changes


def next_runs(plans: Sequence[Plan]) -> dict[str, datetime]:
    """The next run of every schedule the plans write, counted from when they were made."""
    found: dict[str, datetime] = {}
    for planned in plans:
        for item in planned.items:
            if item.schedule is not None and item.schedule not in found and planned.at:
                when = schedules.next_run(item.schedule, planned.at)
                if when is not None:
                    found[item.schedule] = when
    return found


# --- The entry: one release brought to a batch of orgs -------------------------------------


@dataclass(frozen=True, kw_only=True)
class Release:
    """The release a sync brings orgs to."""

    id: uuid.UUID
    version: int
    template: str  # the template's slug
    owner: uuid.UUID  # its template agent: it manages the rows it mirrors into orgs
    source_org_id: uuid.UUID  # the template org
    # Items per kind (a batch's plans list only the items that may change: see `plan_batch`).
    totals: dict[str, int] = field(default_factory=dict)
    # What new watcher and classifier versions say they came from.
    change_notes: str | None = None
    # The templates it requires (their slugs), where the caller read them (None: not read;
    # the sync looks them up).
    requires: tuple[str, ...] | None = None

    @classmethod
    def of(cls, row: Any, totals: dict[str, int] | None = None) -> Release:
        """From a release row (`releases.RELEASE_SQL`'s columns)."""
        requires = row.get("requires")
        return cls(
            id=row["id"],
            version=row["version"],
            template=row["template"],
            owner=row["template_agent_id"],
            source_org_id=row["organization_id"],
            totals=totals or {},
            requires=None if requires is None else tuple(r["template"] for r in requires),
        )


@dataclass(frozen=True, kw_only=True)
class Install:
    """An org's install of the release's template, as the caller found it (`id` None: none
    yet), with the caller's own handle on it (a resync item, say)."""

    organization_id: uuid.UUID
    id: uuid.UUID | None = None
    status: str | None = None
    installed_release_id: uuid.UUID | None = None
    installed_version: int | None = None
    key: Any = None

    @property
    def active(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What a sync did to (or, in a dry run, would do to) one org's install: `written`,
    `unchanged` (nothing to do), `conflict` (nothing written; the plan says why) or `failed`
    (nothing written; `error` says why)."""

    install: Install  # as it is now: a created install has its id
    status: str
    action: str  # what the history calls it: install, upgrade, rollback, reinstall, reconcile
    created: bool
    plan: Plan
    error: Exception | None = None


def _action(install: Install, release: Release, options: Options, created: bool) -> str:
    if options.reconcile:
        return "reconcile"
    if created or install.id is None:
        return "install"
    if not install.active or install.installed_version is None:
        return "reinstall"
    if release.version > install.installed_version:
        return "upgrade"
    if release.version < install.installed_version:
        return "rollback"
    return "reinstall"


def predicted_outcome(
    *, at_release: bool, writes: bool, conflicts: bool
) -> Literal["upgrade", "unchanged", "conflict"]:
    """What a sync does with an active install's plan, decided in this order: an install
    already at the release whose plan writes nothing is `unchanged`, else any conflict refuses
    it (`conflict`), else it is written (`upgrade` in the fleet dry run's words)."""
    if at_release and not writes:
        return "unchanged"
    if conflicts:
        return "conflict"
    return "upgrade"


def _target(release: Release, install: Install) -> Target:
    return Target(
        organization_id=install.organization_id,
        release_id=release.id,
        owner=release.owner,
        agent_id=install.id,
        source_org_id=release.source_org_id,
        previous_release_id=install.installed_release_id,
        install_active=install.active,
        change_notes=release.change_notes or f"{release.template} release {release.version}",
    )


def _decide(
    release: Release, install: Install, planned: Plan, options: Options, *, created: bool
) -> Outcome:
    at_release = install.active and install.installed_release_id == release.id
    predicted = predicted_outcome(
        at_release=at_release, writes=planned.writes, conflicts=bool(planned.conflicts)
    )
    status = {"unchanged": "unchanged", "conflict": "conflict"}.get(predicted, "written")
    return Outcome(
        install=install,
        status=status,
        action=_action(install, release, options, created),
        created=created,
        plan=planned,
    )


def _check_named_items(planned: Plan, options: Options) -> None:
    """Resolutions and adoptions must name items the plan has: a typo is a 422, not a silent
    no-op."""
    known = {item.key for item in planned.items}
    unknown = sorted({*options.resolutions, *options.adopt} - known)
    if unknown:
        raise Invalid(
            f"no such item in this release or organization: {', '.join(unknown)}",
            code="unknown_item",
            items=unknown,
        )


async def _plans(
    session: AsyncSession,
    release: Release,
    installs: Sequence[Install],
    options: Options,
    *,
    batch: bool,
) -> dict[uuid.UUID, Plan]:
    targets = [_target(release, i) for i in installs]
    if batch:
        return await plan_batch(session, targets, release.totals, options)
    (target,) = targets
    planned = await plan(session, target, options)
    _check_named_items(planned, options)
    return {target.organization_id: planned}


_CREATE_INSTALLS = """
    INSERT INTO agents (organization_id, slug, name, description, template_agent_id,
                        installed_by_user_id)
    SELECT o.org, t.slug, t.name, t.description, t.id, CAST(:actor AS uuid)
    FROM unnest(CAST(:orgs AS uuid[])) AS o(org) JOIN agents t ON t.id = CAST(:owner AS uuid)
    ON CONFLICT (template_agent_id, organization_id) DO NOTHING
    RETURNING id, organization_id"""
_LOCK_INSTALLS = """
    SELECT a.id, a.organization_id, a.status, a.installed_release_id,
           r.version AS installed_version
    FROM agents a LEFT JOIN template_releases r ON r.id = a.installed_release_id
    WHERE a.template_agent_id = CAST(:owner AS uuid)
      AND a.organization_id = ANY(CAST(:orgs AS uuid[]))
    FOR UPDATE OF a"""


async def _installs_locked(
    session: AsyncSession,
    release: Release,
    installs: Sequence[Install],
    *,
    actor: Actor,
    locked: bool,
) -> tuple[list[Install], set[uuid.UUID]]:
    """Every install, created where there is none (any number of concurrent syncs create an
    org's install once: the key waits for the first), locked and read again unless the caller
    holds their locks already (`locked`); and the orgs whose install this created."""
    missing = [i.organization_id for i in installs if i.id is None]
    created: dict[uuid.UUID, uuid.UUID] = {}
    if missing:
        rows = await session.execute(
            statement(_CREATE_INSTALLS),
            {"orgs": missing, "owner": release.owner, "actor": actor.user_id},
        )
        created = {row.organization_id: row.id for row in rows}
    # A created install is this transaction's; any other is read again under its lock.
    reread = [i.organization_id for i in installs if i.organization_id not in created]
    if locked:
        reread = [org for org in reread if org in missing]
    current = {org: Install(organization_id=org, id=iid) for org, iid in created.items()}
    if reread:
        rows = await session.execute(
            statement(_LOCK_INSTALLS), {"owner": release.owner, "orgs": reread}
        )
        for row in rows:
            current[row.organization_id] = Install(
                organization_id=row.organization_id,
                id=row.id,
                status=row.status,
                installed_release_id=row.installed_release_id,
                installed_version=row.installed_version,
            )
    return [
        dataclasses.replace(current.get(i.organization_id, i), key=i.key) for i in installs
    ], set(created)


async def sync(
    session: AsyncSession,
    release: Release,
    installs: Sequence[Install],
    *,
    actor: Actor,
    options: Options = Options(),
    dry_run: bool = False,
    batch: bool = False,
    locked: bool = False,
    with_requirements: bool = False,
) -> list[Outcome]:
    """Bring each org's install of the release's template to `release`, in the caller's
    transaction: install it (where it has none), upgrade, roll back or reinstall it, merging
    every row the org edited; `options.reconcile` makes drifted rows equal the release again.

    The same steps for one org (an install over HTTP, the command line, the test harness) or
    a batch of them (a resync's items, a bulk install; `batch`), each one statement for the
    whole batch whatever the number of orgs or rows: create the missing installs, lock them
    (unless the caller holds their locks: `locked`) and the rows they manage, plan, then write
    every org whose plan is clean (apply, verify) and record it (history, change feed, audit,
    watcher schedules). Each org's outcome is its own: one that conflicts is not written and
    holds no other back; should writing the batch fail, it is written again in halves, down
    to the one org at fault, which alone ends `failed` (one org alone raises instead). With
    `dry_run`, only the plan, without locks. A batch's plans list only the items that may
    change; one org's lists every item.
    """
    if not batch and len(installs) != 1:
        raise ValueError("a sync of one org, or a batch")
    missing = await missing_requirements(
        session, release, [i.organization_id for i in installs], lock=not dry_run
    )
    # Requirements not met: installed first (`with_requirements`; a dry run plans as if
    # they were), else one org's sync is a 422 and a batch's orgs are conflicts.
    if missing and with_requirements and not dry_run:
        return await _with_requirements(
            session,
            release,
            installs,
            missing,
            actor=actor,
            options=options,
            batch=batch,
            locked=locked,
        )
    if missing and not with_requirements and not batch:
        raise MissingRequirement(release.template, missing[installs[0].organization_id])
    refused = [
        _unmet(release, i, missing[i.organization_id])
        for i in installs
        if i.organization_id in missing and not with_requirements
    ]
    rest = [i for i in installs if i.organization_id not in missing or with_requirements]
    if not rest:
        return refused
    return refused + await _sync(
        session,
        release,
        rest,
        actor=actor,
        options=options,
        dry_run=dry_run,
        batch=batch,
        locked=locked,
    )


async def _sync(
    session: AsyncSession,
    release: Release,
    installs: Sequence[Install],
    *,
    actor: Actor,
    options: Options,
    dry_run: bool,
    batch: bool,
    locked: bool,
) -> list[Outcome]:
    """`sync` of installs whose orgs meet the release's requirements (or, in a dry run with
    `with_requirements`, are planned as if they did)."""
    if dry_run:
        plans = await _plans(session, release, installs, options, batch=batch)
        return [
            _decide(release, i, plans[i.organization_id], options, created=False) for i in installs
        ]
    current, created = await _installs_locked(
        session, release, installs, actor=actor, locked=locked
    )
    # One org's rows are locked before its plan: an edit waits for the install, or was made
    # before and is planned. A batch locks no rows (a fleet's rows, locked by the hundred
    # thousand, cost more than they protect): each row is written only if it is still as
    # the plan saw it, else its org is planned again.
    existing = {i.organization_id for i in current} - created
    if (existing and not batch) or options.adopt or options.adopt_all:
        await lock(session, [_target(release, i) for i in current], options)
    outcomes = await _write(
        session, release, current, actor=actor, options=options, batch=batch, created=created
    )
    unwritten = [o.install.id for o in outcomes if o.created and o.status != "written"]
    if unwritten:
        # An install this sync created for an org it did not write: as if never made.
        await session.execute(
            statement("DELETE FROM agents WHERE id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": unwritten},
        )
    return outcomes


# --- Requirements (contract §13) --------------------------------------------------------

# Each org's requirements of the release that are not met: the required template has no
# active install there at a release of at least the minimum. The installs found are share-
# locked, so that none is uninstalled or moved while this transaction installs a dependent.
_MISSING_SQL = """
WITH required AS MATERIALIZED (
    SELECT rr.required_template_agent_id AS owner, rr.min_version, q.slug AS template
    FROM template_release_requirements rr
    JOIN agents qa ON qa.id = rr.required_template_agent_id
    JOIN organizations q ON q.id = qa.organization_id
    WHERE rr.release_id = CAST(:release AS uuid)),
found AS MATERIALIZED (
    SELECT a.organization_id, a.template_agent_id, a.status, a.installed_release_id
    FROM agents a
    WHERE a.template_agent_id IN (SELECT owner FROM required)
      AND a.organization_id = ANY(CAST(:orgs AS uuid[]))
    {lock})
SELECT o.org, r.owner, r.template, r.min_version, f.status, ir.version AS installed_version
FROM unnest(CAST(:orgs AS uuid[])) AS o(org)
CROSS JOIN required r
LEFT JOIN found f ON f.organization_id = o.org AND f.template_agent_id = r.owner
LEFT JOIN template_releases ir ON ir.id = f.installed_release_id
WHERE NOT coalesce(f.status = 'active' AND ir.version >= coalesce(r.min_version, 1), false)
ORDER BY o.org, r.template
"""

# The latest release of a template, by its template agent.
_LATEST_SQL = """
SELECT r.id, r.version, q.slug AS template, a.id AS template_agent_id,
       a.organization_id
FROM agents a
JOIN organizations q ON q.id = a.organization_id
JOIN LATERAL (SELECT x.id, x.version FROM template_releases x
              WHERE x.template_agent_id = a.id ORDER BY x.version DESC LIMIT 1) r ON true
WHERE a.id = CAST(:owner AS uuid)
"""


@dataclass(frozen=True, kw_only=True)
class Unmet:
    """A requirement of a release that an org does not meet."""

    owner: uuid.UUID  # the required template's agent
    template: str
    min_version: int | None
    installed_version: int | None  # None: not installed (or not active)

    def public(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "version": self.min_version,
            "installed_version": self.installed_version,
        }

    def conflict(self) -> dict[str, Any]:
        """As a plan's conflict lists it (kind `templates`)."""
        return {
            "kind": "templates",
            "slug": self.template,
            "reason": "missing_requirement",
            "fields": [],
            **self.public(),
        }


class MissingRequirement(Invalid):
    """A release needs templates the org does not have (active, recent enough)."""

    code = "missing_requirement"

    def __init__(self, template: str, unmet: Sequence[Unmet]) -> None:
        names = ", ".join(
            u.template + (f" (release {u.min_version} or later)" if u.min_version else "")
            for u in unmet
        )
        super().__init__(
            f"{template} requires {names} installed in the organization first; install "
            "them, or pass with_requirements to install them in the same transaction",
            requirements=[u.public() for u in unmet],
        )


async def missing_requirements(
    session: AsyncSession, release: Release, orgs: Sequence[uuid.UUID], *, lock: bool
) -> dict[uuid.UUID, list[Unmet]]:
    """The requirements of `release` each org does not meet (orgs that meet all: absent)."""
    if release.requires is not None and not release.requires:
        return {}
    rows = await session.execute(
        statement(_MISSING_SQL.format(lock="FOR SHARE" if lock else "")),
        {"release": release.id, "orgs": list(orgs)},
    )
    found: dict[uuid.UUID, list[Unmet]] = {}
    for row in rows:
        found.setdefault(row.org, []).append(
            Unmet(
                owner=row.owner,
                template=row.template,
                min_version=row.min_version,
                installed_version=row.installed_version if row.status == "active" else None,
            )
        )
    return found


def _unmet(release: Release, install: Install, unmet: Sequence[Unmet]) -> Outcome:
    """An org's outcome when the release's requirements are not met there: a conflict of
    reason `missing_requirement` per requirement (kind `templates`); nothing written."""
    return Outcome(
        install=install,
        status="conflict",
        action=_action(install, release, Options(), created=False),
        created=False,
        plan=Plan(
            items=[
                Planned(
                    kind="templates",
                    slug=u.template,
                    action="conflict",
                    reason="missing_requirement",
                    fields=[],
                )
                for u in unmet
            ]
        ),
    )


async def _with_requirements(
    session: AsyncSession,
    release: Release,
    installs: Sequence[Install],
    missing: dict[uuid.UUID, list[Unmet]],
    *,
    actor: Actor,
    options: Options,
    batch: bool,
    locked: bool,
) -> list[Outcome]:
    """Install or upgrade the requirements each org lacks (theirs first: each requirement is
    synced to its latest release with its own requirements), then the release, all in the
    caller's transaction. One org alone: any requirement's conflict or failure is raised. A
    batch: an org whose requirement or own sync does not succeed ends with nothing written
    (the batch runs again without it), so no org is left with requirements installed for a
    dependent that is not."""
    refused: dict[uuid.UUID, Outcome] = {}
    by_org = {i.organization_id: i for i in installs}
    owners = sorted({u.owner for unmet in missing.values() for u in unmet})
    while True:
        savepoint = await session.begin_nested() if batch else None
        blocked: dict[uuid.UUID, Outcome] = {}
        for owner in owners:
            orgs = [
                org
                for org, unmet in missing.items()
                if org not in refused
                and org not in blocked
                and any(u.owner == owner for u in unmet)
            ]
            if not orgs:
                continue
            row = (await session.execute(statement(_LATEST_SQL), {"owner": owner})).mappings().one()
            required = Release.of(row)
            done = await sync(
                session,
                required,
                [Install(organization_id=org) for org in orgs],
                actor=actor,
                batch=batch,
                with_requirements=True,
            )
            for outcome in done:
                if outcome.status in ("written", "unchanged"):
                    continue
                if not batch:
                    if outcome.error is not None:
                        raise outcome.error
                    conflict = outcome.plan.conflict()
                    if conflict is not None:
                        for c in conflict.conflicts:
                            c.setdefault("template", required.template)
                        raise conflict
                org = outcome.install.organization_id
                blocked[org] = _unmet(release, by_org[org], missing[org])
        rest = [i for i in installs if i.organization_id not in refused | blocked]
        # Their requirements are met now, by installs this transaction holds locked.
        outcomes = (
            await _sync(
                session,
                release,
                rest,
                actor=actor,
                options=options,
                dry_run=False,
                batch=batch,
                locked=locked,
            )
            if rest
            else []
        )
        for outcome in outcomes:
            org = outcome.install.organization_id
            if outcome.status not in ("written", "unchanged") and org in missing:
                blocked[org] = outcome
        if not blocked or savepoint is None:
            if savepoint is not None:
                await savepoint.commit()
            return [*refused.values(), *outcomes]
        # Something written for these orgs' requirements must not stay: again without them.
        await savepoint.rollback()
        refused.update(blocked)


async def _write(
    session: AsyncSession,
    release: Release,
    installs: Sequence[Install],
    *,
    actor: Actor,
    options: Options,
    batch: bool,
    created: set[uuid.UUID],
) -> list[Outcome]:
    """Plan the installs (under their locks), then write and record the clean ones in a
    savepoint; a batch that fails is planned and written again in halves."""
    plans = await _plans(session, release, installs, options, batch=batch)
    decided = [
        _decide(
            release,
            i,
            plans[i.organization_id],
            options,
            created=i.organization_id in created,
        )
        for i in installs
    ]
    writing = [o for o in decided if o.status == "written"]
    if not writing:
        return decided
    if not batch:  # one org: its failure is the caller's, and nothing needs keeping apart
        await _apply_and_record(session, release, writing, actor)
        return decided
    savepoint = await session.begin_nested()
    try:
        await _apply_and_record(session, release, writing, actor)
    except Exception as exc:  # one org's failure must not fail the others of a batch
        await savepoint.rollback()
        if len(writing) == 1:
            (failed,) = writing
            return [
                dataclasses.replace(o, status="failed", error=exc) if o is failed else o
                for o in decided
            ]
        half = len(writing) // 2
        settled = [o for o in decided if o.status != "written"]
        again = [
            o
            for part in (writing[:half], writing[half:])
            for o in await _write(
                session,
                release,
                [o.install for o in part],
                actor=actor,
                options=options,
                batch=batch,
                created=created,
            )
        ]
        return settled + again
    # Not inside the `try`: should releasing the savepoint fail, the whole batch transaction
    # rolls back and its items stay pending, rather than orgs written under items that say
    # they failed.
    await savepoint.commit()
    return decided


async def _apply_and_record(
    session: AsyncSession, release: Release, writing: Sequence[Outcome], actor: Actor
) -> None:
    await apply(session, [(_target(release, o.install), o.plan) for o in writing])
    await record(
        session,
        [_record(release, o) for o in writing],
        template=release.template,
        actor=actor,
        schedules=next_runs([o.plan for o in writing]),
    )


def _record(release: Release, outcome: Outcome) -> Record:
    planned = outcome.plan
    install_id = outcome.install.id
    if install_id is None:  # every org written has its install by then
        raise ValueError(f"no install in {outcome.install.organization_id}")
    return Record(
        install_id=install_id,
        action=outcome.action,
        from_release=outcome.install.installed_release_id,
        to_release=release.id,
        status="active",
        changes=history_changes(planned),
        items=outbox.items_from_plan(planned.items),
    )
