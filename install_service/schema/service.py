"""An organization's own schema, item by item: what the API, the command line and the console
read and write when an organization customizes what it installed, or adds its own.

- **Read.** Each row is rebuilt in its template-document shape (`install_content`, the
  same shape releases and merges use), with its provenance (`own`, `managed` by an install of
  a template, `detached` from one), whether a managed row differs from what was mirrored
  (`edited`) and its ETag, the hash of that content the database keeps on the row (`ETAG`).
- **Write.** A create takes a whole item; an edit a JSON merge patch (RFC 7396) of it. Either
  is validated exactly as an item of a template document (`documents.parse_item`), its
  references resolved among the organization's active rows; a relationship type made the
  inverse of one with no inverse is paired with it (and the old partner unpaired), as a
  document's pair would read. A watcher's or classifier's changed versioned content appends
  a version (the database refuses to rewrite one); a watcher's schedule change gets its next
  run time again. An edit of a managed row is a local edit: drift shows it, the next upgrade
  merges it. Archiving is for the organization's own items (a managed one is detached from
  its install first), and refuses an item another active item refers to.
- **Every write** locks the organization's schema (its row) and the item's row, honours
  `If-Match`, checks in the database that the row now reads as the validated item, and
  records one audit row and one change-feed event (`schema.item_created|item_updated|
  item_archived`) in the caller's transaction. A write that changes nothing records nothing.

Nothing here commits.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from install_service import engine
from install_service.actor import Actor, OrgAccess
from install_service.audit import service as audit
from install_service.db.session import statement
from install_service.errors import (
    Conflict,
    Invalid,
    NotFound,
    PreconditionFailed,
    SchemaItemInvalid,
)
from install_service.events import outbox
from install_service.orgs.service import require_manager, resolve_org
from install_service.pagination import Keyset, PageRequest
from install_service.schema.schemas import (
    PATHS,
    Provenance,
    SchemaItem,
    SchemaItemPage,
    SchemaWrite,
)
from install_service.templates import documents
from install_service.watchers import schedules as watcher_schedules

# The ETag of an item: the hash of its content in its template-document shape, the one the
# database keeps on every row (`content_hash`, whatever wrote the row). Every read and every
# `If-Match` check goes through this one expression.
ETAG = "r.content_hash"

_VERSIONS = engine.VERSION_TABLES
# Versioned content: a change to any of these appends a version (as an upgrade does).
_VERSIONED = {kind: tuple(fields.items()) for kind, fields in engine.VERSIONED.items()}
# The row's own columns: (column, document field, type or the kind a reference points at).
_COLUMNS = {
    "entity_types": (
        ("name", "name", "text"),
        ("description", "description", "text"),
        ("icon", "icon", "text"),
        ("color", "color", "text"),
        ("metadata_schema", "metadata_schema", "jsonb"),
        ("event_kinds", "event_kinds", "jsonb"),
    ),
    "relationship_types": (
        ("name", "name", "text"),
        ("description", "description", "text"),
        ("metadata_schema", "metadata_schema", "jsonb"),
        ("is_symmetric", "is_symmetric", "boolean"),
        ("inverse_type_id", "inverse", "relationship_types"),
    ),
    "classifiers": (
        ("name", "name", "text"),
        ("description", "description", "text"),
        ("attribute_key", "attribute_key", "text"),
        ("entity_type_id", "entity_type", "entity_types"),
        ("watcher_id", "watcher", "watchers"),
    ),
    "watchers": (
        ("name", "name", "text"),
        ("description", "description", "text"),
        ("schedule", "schedule", "text"),
    ),
}
CHANGE_NOTES = "edited in the organization"


def _read_sql(kind: str) -> str:
    """Items of one kind of the org `:org` (one `:slug`, or a page filtered by `:status`
    and `:template`), each with its content, ETag, provenance and current version. A row
    detached from several templates names the last it was detached from; `:template`
    finds it under each of them."""
    table = engine.TABLES[kind]
    versions = _VERSIONS.get(kind)
    version = (
        f"(SELECT v.version FROM {versions[0]} v WHERE v.id = r.current_version_id)"
        if versions
        else "CAST(NULL AS int)"
    )
    return f"""
