"""Invariants of installed data, checked in the database (`install-service db check`).

Each check is one set-based query returning the rows that break it; a healthy database
returns none. Local edits that the product allows (drift) are not violations, but a managed
row that no longer matches its install's release in existence or status is.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service.engine import TABLES


class Violation(msgspec.Struct, kw_only=True):
    check: str
    organization_id: str | None
    detail: str


_FOREIGN_REFERENCES = """
SELECT r.organization_id, 'rule ' || r.id || ' joins rows of another organization'
FROM entity_relationship_type_rules r
JOIN entity_relationship_types t ON t.id = r.relationship_type_id
JOIN entity_types s ON s.id = r.source_entity_type_id
JOIN entity_types g ON g.id = r.target_entity_type_id
WHERE t.managed_by_template_agent_id IS NOT NULL
  AND (t.organization_id <> r.organization_id OR s.organization_id <> r.organization_id
       OR g.organization_id <> r.organization_id)
UNION ALL
SELECT t.organization_id, 'relationship type ' || t.slug || ': inverse in another organization'
FROM entity_relationship_types t JOIN entity_relationship_types i ON i.id = t.inverse_type_id
WHERE t.managed_by_template_agent_id IS NOT NULL AND i.organization_id <> t.organization_id
UNION ALL
SELECT c.organization_id, 'classifier ' || c.slug || ': entity type or watcher in another org'
FROM event_classifiers c
LEFT JOIN entity_types e ON e.id = c.entity_type_id
LEFT JOIN watchers w ON w.id = c.watcher_id
WHERE c.managed_by_template_agent_id IS NOT NULL
  AND (e.organization_id <> c.organization_id OR w.organization_id <> c.organization_id)
UNION ALL
SELECT w.organization_id, 'watcher ' || w.slug || ': agent in another organization'
FROM watchers w JOIN agents a ON a.id = w.agent_id
WHERE w.managed_by_template_agent_id IS NOT NULL AND a.organization_id <> w.organization_id
"""

_CURRENT_VERSION_OWNER = """
SELECT w.organization_id, 'watcher ' || w.slug || ': current version belongs elsewhere'
FROM watchers w JOIN watcher_versions v ON v.id = w.current_version_id
WHERE v.watcher_id <> w.id OR v.organization_id <> w.organization_id
UNION ALL
SELECT c.organization_id, 'classifier ' || c.slug || ': current version belongs elsewhere'
FROM event_classifiers c JOIN event_classifier_versions v ON v.id = c.current_version_id
WHERE v.classifier_id <> c.id OR v.organization_id <> c.organization_id
"""

_VERSION_GAPS = """
SELECT min(organization_id::text)::uuid, 'watcher ' || watcher_id || ': versions '
       || string_agg(version::text, ',' ORDER BY version) || ' are not 1..n'
FROM watcher_versions GROUP BY watcher_id
HAVING min(version) <> 1 OR max(version) <> count(*)
UNION ALL
SELECT min(organization_id::text)::uuid, 'classifier ' || classifier_id || ': versions '
       || string_agg(version::text, ',' ORDER BY version) || ' are not 1..n'
FROM event_classifier_versions GROUP BY classifier_id
HAVING min(version) <> 1 OR max(version) <> count(*)
"""

_DUPLICATE_INSTALLS = """
SELECT organization_id, count(*) || ' installs of template agent ' || template_agent_id
FROM agents WHERE template_agent_id IS NOT NULL
GROUP BY template_agent_id, organization_id HAVING count(*) > 1
"""

_MANAGED = " UNION ALL ".join(
    f"SELECT '{kind}' AS kind, organization_id, slug, status, managed_by_template_agent_id "
    f"FROM {table} WHERE managed_by_template_agent_id IS NOT NULL"
    for kind, table in TABLES.items()
)

# Rows an org took over from an install (detach): present, but no longer managed.
_DETACHED = " UNION ALL ".join(
    f"SELECT '{kind}' AS kind, organization_id, slug, d.template_agent_id "
    f"FROM {table} CROSS JOIN unnest(detached_from_template_agent_ids) AS d(template_agent_id)"
    for kind, table in TABLES.items()
)

# For every install: items of its release without a row (missing, unless detached), rows it
# manages that are active but not in its release (extra), and rows in the wrong status for the
# install's status.
_RELEASE_MISMATCH = f"""
WITH installs AS (
    SELECT a.id, a.organization_id, a.template_agent_id, a.status, a.installed_release_id
    FROM agents a WHERE a.template_agent_id IS NOT NULL AND a.installed_release_id IS NOT NULL),
