"""Field-level three-way merge: the merge and diff functions, field policies, detached rows.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 08:00

Reviewed by hand. This revision installs the one definition of a path, a diff and a merge,
used by every statement that needs them (plan, apply, verify, drift, release diffs, db check,
and the fleet dry run that plans many installs in one statement):

- `install_pointer(path, key)`: the RFC 6901 JSON Pointer of `key` under `path` (`~` is
  `~0`, `/` is `~1`); the empty string is the whole item, `/name` a field.
- `install_diff(a, b)`: every path where two items differ, recursing into objects (arrays and
  scalars are atomic), with both values (SQL NULL: the key is absent).
- `install_merge(base, local, new, policies, resolutions, otherwise)`: the three-way merge of
  an item, per top-level field (never `slug`) under its policy (`merge`, `tenant`,
  `template`), recursively through objects, `rules` and `event_kinds` as sets. It returns
  `{item, fields: [{path, outcome, local?}], conflicts: [path]}`; `outcome` is `merged`
  (the release's value taken), `kept_local`, `overwritten` (with the local value that was
  lost) or `conflict` (the local value stays in `item`). `resolutions` maps paths (`''`:
  the whole item) to `template` or `local`; `otherwise = 'template'` takes the release's
  value at every remaining conflict (force). A NULL `base` (adopting a row that was never
  mirrored) keeps `tenant` fields and takes the release's value everywhere else.

Release items gain `policies`, the effective field policies of each item (watchers'
`schedule` is `tenant` unless the document says otherwise), filled from the snapshot by the
same trigger that fills the items. Mirrored tables gain `detached_from_template_agent_id`:
a row an org took over from an install, which later upgrades leave alone until it is adopted.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MIRRORED = ("entity_types", "entity_relationship_types", "event_classifiers", "watchers")
HISTORY_ACTIONS = (
    "('install', 'upgrade', 'rollback', 'reinstall', 'uninstall', 'reconcile', 'detach')"
)

FUNCTIONS = (
    """
    CREATE FUNCTION install_pointer(path text, key text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN path || '/' || replace(replace(key, '~', '~0'), '/', '~1')
    """,
    # A recursive query rather than a recursive function: one statement however deep.
    """
    CREATE FUNCTION install_diff(a jsonb, b jsonb, at text DEFAULT '')
    RETURNS TABLE (path text, a_value jsonb, b_value jsonb)
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        WITH RECURSIVE walk (path, a_value, b_value) AS (
            SELECT at, a, b WHERE a IS DISTINCT FROM b
            UNION ALL
            SELECT install_pointer(w.path, k.key), w.a_value -> k.key, w.b_value -> k.key
            FROM walk w
            CROSS JOIN LATERAL (SELECT jsonb_object_keys(w.a_value)
                                UNION SELECT jsonb_object_keys(w.b_value)) AS k (key)
            WHERE jsonb_typeof(w.a_value) = 'object' AND jsonb_typeof(w.b_value) = 'object'
              AND (w.a_value -> k.key) IS DISTINCT FROM (w.b_value -> k.key))
        SELECT path, a_value, b_value FROM walk
        WHERE coalesce(jsonb_typeof(a_value), '') <> 'object'
           OR coalesce(jsonb_typeof(b_value), '') <> 'object'
        ORDER BY path COLLATE "C"
    $$
    """,
    # One entry of a merge's `fields`, as a one-element array; `local` only for `overwritten`.
    """
    CREATE FUNCTION install_outcome(path text, outcome text, local jsonb DEFAULT NULL)
    RETURNS jsonb
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN jsonb_build_array(jsonb_build_object('path', path, 'outcome', outcome)
                             || CASE WHEN outcome = 'overwritten'
                                     THEN jsonb_build_object('local', coalesce(local, 'null'))
                                     ELSE '{}'::jsonb END)
    """,
    # Whether `element` is an element of the array `arr` (jsonb equality; `@>` would also match
    # an object element that merely contains `element`).
    """
    CREATE FUNCTION install_has(arr jsonb, element jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(arr, '[]'::jsonb)) AS x(item)
                   WHERE x.item = element)
    """,
    # One path of a merge. `here` is the org's value, `there` the release's; SQL NULL is an
    # absent key, JSON null a value.
    """
    CREATE FUNCTION install_merge_value(
        at text, base jsonb, here jsonb, there jsonb, as_set boolean, resolutions jsonb,
        otherwise text, OUT merged jsonb, OUT fields jsonb)
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
    DECLARE
        take text := resolutions ->> at;
        k text;
        sub_merged jsonb;
        sub_fields jsonb;
    BEGIN
        fields := '[]';
        IF take = 'local' THEN
            merged := here;
            IF here IS DISTINCT FROM there THEN
                fields := install_outcome(at, 'kept_local');
            END IF;
            RETURN;
        ELSIF take = 'template' THEN
            merged := there;
            IF here IS DISTINCT FROM there THEN
                fields := install_outcome(at, 'overwritten', here);
            END IF;
            RETURN;
        END IF;
        IF here IS NOT DISTINCT FROM base THEN  -- only the release changed it, if anyone
            merged := there;
            IF there IS DISTINCT FROM base THEN
                fields := install_outcome(at, 'merged');
            END IF;
            RETURN;
        END IF;
        IF there IS NOT DISTINCT FROM base THEN  -- only the org changed it
            merged := here;
            fields := install_outcome(at, 'kept_local');
            RETURN;
        END IF;
        IF there IS NOT DISTINCT FROM here THEN  -- both changed it the same way
            merged := here;
            fields := install_outcome(at, 'merged');
            RETURN;
        END IF;
        IF jsonb_typeof(here) = 'object' AND jsonb_typeof(there) = 'object'
           AND coalesce(jsonb_typeof(base), 'object') = 'object' THEN
            merged := '{}';
            FOR k IN SELECT x FROM (SELECT jsonb_object_keys(here)
                                    UNION SELECT jsonb_object_keys(there)
                                    UNION SELECT jsonb_object_keys(coalesce(base, '{}')))
                                   AS keys(x)
                     ORDER BY x COLLATE "C" LOOP
                SELECT m.merged, m.fields INTO sub_merged, sub_fields
                FROM install_merge_value(install_pointer(at, k), base -> k, here -> k, there -> k,
                                         false, resolutions, otherwise) m;
                IF sub_merged IS NOT NULL THEN
                    merged := merged || jsonb_build_object(k, sub_merged);
                END IF;
                fields := fields || sub_fields;
            END LOOP;
            RETURN;
        END IF;
        IF as_set AND jsonb_typeof(here) = 'array' AND jsonb_typeof(there) = 'array'
           AND coalesce(jsonb_typeof(base), 'array') = 'array' THEN
            -- Removed by either side: removed; added by either side: added. The release's
            -- order first, then the org's additions; rules ({source, target}) sorted as the
            -- service writes them.
            SELECT coalesce(jsonb_agg(e ORDER BY e ->> 'source' COLLATE "C",
                                      e ->> 'target' COLLATE "C", pos), '[]'::jsonb)
            INTO merged
            FROM (SELECT e, min(pos) AS pos FROM (
                      SELECT t.e, t.pos FROM jsonb_array_elements(there) WITH ORDINALITY t(e, pos)
                      WHERE NOT (install_has(base, t.e) AND NOT install_has(here, t.e))
                      UNION ALL
                      SELECT h.e, 1000000 + h.pos
                      FROM jsonb_array_elements(here) WITH ORDINALITY h(e, pos)
                      WHERE NOT install_has(base, h.e)) kept
                  GROUP BY e) elements;
            fields := install_outcome(at, 'merged');
            RETURN;
        END IF;
        IF otherwise = 'template' THEN
            merged := there;
            fields := jsonb_build_array(
                (install_outcome(at, 'overwritten', here) -> 0) || '{"forced": true}');
        ELSE
            merged := here;
            fields := install_outcome(at, 'conflict');
        END IF;
    END
    $$
    """,
    """
    CREATE FUNCTION install_merge(
        base jsonb, here jsonb, there jsonb, policies jsonb, resolutions jsonb, otherwise text)
    RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
    DECLARE
        whole text := resolutions ->> '';
        field text;
        at text;
        policy text;
        b jsonb;
        h jsonb;
        t jsonb;
        v jsonb;
        f jsonb;
        item jsonb := jsonb_build_object('slug', coalesce(there, here) -> 'slug');
        fields jsonb := '[]';
    BEGIN
        resolutions := coalesce(resolutions, '{}');
        FOR field IN SELECT x FROM (SELECT jsonb_object_keys(coalesce(here, '{}'))
                                    UNION SELECT jsonb_object_keys(coalesce(there, '{}'))
                                    UNION SELECT jsonb_object_keys(coalesce(base, '{}')))
                                   AS keys(x)
                     WHERE x <> 'slug' ORDER BY x COLLATE "C" LOOP
            at := install_pointer('', field);
            policy := coalesce(policies ->> field, 'merge');
            b := base -> field;
            h := here -> field;
            t := there -> field;
            f := '[]';
            IF policy = 'tenant' THEN
                -- Once the org changed it, the org's value stays.
                IF base IS NULL OR h IS DISTINCT FROM b THEN
                    v := h;
                    IF h IS DISTINCT FROM t THEN
                        f := install_outcome(at, 'kept_local');
                    END IF;
                ELSE
                    v := t;
                    IF t IS DISTINCT FROM b THEN
                        f := install_outcome(at, 'merged');
                    END IF;
                END IF;
            ELSIF policy = 'template' OR base IS NULL THEN
                -- The release wins; a local value it replaces is reported with the value.
                v := t;
                IF h IS DISTINCT FROM t AND (base IS NULL OR h IS DISTINCT FROM b) THEN
                    f := install_outcome(at, 'overwritten', h);
                ELSIF t IS DISTINCT FROM b THEN
                    f := install_outcome(at, 'merged');
                END IF;
            ELSE
                SELECT m.merged, m.fields INTO v, f
                FROM install_merge_value(
                    at, b, h, t, field IN ('rules', 'event_kinds'),
                    CASE WHEN whole IS NULL THEN resolutions
                         ELSE jsonb_build_object(at, whole) || resolutions END,
                    otherwise) m;
            END IF;
            IF v IS NOT NULL THEN
                item := item || jsonb_build_object(field, v);
            END IF;
            fields := fields || f;
        END LOOP;
        RETURN jsonb_build_object(
            'item', item,
            'fields', fields,
            'conflicts', (SELECT coalesce(jsonb_agg(x -> 'path'), '[]'::jsonb)
                          FROM jsonb_array_elements(fields) x
                          WHERE x ->> 'outcome' = 'conflict'));
    END
    $$
    """,
)

# Items (without policies) and each item's effective policies, from a release's snapshot.
ITEMS_OF = """
            INSERT INTO template_release_items (release_id, kind, slug, item, content_hash,
                                                policies)
            SELECT {release}.id, k.kind, i.item->>'slug', i.item, install_content_hash(i.item),
                   CASE k.kind WHEN 'watchers' THEN '{{"schedule": "tenant"}}'::jsonb
                               ELSE '{{}}'::jsonb END
                   || coalesce({release}.snapshot -> 'policies' -> k.kind, '{{}}'::jsonb)
                   || coalesce({release}.snapshot -> 'item_policies' -> k.kind
                               -> (i.item->>'slug'), '{{}}'::jsonb)
            FROM unnest(ARRAY['entity_types', 'relationship_types', 'classifiers', 'watchers'])
                 AS k(kind)
            CROSS JOIN LATERAL jsonb_array_elements({release}.snapshot -> k.kind) AS i(item)"""

OLD_ITEMS_OF = """
            INSERT INTO template_release_items (release_id, kind, slug, item, content_hash)
            SELECT NEW.id, k.kind, i.item->>'slug', i.item, install_content_hash(i.item)
            FROM unnest(ARRAY['entity_types', 'relationship_types', 'classifiers',
                                       'watchers'])
                 AS k(kind)
            CROSS JOIN LATERAL jsonb_array_elements(NEW.snapshot -> k.kind) AS i(item)"""


def _items_trigger(body: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION template_release_items_from_snapshot() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            {body};
            RETURN NULL;
        END
        $$
        """