SELECT r.slug, r.status, install_content(r) AS document, {ETAG} AS etag, r.id, r.updated_at,
       {version} AS version,
       CASE WHEN r.managed_by_template_agent_id IS NOT NULL THEN 'managed'
            WHEN cardinality(r.detached_from_template_agent_ids) > 0 THEN 'detached'
            ELSE 'own' END AS provenance,
       tor.slug AS template, mr.version AS release, inst.id AS install_id,
       r.managed_by_template_agent_id IS NOT NULL
           AND {ETAG} IS DISTINCT FROM r.mirrored_hash AS edited
FROM {table} r
LEFT JOIN agents ta
    ON ta.id = coalesce(
        r.managed_by_template_agent_id,
        r.detached_from_template_agent_ids[cardinality(r.detached_from_template_agent_ids)])
LEFT JOIN organizations tor ON tor.id = ta.organization_id
LEFT JOIN template_releases mr ON mr.id = r.mirrored_release_id
LEFT JOIN agents inst ON inst.template_agent_id = r.managed_by_template_agent_id
                     AND inst.organization_id = r.organization_id
WHERE r.organization_id = CAST(:org AS uuid) AND r.slug NOT LIKE '$%'
  AND (CAST(:slug AS text) IS NULL OR r.slug = :slug)
  AND (CAST(:status AS text) IS NULL OR r.status = :status)
  AND (CAST(:template AS text) IS NULL OR EXISTS (
        SELECT 1 FROM agents fa JOIN organizations fo ON fo.id = fa.organization_id
        WHERE fo.slug = :template
          AND (fa.id = r.managed_by_template_agent_id
               OR fa.id = ANY(r.detached_from_template_agent_ids))))
  AND (CAST(:after_0 AS text) IS NULL OR r.slug > :after_0)
ORDER BY r.slug
LIMIT :limit_plus_one"""


_READ = {kind: _read_sql(kind) for kind in engine.KINDS}
_KEYSETS = {kind: Keyset(f"schema:{kind}", (str,)) for kind in engine.KINDS}


def _item(kind: str, row: Any) -> SchemaItem:
    return SchemaItem(
        kind=kind,  # type: ignore[arg-type]
        slug=row.slug,
        status=row.status,
        provenance=Provenance(
            type=row.provenance,
            template=row.template,
            release=row.release,
            install_id=row.install_id,
        ),
        edited=row.edited,
        etag=row.etag,
        version=row.version,
        updated_at=row.updated_at,
        document=row.document,
    )


async def list_items(
    session: AsyncSession,
    actor: Actor,
    org_ref: str,
    kind: str,
    page: PageRequest,
    *,
    status: str | None = None,
    template: str | None = None,
) -> SchemaItemPage:
    """The items of one kind in an org the actor is a member of, by slug; only `status`
    ones, only those managed by or detached from `template`, if given."""
    org = await resolve_org(session, actor, org_ref)
    keyset = _KEYSETS[kind]
    if template is not None and "\x00" in template:  # no template's slug holds NUL
        return SchemaItemPage(items=[], next_cursor=None)
    rows = await session.execute(
        statement(_READ[kind]),
        {"org": org.id, "slug": None, "status": status, "template": template} | keyset.params(page),
    )
    found = [_item(kind, r) for r in rows]
    return keyset.page(SchemaItemPage, found, page, lambda i: (i.slug,))


async def _find(session: AsyncSession, org: OrgAccess, kind: str, slug: str) -> SchemaItem | None:
    if "\x00" in slug:  # no slug holds NUL (PostgreSQL refuses it)
        return None
    row = (
        await session.execute(
            statement(_READ[kind]),
            {
                "org": org.id,
                "slug": slug,
                "status": None,
                "template": None,
                "after_0": None,
                "limit_plus_one": 1,
            },
        )
    ).first()
    return None if row is None else _item(kind, row)


def noun(kind: str) -> str:
    """One item of `kind` in words: `entity type`, `watcher`, ..."""
    return PATHS[kind].replace("-", " ").removesuffix("s")


async def _found(session: AsyncSession, org: OrgAccess, kind: str, slug: str) -> SchemaItem:
    item = await _find(session, org, kind, slug)
    if item is None:
        raise NotFound(f"{org.slug!r} has no {noun(kind)} {slug!r}", code="item_not_found")
    return item


async def get_item(
    session: AsyncSession, actor: Actor, org_ref: str, kind: str, slug: str
) -> SchemaItem:
    """One item of an org the actor is a member of."""
    org = await resolve_org(session, actor, org_ref)
    return await _found(session, org, kind, slug)


def merge_patch(target: Any, patch: Any) -> Any:
    """`patch` applied to `target` as RFC 7396 says: objects merge key by key, `null`
    removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def etag_matches(if_match: str | None, etag: str) -> bool:
    """Whether an `If-Match` value (absent, `*`, or a list of entity tags, quoted or not)
    admits the current `etag`. Weak tags never match (RFC 9110 strong comparison)."""
    if if_match is None:
        return True
    tags = [tag.strip() for tag in if_match.split(",")]
    return any(tag == "*" or tag.strip('"') == etag for tag in tags if not tag.startswith("W/"))


