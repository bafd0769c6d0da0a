"""Template dependencies: a release may require releases of other templates and reference
their items as `<template>:<slug>`.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 11:00

Reviewed by hand. A qualified reference names the template that provides the item; in an org
the item is the org's row with that slug (slugs are unique per org and kind), so what a row
*is* does not depend on which template a reference came from:

- `install_unqualified(kind, item)` is an item with every reference as a plain slug (rules
  sorted again as content sorts them). A release item's `content_hash` is the hash of that
  form, which is what a mirrored row's content is; `item` keeps the document's form for
  reading. For items without qualified references (every release before this revision)
  nothing changes, so no hash moves.
- A template org's rows reference the rows of the template orgs they require: a reference
  from one template org into another shows qualified, `<template>:<slug>` (a template org's
  slug is its template's), so a template org's rows equal its document as written (any other
  reference into another org still shows as one that can never equal an item). Rules are
  ordered by their references as shown, which for references inside the org is as before.
- `template_release_requirements`: each release's requirements (the template, the minimum
  version, the release it was checked against at publish) and `template_release_references`:
  each item of a requirement the release references, and from which of its own items. Both
  are written once with the release and never change.

Downgrading drops both tables and restores the functions; releases with requirements keep
their snapshots (an older service reads their references as unknown slugs).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BARE = "regexp_replace({}, '^.*:', '')"

UNQUALIFIED = f"""
    CREATE FUNCTION install_unqualified(kind text, item jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE RETURN CASE
        WHEN kind = 'relationship_types' THEN item || jsonb_build_object(
            'inverse', {BARE.format("item->>'inverse'")},
            'rules', (SELECT coalesce(jsonb_agg(jsonb_build_object('source', r.source,
                                                                   'target', r.target)
                                                ORDER BY r.source COLLATE "C",
                                                         r.target COLLATE "C"), '[]'::jsonb)
                      FROM (SELECT {BARE.format("x->>'source'")} AS source,
                                   {BARE.format("x->>'target'")} AS target
                            FROM jsonb_array_elements(item->'rules') x) r))
        WHEN kind = 'classifiers' THEN item || jsonb_build_object(
            'entity_type', {BARE.format("item->>'entity_type'")},
            'watcher', {BARE.format("item->>'watcher'")})
        ELSE item END"""


def _items_of(hashed: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION template_release_items_from_snapshot() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO template_release_items (release_id, kind, slug, item, content_hash,
                                                policies)
            SELECT NEW.id, k.kind, i.item->>'slug', i.item, install_content_hash({hashed}),
                   CASE k.kind WHEN 'watchers' THEN '{{"schedule": "tenant"}}'::jsonb
                               ELSE '{{}}'::jsonb END
                   || coalesce(NEW.snapshot -> 'policies' -> k.kind, '{{}}'::jsonb)
                   || coalesce(NEW.snapshot -> 'item_policies' -> k.kind
                               -> (i.item->>'slug'), '{{}}'::jsonb)
            FROM unnest(ARRAY['entity_types', 'relationship_types', 'classifiers', 'watchers'])
                 AS k(kind)
            CROSS JOIN LATERAL jsonb_array_elements(NEW.snapshot -> k.kind) AS i(item);
            RETURN NULL;
        END
        $$"""


def _ref_slug(alias: str, *, between_templates: bool) -> str:
    """A referenced row's slug as content shows it (see the module's docstring)."""
    other = (
        f"""
        WHEN EXISTS (SELECT 1 FROM agents a WHERE a.organization_id = {alias}.organization_id
                                              AND a.is_template)
             AND EXISTS (SELECT 1 FROM agents a WHERE a.organization_id = t.organization_id
                                                  AND a.is_template)
            THEN (SELECT q.slug FROM organizations q WHERE q.id = {alias}.organization_id)
                 || ':' || {alias}.slug"""
        if between_templates
        else ""
    )
    return (
        f"CASE WHEN {alias}.organization_id = t.organization_id THEN {alias}.slug {other}"
        f"\n        ELSE '!other-organization:' || {alias}.slug END"
    )


def _functions(between_templates: bool) -> list[str]:
    def ref(alias: str) -> str:
        return _ref_slug(alias, between_templates=between_templates)

    rt = "entity_relationship_types"
    order = (
        f'{ref("s")} COLLATE "C", {ref("g")} COLLATE "C"'
        if between_templates
        else 's.slug COLLATE "C", g.slug COLLATE "C"'
    )
    return [
        f"""
    CREATE OR REPLACE FUNCTION install_rules(ids uuid[])
    RETURNS TABLE (relationship_type_id uuid, rules jsonb) LANGUAGE sql STABLE AS $$
        SELECT r.relationship_type_id,
               jsonb_agg(jsonb_build_object('source', {ref("s")}, 'target', {ref("g")})
                         ORDER BY {order})
        FROM entity_relationship_type_rules r
        JOIN entity_relationship_types t ON t.id = r.relationship_type_id
        JOIN entity_types s ON s.id = r.source_entity_type_id
        JOIN entity_types g ON g.id = r.target_entity_type_id
        WHERE r.relationship_type_id = ANY(ids)
        GROUP BY r.relationship_type_id
    $$""",
        f"""
    CREATE OR REPLACE FUNCTION install_content(t {rt}, rules jsonb) RETURNS jsonb
    LANGUAGE sql STABLE RETURN jsonb_build_object(
        'slug', t.slug, 'name', t.name, 'description', t.description,
        'metadata_schema', t.metadata_schema, 'is_symmetric', t.is_symmetric,
        'inverse', (SELECT {ref("i")} FROM {rt} i WHERE i.id = t.inverse_type_id),
        'rules', coalesce(rules, '[]'::jsonb))""",
        f"""
    CREATE OR REPLACE FUNCTION install_content(t event_classifiers) RETURNS jsonb
    LANGUAGE sql STABLE RETURN jsonb_build_object(
        'slug', t.slug, 'name', t.name, 'description', t.description,
        'attribute_key', t.attribute_key,
        'entity_type', (SELECT {ref("e")} FROM entity_types e WHERE e.id = t.entity_type_id),
        'watcher', (SELECT {ref("w")} FROM watchers w WHERE w.id = t.watcher_id))
    || coalesce(
        (SELECT jsonb_build_object('attribute_values', v.attribute_values,
                                   'fallback_value', v.fallback_value,
                                   'extraction_config', v.extraction_config)
         FROM event_classifier_versions v
         WHERE v.id = t.current_version_id AND v.classifier_id = t.id),
        jsonb_build_object('attribute_values', NULL, 'fallback_value', NULL,
                           'extraction_config', NULL))""",
    ]


def upgrade() -> None:
    op.execute(UNQUALIFIED)
    op.execute(_items_of("install_unqualified(k.kind, i.item)"))
    for function in _functions(between_templates=True):
        op.execute(function)
    op.create_table(
        "template_release_requirements",
        sa.Column("release_id", sa.UUID(), sa.ForeignKey("template_releases.id"), nullable=False),
        sa.Column(
            "required_template_agent_id", sa.UUID(), sa.ForeignKey("agents.id"), nullable=False
        ),
        sa.Column("min_version", sa.Integer(), nullable=True),
        sa.Column(
            "checked_release_id",
            sa.UUID(),
            sa.ForeignKey("template_releases.id"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("release_id", "required_template_agent_id"),
    )
    op.create_index(
        "ix_template_release_requirements_required",
        "template_release_requirements",
        ["required_template_agent_id"],
    )
    op.create_table(
        "template_release_references",
        sa.Column("release_id", sa.UUID(), sa.ForeignKey("template_releases.id"), nullable=False),
        sa.Column(
            "required_template_agent_id", sa.UUID(), sa.ForeignKey("agents.id"), nullable=False
        ),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("slug", sa.Text(), nullable=False),
        sa.Column("item_kind", sa.Text(), nullable=False),
        sa.Column("item_slug", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint(
            "release_id", "required_template_agent_id", "kind", "slug", "item_kind", "item_slug"
        ),
    )
    for table in ("template_release_requirements", "template_release_references"):
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION refuse_append_only_change()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION refuse_append_only_change()"
        )


def downgrade() -> None:
    op.drop_table("template_release_references")
    op.drop_table("template_release_requirements")
    for function in _functions(between_templates=False):
        op.execute(function)
    op.execute(_items_of("i.item"))
    op.execute("DROP FUNCTION install_unqualified(text, jsonb)")