def upgrade() -> None:
    for statement in FUNCTIONS:
        op.execute(statement)
    op.add_column(
        "template_release_items",
        sa.Column(
            "policies",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )
    # Releases cut before this revision have no policies: the defaults hold for them.
    op.execute(
        "ALTER TABLE template_release_items DISABLE TRIGGER template_release_items_append_only"
    )
    op.execute(
        """UPDATE template_release_items SET policies = '{"schedule": "tenant"}'
           WHERE kind = 'watchers'"""
    )
    op.execute(
        "ALTER TABLE template_release_items ENABLE TRIGGER template_release_items_append_only"
    )
    op.execute(_items_trigger(ITEMS_OF.format(release="NEW")))

    for table in MIRRORED:
        op.add_column(
            table,
            sa.Column("detached_from_template_agent_id", sa.UUID(), nullable=True),
        )
        op.create_foreign_key(
            op.f(f"fk_{table}_detached_from_template_agent_id"),
            table,
            "agents",
            ["detached_from_template_agent_id"],
            ["id"],
        )
    op.drop_constraint(op.f("ck_install_events_action"), "install_events", type_="check")
    op.create_check_constraint(
        op.f("ck_install_events_action"), "install_events", f"action IN {HISTORY_ACTIONS}"
    )


def downgrade() -> None:
    # History is kept: reconcile and detach events stay, and so does the constraint admitting
    # them (older code never writes them).
    for table in MIRRORED:
        op.drop_constraint(
            op.f(f"fk_{table}_detached_from_template_agent_id"), table, type_="foreignkey"
        )
        op.drop_column(table, "detached_from_template_agent_id")
    op.execute(_items_trigger(OLD_ITEMS_OF))
    op.drop_column("template_release_items", "policies")
    for name in (
        "install_merge(jsonb, jsonb, jsonb, jsonb, jsonb, text)",
        "install_merge_value(text, jsonb, jsonb, jsonb, boolean, jsonb, text)",
        "install_has(jsonb, jsonb)",
        "install_outcome(text, text, jsonb)",
        "install_diff(jsonb, jsonb, text)",
        "install_pointer(text, text)",
    ):
        op.execute(f"DROP FUNCTION {name}")