# --- writing -------------------------------------------------------------------------

_KNOWN_SQL = """
SELECT 'entity_types' AS kind, slug, CAST(NULL AS text) AS inverse, false AS symmetric
FROM entity_types WHERE organization_id = CAST(:org AS uuid) AND status = 'active'
UNION ALL
SELECT 'watchers', slug, NULL, false
FROM watchers WHERE organization_id = CAST(:org AS uuid) AND status = 'active'
UNION ALL
SELECT 'relationship_types', r.slug, i.slug, r.is_symmetric
FROM entity_relationship_types r
LEFT JOIN entity_relationship_types i ON i.id = r.inverse_type_id
WHERE r.organization_id = CAST(:org AS uuid) AND r.status = 'active'"""


async def _known(session: AsyncSession, org: OrgAccess) -> documents.Known:
    """What the org's items may refer to: its active rows."""
    rows = (await session.execute(statement(_KNOWN_SQL), {"org": org.id})).all()
    return documents.Known(
        entity_types={r.slug for r in rows if r.kind == "entity_types"},
        watchers={r.slug for r in rows if r.kind == "watchers"},
        relationship_types={
            r.slug: (r.inverse, r.symmetric) for r in rows if r.kind == "relationship_types"
        },
    )


async def _writable(session: AsyncSession, actor: Actor, org_ref: str) -> OrgAccess:
    """The org, if the actor may change its schema (owners and admins), with its schema
    locked until the transaction ends: writes to one org's schema take turns, so what a
    write checked (references, an item's users) holds when it commits. A template's own
    organization changes by publishing only."""
    org = await resolve_org(session, actor, org_ref)
    require_manager(actor, org)
    is_template = await session.scalar(
        text("""
            SELECT EXISTS (SELECT 1 FROM agents a WHERE a.organization_id = o.id AND a.is_template)
            FROM organizations o WHERE o.id = :org FOR NO KEY UPDATE OF o"""),
        {"org": org.id},
    )
    if is_template:
        raise Invalid(
            f"{org.slug!r} is a template's organization: its schema changes by publishing "
            "a release of the template",
            code="template_org_read_only",
        )
    return org


def _params(
    org: OrgAccess, kind: str, row_id: uuid.UUID, content: dict[str, Any]
) -> dict[str, Any]:
    """Bind parameters of the write statements: jsonb values as JSON text."""
    params: dict[str, Any] = {"org": org.id, "id": row_id, "slug": content["slug"]}
    fields = [(f, t) for _, f, t in _COLUMNS[kind]] + list(_VERSIONED.get(kind, ()))
    for field, sql_type in fields:
        value = content[field]
        params[field] = msgspec.json.encode(value).decode() if sql_type == "jsonb" else value
    return params


def _value(field: str, sql_type: str) -> str:
    if sql_type in engine.TABLES:
        return f"""(SELECT s.id FROM {engine.TABLES[sql_type]} s
                    WHERE s.organization_id = CAST(:org AS uuid)
                      AND s.slug = CAST(:{field} AS text))"""
    return f"CAST(:{field} AS {sql_type})"