expected AS (
    SELECT i.id AS install, i.organization_id, i.template_agent_id, i.status AS install_status,
           k.kind, item->>'slug' AS slug
    FROM installs i
    JOIN template_releases r ON r.id = i.installed_release_id
    CROSS JOIN unnest(ARRAY['entity_types', 'relationship_types', 'classifiers', 'watchers'])
         AS k(kind)
    CROSS JOIN LATERAL jsonb_array_elements(r.snapshot -> k.kind) AS item),
managed AS ({_MANAGED}),
detached AS ({_DETACHED})
SELECT coalesce(e.organization_id, m.organization_id),
       CASE WHEN m.slug IS NULL THEN 'missing ' ELSE 'extra ' END
       || coalesce(e.kind, m.kind) || ' ' || coalesce(e.slug, m.slug)
FROM expected e
FULL JOIN managed m ON m.organization_id = e.organization_id AND m.kind = e.kind
                   AND m.slug = e.slug AND m.managed_by_template_agent_id = e.template_agent_id
WHERE (m.slug IS NULL AND e.install_status = 'active' AND NOT EXISTS (
           SELECT 1 FROM detached d
           WHERE d.organization_id = e.organization_id AND d.kind = e.kind
             AND d.slug = e.slug AND d.template_agent_id = e.template_agent_id))
   OR (e.slug IS NULL AND m.status = 'active')
UNION ALL
SELECT e.organization_id, 'wrong status: ' || e.kind || ' ' || e.slug || ' is ' || m.status
       || ' in a ' || e.install_status || ' install'
FROM expected e
JOIN managed m ON m.organization_id = e.organization_id AND m.kind = e.kind
              AND m.slug = e.slug AND m.managed_by_template_agent_id = e.template_agent_id
WHERE (e.install_status = 'active') <> (m.status = 'active')
"""

# Every release's items are exactly its snapshot's items, with their content hashes.
_RELEASE_ITEMS = """
WITH snapshot AS (
    SELECT r.id, a.organization_id, k.kind, item->>'slug' AS slug, item
    FROM template_releases r
    JOIN agents a ON a.id = r.template_agent_id
    CROSS JOIN unnest(ARRAY['entity_types', 'relationship_types', 'classifiers', 'watchers'])
         AS k(kind)
    CROSS JOIN LATERAL jsonb_array_elements(r.snapshot -> k.kind) AS item)
SELECT s.organization_id,
       'release ' || coalesce(s.id, i.release_id) || ': ' || coalesce(s.kind, i.kind) || ' '
       || coalesce(s.slug, i.slug) || CASE WHEN i.release_id IS NULL THEN ' has no item'
                                           WHEN s.id IS NULL THEN ' is not in the snapshot'
                                           ELSE ' differs from the snapshot' END
FROM snapshot s
FULL JOIN template_release_items i ON i.release_id = s.id AND i.kind = s.kind AND i.slug = s.slug
WHERE s.id IS NULL OR i.release_id IS NULL OR i.item <> s.item
   OR i.content_hash <> install_content_hash(install_unqualified(s.kind, s.item))
"""

# Every user has exactly one personal org, and owns it.
_PERSONAL_ORGS = """
SELECT NULL::uuid, 'user ' || u.email || ' has ' || count(o.id) || ' personal organizations'
FROM users u LEFT JOIN organizations o ON o.personal_owner_id = u.id
GROUP BY u.id, u.email HAVING count(o.id) <> 1
UNION ALL
SELECT o.id, 'personal organization ' || o.slug || ' is not owned by its user'
FROM organizations o
WHERE o.kind = 'personal' AND NOT EXISTS (
    SELECT 1 FROM memberships m
    WHERE m.organization_id = o.id AND m.user_id = o.personal_owner_id AND m.role = 'owner')