def _insert_sql(kind: str) -> str:
    columns = ", ".join(c for c, _, _ in _COLUMNS[kind])
    values = ", ".join(_value(f, t) for _, f, t in _COLUMNS[kind])
    return f"""
INSERT INTO {engine.TABLES[kind]} AS t (id, organization_id, slug, {columns})
VALUES (CAST(:id AS uuid), CAST(:org AS uuid), :slug, {values})
ON CONFLICT (organization_id, slug) DO NOTHING
RETURNING t.id"""


def _update_sql(kind: str) -> str:
    sets = ", ".join(f"{c} = {_value(f, t)}" for c, f, t in _COLUMNS[kind])
    return f"""
UPDATE {engine.TABLES[kind]} SET {sets}, updated_at = now()
WHERE id = CAST(:id AS uuid)
RETURNING id"""


def _version_sql(kind: str) -> str:
    """Append a version when the versioned content differs from the current version's (or
    there is none), and make it current; returns the new version's id, if any."""
    versions, owner = _VERSIONS[kind]
    fields = _VERSIONED[kind]
    names = ", ".join(f for f, _ in fields)
    values = ", ".join(f"CAST(:{f} AS {t})" for f, t in fields)
    extra, extra_values = (
        (", name, change_notes", ", CAST(:name AS text), CAST(:change_notes AS text)")
        if kind == "watchers"
        else ("", "")
    )
    table = engine.TABLES[kind]
    return f"""
WITH current AS (
    SELECT {", ".join(f"v.{f}" for f, _ in fields)}
    FROM {table} t JOIN {versions} v ON v.id = t.current_version_id
    WHERE t.id = CAST(:id AS uuid)),
appended AS (
    INSERT INTO {versions} (organization_id, {owner}, version, {names}{extra})
    SELECT CAST(:org AS uuid), CAST(:id AS uuid),
           coalesce((SELECT max(x.version) FROM {versions} x
                     WHERE x.{owner} = CAST(:id AS uuid)), 0) + 1,
           {values}{extra_values}
    WHERE NOT EXISTS (SELECT 1 FROM current c WHERE ROW({", ".join(f"c.{f}" for f, _ in fields)})
                                                    IS NOT DISTINCT FROM ROW({values}))
    RETURNING id)
UPDATE {table} SET current_version_id = a.id
FROM appended a WHERE {table}.id = CAST(:id AS uuid)
RETURNING a.id"""


# A relationship type's rules become exactly the item's, by slug.
_RULES_SQL = """
WITH wanted AS (
    SELECT s.id AS src, g.id AS tgt
    FROM unnest(CAST(:sources AS text[]), CAST(:targets AS text[])) AS w(source, target)
    JOIN entity_types s ON s.organization_id = CAST(:org AS uuid) AND s.slug = w.source
    JOIN entity_types g ON g.organization_id = CAST(:org AS uuid) AND g.slug = w.target),
stale AS (
    DELETE FROM entity_relationship_type_rules x
    WHERE x.relationship_type_id = CAST(:id AS uuid)
      AND NOT EXISTS (SELECT 1 FROM wanted w WHERE w.src = x.source_entity_type_id
                                               AND w.tgt = x.target_entity_type_id)
    RETURNING 1)
INSERT INTO entity_relationship_type_rules
    (organization_id, relationship_type_id, source_entity_type_id, target_entity_type_id)
SELECT CAST(:org AS uuid), CAST(:id AS uuid), src, tgt FROM wanted
ON CONFLICT DO NOTHING"""

# The inverse is a pair: the new partner (whose inverse was empty) points back, and a former
# partner that pointed here points nowhere. Returns the partners changed.
_PARTNERS_SQL = """
WITH paired AS (
    UPDATE entity_relationship_types SET inverse_type_id = CAST(:id AS uuid), updated_at = now()
    WHERE organization_id = CAST(:org AS uuid) AND slug = CAST(:inverse AS text)
      AND inverse_type_id IS NULL AND id <> CAST(:id AS uuid)
    RETURNING slug),
unpaired AS (
    UPDATE entity_relationship_types SET inverse_type_id = NULL, updated_at = now()
    WHERE organization_id = CAST(:org AS uuid) AND inverse_type_id = CAST(:id AS uuid)
      AND slug IS DISTINCT FROM CAST(:inverse AS text) AND id <> CAST(:id AS uuid)
    RETURNING slug)
SELECT slug FROM paired UNION ALL SELECT slug FROM unpaired ORDER BY 1"""

# The active items that refer to row `:id` of kind `:kind`: archiving it would leave them
# pointing at an archived row.
_USERS_SQL = """
SELECT DISTINCT kind, slug FROM (
    SELECT 'relationship_types' AS kind, t.slug
    FROM entity_relationship_type_rules r
    JOIN entity_relationship_types t ON t.id = r.relationship_type_id
    WHERE :kind = 'entity_types' AND t.status = 'active'
      AND CAST(:id AS uuid) IN (r.source_entity_type_id, r.target_entity_type_id)
    UNION ALL
    SELECT 'classifiers', c.slug FROM event_classifiers c
    WHERE c.organization_id = CAST(:org AS uuid) AND c.status = 'active'
      AND ((:kind = 'entity_types' AND c.entity_type_id = CAST(:id AS uuid))
           OR (:kind = 'watchers' AND c.watcher_id = CAST(:id AS uuid)))
    UNION ALL
    SELECT 'relationship_types', t.slug FROM entity_relationship_types t
    WHERE :kind = 'relationship_types' AND t.organization_id = CAST(:org AS uuid)
      AND t.status = 'active' AND t.inverse_type_id = CAST(:id AS uuid)
      AND t.id <> CAST(:id AS uuid)) used
ORDER BY kind, slug"""

_INSERT = {kind: _insert_sql(kind) for kind in engine.KINDS}
_UPDATE = {kind: _update_sql(kind) for kind in engine.KINDS}
_VERSION = {kind: _version_sql(kind) for kind in _VERSIONS}


async def _write(
    session: AsyncSession,
    org: OrgAccess,
    kind: str,
    row_id: uuid.UUID,
    content: dict[str, Any],
    *,
    create: bool,
) -> list[str]:
    """Write the validated `content` into row `row_id` (made when `create`); the slugs of
    other relationship types it paired or unpaired."""
    params = _params(org, kind, row_id, content)
    written = await session.scalar(statement(_INSERT[kind] if create else _UPDATE[kind]), params)
    if written is None:
        raise _exists_conflict(org, kind, content["slug"])
    partners: list[str] = []
    if kind in _VERSION:
        await session.execute(statement(_VERSION[kind]), {**params, "change_notes": CHANGE_NOTES})
    if kind == "relationship_types":
        await session.execute(
            statement(_RULES_SQL),
            {
                "org": org.id,
                "id": row_id,
                "sources": [r["source"] for r in content["rules"]],
                "targets": [r["target"] for r in content["rules"]],
            },
        )
        found = await session.scalars(
            statement(_PARTNERS_SQL), {"org": org.id, "id": row_id, "inverse": content["inverse"]}
        )
        partners = list(found)
    if kind == "watchers":
        await watcher_schedules.schedule(session, org.id)
    return partners


async def _verified(
    session: AsyncSession, org: OrgAccess, kind: str, content: dict[str, Any]
) -> SchemaItem:
    """The item as written, which must read as the validated content: a reference that no
    longer resolves, or a row changed under the write, rolls the whole write back."""
    item = await _found(session, org, kind, content["slug"])
    if item.document != content:
        raise Conflict(
            f"the organization's schema changed while {noun(kind)} {content['slug']!r} was "
            "written; nothing was written, retry",
            code="concurrent_change",
        )
    return item