"""

# Tables the database itself keeps append-only: each must still refuse UPDATE, DELETE and
# TRUNCATE (a trigger dropped by hand would let history be rewritten).
APPEND_ONLY = (
    "template_releases",
    "template_release_items",
    "template_release_requirements",
    "template_release_references",
    "watcher_versions",
    "event_classifier_versions",
    "audit_log",
    "events",
)
_APPEND_ONLY = f"""
SELECT NULL::uuid, t.name || ' no longer refuses ' || op.name
FROM unnest(ARRAY{list(APPEND_ONLY)}) AS t(name)
CROSS JOIN (VALUES ('UPDATE', 16), ('DELETE', 8), ('TRUNCATE', 32)) AS op(name, bit)
WHERE NOT EXISTS (
    SELECT 1 FROM pg_trigger g JOIN pg_proc p ON p.oid = g.tgfoid
    WHERE g.tgrelid = to_regclass(t.name) AND p.proname = 'refuse_append_only_change'
      AND g.tgenabled <> 'D' AND g.tgtype & op.bit <> 0)
"""

# A watcher that is not scheduled (archived, schedule off or missing) has no next run.
_UNSCHEDULED_NEXT_RUN = """
SELECT organization_id, 'watcher ' || slug || ' is not scheduled but has next_run_at'
FROM watchers
WHERE next_run_at IS NOT NULL
  AND (status <> 'active' OR NOT schedule_enabled OR schedule IS NULL)
"""
# Every managed row of an install records as its base (what it was last mirrored from, and
# what the next merge starts from) exactly the installed release's item: `mirrored_hash` is
# that item's hash, and `mirrored_release_id` names a release of the same template with that
# item. A merged row, whatever the org kept, still has the release's item as its base.
_BASES = " UNION ALL ".join(
    f"""
SELECT t.organization_id, '{kind} ' || t.slug || ': ' || CASE
           WHEN b.content_hash IS NULL THEN 'its base release has no such item'
           ELSE 'its recorded base is not the installed release''s item' END
FROM {table} t
JOIN agents a ON a.template_agent_id = t.managed_by_template_agent_id
             AND a.organization_id = t.organization_id
JOIN template_release_items i ON i.release_id = a.installed_release_id
                             AND i.kind = '{kind}' AND i.slug = t.slug
LEFT JOIN template_release_items b ON b.release_id = t.mirrored_release_id
                                  AND b.kind = '{kind}' AND b.slug = t.slug
WHERE t.managed_by_template_agent_id IS NOT NULL
  AND (b.content_hash IS NULL OR t.mirrored_hash IS DISTINCT FROM i.content_hash
       OR b.content_hash IS DISTINCT FROM t.mirrored_hash)"""
    for kind, table in TABLES.items()
)

# Every row's stored content hash is the hash of its content as it is now (the database's
# triggers keep it so; a trigger dropped or disabled by hand would let drift go unseen).
_CONTENT_HASHES = " UNION ALL ".join(
    f"""
SELECT t.organization_id, '{kind} ' || t.slug || ': its stored content hash is stale'
FROM {table} t
WHERE t.content_hash IS DISTINCT FROM install_content_hash(install_content(t))"""
    for kind, table in TABLES.items()
)

CHECKS = {
    "duplicate_install": _DUPLICATE_INSTALLS,
    "foreign_reference": _FOREIGN_REFERENCES,
    "current_version_elsewhere": _CURRENT_VERSION_OWNER,
    "version_gap": _VERSION_GAPS,
    "release_mismatch": _RELEASE_MISMATCH,
    "base_mismatch": _BASES,
    "content_hash": _CONTENT_HASHES,
    "release_items": _RELEASE_ITEMS,
    "personal_orgs": _PERSONAL_ORGS,
    "append_only": _APPEND_ONLY,
    "unscheduled_next_run": _UNSCHEDULED_NEXT_RUN,
}


async def check(session: AsyncSession) -> list[Violation]:
    """Every violation of every invariant, read-only."""
    found: list[Violation] = []
    for name, sql in CHECKS.items():
        rows: Any = await session.execute(text(sql))
        found += [
            Violation(check=name, organization_id=str(org) if org else None, detail=detail)
            for org, detail in rows
        ]
    return found