async def create_item(
    session: AsyncSession, actor: Actor, org_ref: str, kind: str, document: Any
) -> SchemaWrite:
    """Author a new item in the org (owners and admins). A slug the org already has for
    this kind, whatever the row's status or provenance, is a `Conflict`."""
    org = await _writable(session, actor, org_ref)
    slug = document.get("slug") if isinstance(document, dict) else None
    if isinstance(slug, str) and "\x00" not in slug and await _exists(session, org, kind, slug):
        raise _exists_conflict(org, kind, slug)
    parsed = documents.parse_item(kind, document, await _known(session, org))
    content = documents.item_content(parsed)
    partners = await _write(session, org, kind, uuid.uuid4(), content, create=True)
    item = await _verified(session, org, kind, content)
    await _record(session, actor, org, item, "created", partners=partners, previous=None)
    return SchemaWrite(item=item, changed=True)


def _exists_conflict(org: OrgAccess, kind: str, slug: str) -> Conflict:
    return Conflict(
        f"{org.slug!r} already has {noun(kind)} {slug!r} (active or archived, its own or a "
        "template's); edit it, or choose another slug",
        code="item_exists",
    )


async def _exists(session: AsyncSession, org: OrgAccess, kind: str, slug: str) -> bool:
    return bool(
        await session.scalar(
            text(
                f"SELECT EXISTS (SELECT 1 FROM {engine.TABLES[kind]} "
                "WHERE organization_id = :org AND slug = :slug)"
            ),
            {"org": org.id, "slug": slug},
        )
    )


async def _locked(
    session: AsyncSession, org: OrgAccess, kind: str, slug: str, if_match: str | None
) -> SchemaItem:
    """The item, its row locked until the transaction ends, if `If-Match` admits it."""
    await session.execute(
        text(
            f"SELECT 1 FROM {engine.TABLES[kind]} "
            "WHERE organization_id = :org AND slug = :slug FOR UPDATE"
        ),
        {"org": org.id, "slug": slug.replace("\x00", "")},
    )
    item = await _found(session, org, kind, slug)
    if not etag_matches(if_match, item.etag):
        raise PreconditionFailed(
            f'{noun(kind)} {slug!r} changed since you read it (its ETag is now "{item.etag}"); '
            "read it again and reapply your change",
            code="etag_mismatch",
        )
    return item


async def update_item(
    session: AsyncSession,
    actor: Actor,
    org_ref: str,
    kind: str,
    slug: str,
    patch: Any,
    *,
    if_match: str | None = None,
) -> SchemaWrite:
    """Edit an item with a JSON merge patch of its document (owners and admins). An edit
    that leaves the item as it is writes nothing."""
    org = await _writable(session, actor, org_ref)
    current = await _locked(session, org, kind, slug, if_match)
    if current.status != "active":
        raise Conflict(
            f"{noun(kind)} {slug!r} is archived; an archived item is not edited",
            code="item_archived",
        )
    patched = merge_patch(current.document, patch)
    if patched == current.document:
        return SchemaWrite(item=current, changed=False)
    problems: list[dict[str, str]] = []
    if not isinstance(patched, dict) or patched.get("slug") != slug:
        problems.append(
            {"path": "$.slug", "message": "an item's slug does not change; create another item"}
        )
        if isinstance(patched, dict):
            patched = {**patched, "slug": slug}
    try:
        parsed = documents.parse_item(kind, patched, await _known(session, org))
    except SchemaItemInvalid as refused:
        problems += refused.problems
    if problems:
        raise SchemaItemInvalid(problems)
    content = documents.item_content(parsed)
    if content == current.document:
        return SchemaWrite(item=current, changed=False)
    row_id = await _row_id(session, org, kind, slug)
    partners = await _write(session, org, kind, row_id, content, create=False)
    item = await _verified(session, org, kind, content)
    await _record(session, actor, org, item, "updated", partners=partners, previous=current)
    return SchemaWrite(item=item, changed=True)


async def _row_id(session: AsyncSession, org: OrgAccess, kind: str, slug: str) -> uuid.UUID:
    row_id: uuid.UUID = await session.scalar(
        text(f"SELECT id FROM {engine.TABLES[kind]} WHERE organization_id = :org AND slug = :slug"),
        {"org": org.id, "slug": slug},
    )
    return row_id


async def archive_item(
    session: AsyncSession,
    actor: Actor,
    org_ref: str,
    kind: str,
    slug: str,
    *,
    if_match: str | None = None,
) -> SchemaWrite:
    """Archive an item of the organization's own (or detached from a template; owners and
    admins); it keeps its slug and versions. An item a template's install manages is a
    `Conflict` (its install keeps it as the release has it: detach it first), and so is an
    item other active items refer to, naming them. Archiving an archived item writes
    nothing."""
    org = await _writable(session, actor, org_ref)
    current = await _locked(session, org, kind, slug, if_match)
    if current.status == "archived":
        return SchemaWrite(item=current, changed=False)
    if current.provenance.type == "managed":
        raise Conflict(
            f"{noun(kind)} {slug!r} is managed by {current.provenance.template}'s install, "
            "which keeps its rows as the release has them: detach it from the install "
            "first (it is then the organization's own), or uninstall the template",
            code="item_managed",
            install_id=str(current.provenance.install_id),
        )
    row_id = await _row_id(session, org, kind, slug)
    users = (
        await session.execute(statement(_USERS_SQL), {"org": org.id, "id": row_id, "kind": kind})
    ).all()
    if users:
        named = [{"kind": u.kind, "slug": u.slug} for u in users]
        raise Conflict(
            f"{noun(kind)} {slug!r} is referred to by "
            + ", ".join(f"{noun(u.kind)} {u.slug!r}" for u in users)
            + "; change or archive those first",
            code="item_in_use",
            items=named,
        )
    await session.execute(
        text(
            f"UPDATE {engine.TABLES[kind]} "
            "SET status = 'archived', updated_at = now() WHERE id = :id"
        ),
        {"id": row_id},
    )
    item = await _found(session, org, kind, slug)
    await _record(session, actor, org, item, "archived", partners=[], previous=current)
    return SchemaWrite(item=item, changed=True)


_EVENT_TYPES = {
    "created": "schema.item_created",
    "updated": "schema.item_updated",
    "archived": "schema.item_archived",
}

# The event and the audit row of one write, in one statement; the audit row keeps every
# path the write changed with both values (`install_diff`, as drift names paths).
_AUDIT_DETAILS = """CAST(:audit_details AS jsonb) || jsonb_build_object('paths', (
    SELECT coalesce(jsonb_agg(jsonb_build_object('path', d.path, 'old', d.a_value,
                                                 'new', d.b_value)
                              ORDER BY d.path COLLATE "C"), '[]'::jsonb)
    FROM install_diff(CAST(:previous AS jsonb), CAST(:document AS jsonb)) d))"""
_RECORD_SQL = f"""
WITH {outbox.ONE_EVENT_SOURCE},
{outbox.EVENTS_CTES}
{audit.AUDIT_INSERT}
SELECT {audit.AUDIT_VALUES.replace("CAST(:audit_details AS jsonb)", _AUDIT_DETAILS)}"""


async def _record(
    session: AsyncSession,
    actor: Actor,
    org: OrgAccess,
    item: SchemaItem,
    action: str,
    *,
    partners: list[str],
    previous: SchemaItem | None,
) -> None:
    """The write's change-feed event (the item with its kind, slug and version now, any
    paired or unpaired partner, and the item's provenance) and its audit row."""
    kind, slug = item.kind, item.slug
    provenance = msgspec.to_builtins(item.provenance)
    event_type = _EVENT_TYPES[action]
    await session.execute(
        statement(_RECORD_SQL),
        {
            **outbox.event_params(
                organization_id=org.id,
                install_id=item.provenance.install_id,
                type=event_type,
                template=item.provenance.template,
                from_release=None,
                to_release=None,
                items=[
                    outbox.Item(kind=kind, slug=slug, action=action),
                    *(outbox.Item(kind=kind, slug=p, action="updated") for p in partners),
                ],
                extra={"provenance": provenance},
            ),
            **audit.audit_params(
                actor=actor.user_id,
                action=event_type,
                target_type="schema_item",
                target_id=f"{kind}:{slug}",
                organization_id=org.id,
                details={
                    "kind": kind,
                    "slug": slug,
                    "provenance": provenance,
                    "version": item.version,
                    "partners": partners,
                },
            ),
            "previous": msgspec.json.encode(previous.document if previous else None).decode(),
            "document": msgspec.json.encode(item.document).decode(),
        },
    )
