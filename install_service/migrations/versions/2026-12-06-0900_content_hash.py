"""A stored content hash on every row of the mirrored tables, kept true by the database.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 09:00

Reviewed by hand. A row's *content* is the row in the shape of its template document item
(references as slugs, a watcher's or classifier's current version folded in): until now every
statement that needed it (drift, the plan, verification, `db check`) rebuilt it from the row
and its neighbours, and hashed it, for every row it looked at. This revision:

- defines the content once, as `install_content(row)` for each of the four tables (SQL
  functions, so a statement that calls them is planned as if it had the expression inline);
- adds `content_hash` to each table: `install_content_hash(install_content(row))`, filled in
  for every existing row;
- keeps it true with statement-level triggers, whatever writes a row: the engine (which writes
  the hash it expects, so that the triggers only check it), the organization's own edits over
  the API, or SQL run by hand. After each statement that inserts or updates rows of a table,
  its trigger recomputes the hash of every row whose content columns (or stored hash)
  changed, and writes it where it differs. Content that depends on other rows follows them:
  a relationship type's rules, a renamed (or moved) entity type, relationship type or watcher
  that other rows reference by slug. A version is immutable and only counts once its owner's
  `current_version_id` points at it, which is an update of the owner. (Deletions need nothing:
  no row can be deleted while another references it.)

The triggers see every change of their statement, so a statement that writes a watcher and
its new version, or a relationship type and its rules, is hashed as a whole.

Downgrading drops the triggers, the functions and the columns; nothing else changes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("entity_types", "entity_relationship_types", "event_classifiers", "watchers")


def _slug_of(alias: str) -> str:
    """A referenced row's slug; a reference into another org can never equal an item."""
    return (
        f"CASE WHEN {alias}.organization_id = t.organization_id THEN {alias}.slug "
        f"ELSE '!other-organization:' || {alias}.slug END"
    )


def _version(table: str, owner: str, fields: dict[str, str]) -> str:
    """The current version's fields (all null without one)."""
    build = ", ".join(f"'{key}', v.{column}" for key, column in fields.items())
    nulls = ", ".join(f"'{key}', NULL" for key in fields)
    return f"""coalesce(
            (SELECT jsonb_build_object({build}) FROM {table} v
             WHERE v.id = t.current_version_id AND v.{owner} = t.id),
            jsonb_build_object({nulls}))"""


# Each row rebuilt as its template document item (keys as the document Structs name them).
CONTENT = {
    "entity_types": """
        jsonb_build_object(
            'slug', t.slug, 'name', t.name, 'description', t.description,
            'icon', t.icon, 'color', t.color, 'metadata_schema', t.metadata_schema,
            'event_kinds', t.event_kinds)""",
    # Given its rules (`install_rules`): see RULES_SQL.
    "entity_relationship_types": f"""
        jsonb_build_object(
            'slug', t.slug, 'name', t.name, 'description', t.description,
            'metadata_schema', t.metadata_schema, 'is_symmetric', t.is_symmetric,
            'inverse', (SELECT {_slug_of("i")} FROM entity_relationship_types i
                        WHERE i.id = t.inverse_type_id),
            'rules', coalesce(rules, '[]'::jsonb))""",
    "event_classifiers": f"""
        jsonb_build_object(
            'slug', t.slug, 'name', t.name, 'description', t.description,
            'attribute_key', t.attribute_key,
            'entity_type', (SELECT {_slug_of("e")} FROM entity_types e
                            WHERE e.id = t.entity_type_id),
            'watcher', (SELECT {_slug_of("w")} FROM watchers w WHERE w.id = t.watcher_id))
        || {
        _version(
            "event_classifier_versions",
            "classifier_id",
            {
                "attribute_values": "attribute_values",
                "fallback_value": "fallback_value",
                "extraction_config": "extraction_config",
            },
        )
    }""",
    "watchers": f"""
        jsonb_build_object(
            'slug', t.slug, 'name', t.name, 'description', t.description,
            'schedule', t.schedule)
        || {
        _version(
            "watcher_versions",
            "watcher_id",
            {
                "prompt": "prompt",
                "extraction_schema": "extraction_schema",
                "sources_schema": "sources_schema",
                "reactions_guidance": "reactions_guidance",
            },
        )
    }""",
}

# The rules of relationship types, as their content shows them, for many at once: one join,
# where a rule-by-rule lookup per type took most of the time of hashing an install.
RULES_SQL = f"""
    CREATE FUNCTION install_rules(ids uuid[])
    RETURNS TABLE (relationship_type_id uuid, rules jsonb) LANGUAGE sql STABLE AS $$
        SELECT r.relationship_type_id,
               jsonb_agg(jsonb_build_object('source', {_slug_of("s")}, 'target', {_slug_of("g")})
                         ORDER BY s.slug COLLATE "C", g.slug COLLATE "C")
        FROM entity_relationship_type_rules r
        JOIN entity_relationship_types t ON t.id = r.relationship_type_id
        JOIN entity_types s ON s.id = r.source_entity_type_id
        JOIN entity_types g ON g.id = r.target_entity_type_id
        WHERE r.relationship_type_id = ANY(ids)
        GROUP BY r.relationship_type_id
    $$"""
RT = "entity_relationship_types"


# The columns a row's own content is made of (besides what other rows contribute).
CONTENT_COLUMNS = {
    "entity_types": (
        "slug",
        "name",
        "description",
        "icon",
        "color",
        "metadata_schema",
        "event_kinds",
        "organization_id",
    ),
    "entity_relationship_types": (
        "slug",
        "name",
        "description",
        "metadata_schema",
        "is_symmetric",
        "inverse_type_id",
        "organization_id",
    ),
    "event_classifiers": (
        "slug",
        "name",
        "description",
        "attribute_key",
        "entity_type_id",
        "watcher_id",
        "current_version_id",
        "organization_id",
    ),
    "watchers": (
        "slug",
        "name",
        "description",
        "schedule",
        "current_version_id",
        "organization_id",
    ),
}

# Rows of this statement's table renamed or moved to another organization.
MOVED = """SELECT n.id FROM changed n JOIN previous o ON o.id = n.id
               WHERE (n.slug, n.organization_id) IS DISTINCT FROM (o.slug, o.organization_id)"""
# Rows whose content shows a row of the key's table by slug: (their table, their ids).
DEPENDENTS = {
    "entity_types": [
        (
            "entity_relationship_types",
            f"""SELECT r.relationship_type_id FROM entity_relationship_type_rules r
               WHERE r.source_entity_type_id IN ({MOVED})
               UNION ALL
               SELECT r.relationship_type_id FROM entity_relationship_type_rules r
               WHERE r.target_entity_type_id IN ({MOVED})""",
        ),
        (
            "event_classifiers",
            f"SELECT c.id FROM event_classifiers c WHERE c.entity_type_id IN ({MOVED})",
        ),
    ],
    "entity_relationship_types": [
        (
            "entity_relationship_types",
            f"SELECT r.id FROM entity_relationship_types r WHERE r.inverse_type_id IN ({MOVED})",
        )
    ],
    "event_classifiers": [],
    "watchers": [
        (
            "event_classifiers",
            f"SELECT c.id FROM event_classifiers c WHERE c.watcher_id IN ({MOVED})",
        )
    ],
}
# The rows a statement inserted whose hash this table's trigger checks. A new relationship
# type with rules is left to the rules' trigger: its rules can only have been inserted in the
# same statement or later, and their trigger checks it then (checking it twice doubled the
# cost of an install).
INSERTED = {
    "entity_relationship_types": """SELECT n.id FROM changed n WHERE NOT EXISTS (
                   SELECT 1 FROM entity_relationship_type_rules r
                   WHERE r.relationship_type_id = n.id)""",
}

HASH = "install_content_hash(install_content(t))"


def _rehash(table: str, ids: str) -> str:
    """Write the true hash of the rows of `table` whose ids `ids` selects, where the stored
    one differs. Each hash is computed only for those rows (`OFFSET 0` keeps the planner from
    testing the hash on every row of the table before the join), relationship types' rules in
    one join for all of them, and the UPDATE is only issued when some row differs: an UPDATE
    of nothing would fire the table's trigger again, and so on for ever."""
    if table == RT:
        rules = "LEFT JOIN install_rules({ids}) r ON r.relationship_type_id = t.id"
        hashed = "install_content_hash(install_content(t, r.rules))"
        found, fix = rules.format(ids=f"ARRAY({ids})"), rules.format(ids="wrong")
    else:
        hashed, found, fix = HASH, "", ""
    return f"""
            SELECT array_agg(x.id) INTO wrong FROM (
                SELECT t.id, t.content_hash, {hashed} AS hash
                FROM {table} t {found} WHERE t.id IN ({ids}) OFFSET 0) x
            WHERE x.content_hash IS DISTINCT FROM x.hash;
            IF wrong IS NOT NULL THEN
                UPDATE {table} t SET content_hash = x.hash
                FROM (SELECT t.id, {hashed} AS hash
                      FROM {table} t {fix} WHERE t.id = ANY(wrong)) x
                WHERE t.id = x.id;
            END IF;"""


def _trigger_function(table: str) -> str:
    """After a statement inserted or updated rows of `table`: the hash of each row whose own
    content columns (or stored hash) changed, then that of rows showing a renamed one. An
    INSERT ... ON CONFLICT fires both triggers whatever it did: the one with no rows returns
    at once."""
    new = ", ".join(f"n.{c}" for c in (*CONTENT_COLUMNS[table], "content_hash"))
    old = ", ".join(f"o.{c}" for c in (*CONTENT_COLUMNS[table], "content_hash"))
    changed = f"""SELECT n.id FROM changed n JOIN previous o ON o.id = n.id
                           WHERE ({new}) IS DISTINCT FROM ({old})"""
    dependents = "".join(_rehash(target, ids) for target, ids in DEPENDENTS[table])
    if dependents:
        dependents = f"""
                IF EXISTS ({MOVED}) THEN{dependents}
                END IF;"""
    inserted = INSERTED.get(table, "SELECT n.id FROM changed n")
    return f"""
        CREATE FUNCTION install_rehash_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            wrong uuid[];
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM changed) THEN
                RETURN NULL;
            END IF;
            IF TG_OP = 'INSERT' THEN
                {_rehash(table, inserted)}
            ELSE
                {_rehash(table, changed)}
                {dependents}
            END IF;
            RETURN NULL;
        END
        $$"""


RULES_FUNCTION = f"""
    CREATE FUNCTION install_rehash_rules() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        wrong uuid[];
    BEGIN
        IF TG_OP = 'INSERT' THEN
            {_rehash("entity_relationship_types", "SELECT n.relationship_type_id FROM changed n")}
        ELSIF TG_OP = 'DELETE' THEN
            {_rehash("entity_relationship_types", "SELECT o.relationship_type_id FROM previous o")}
        ELSE
            {
    _rehash(
        "entity_relationship_types",
        "SELECT n.relationship_type_id FROM changed n "
        "UNION ALL SELECT o.relationship_type_id FROM previous o",
    )
}
        END IF;
        RETURN NULL;
    END
    $$"""
RULES = "entity_relationship_type_rules"


def upgrade() -> None:
    op.execute(RULES_SQL)
    for table in TABLES:
        op.add_column(table, sa.Column("content_hash", sa.String(length=64), nullable=True))
        if table == RT:
            op.execute(
                f"CREATE FUNCTION install_content(t {table}, rules jsonb) RETURNS jsonb "
                f"LANGUAGE sql STABLE RETURN {CONTENT[table]}"
            )
            op.execute(
                f"CREATE FUNCTION install_content(t {table}) RETURNS jsonb LANGUAGE sql STABLE "
                "RETURN install_content(t, (SELECT r.rules FROM install_rules(ARRAY[t.id]) r))"
            )
        else:
            op.execute(
                f"CREATE FUNCTION install_content(t {table}) RETURNS jsonb "
                f"LANGUAGE sql STABLE RETURN {CONTENT[table]}"
            )
    for table in TABLES:
        op.execute(f"UPDATE {table} t SET content_hash = {HASH}")
    for table in TABLES:
        op.execute(_trigger_function(table))
        op.execute(
            f"CREATE TRIGGER {table}_rehash_inserted AFTER INSERT ON {table} "
            "REFERENCING NEW TABLE AS changed "
            f"FOR EACH STATEMENT EXECUTE FUNCTION install_rehash_{table}()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_rehash_updated AFTER UPDATE ON {table} "
            "REFERENCING OLD TABLE AS previous NEW TABLE AS changed "
            f"FOR EACH STATEMENT EXECUTE FUNCTION install_rehash_{table}()"
        )
    op.execute(RULES_FUNCTION)
    op.execute(
        f"CREATE TRIGGER {RULES}_rehash_inserted AFTER INSERT ON {RULES} "
        "REFERENCING NEW TABLE AS changed "
        "FOR EACH STATEMENT EXECUTE FUNCTION install_rehash_rules()"
    )
    op.execute(
        f"CREATE TRIGGER {RULES}_rehash_updated AFTER UPDATE ON {RULES} "
        "REFERENCING OLD TABLE AS previous NEW TABLE AS changed "
        "FOR EACH STATEMENT EXECUTE FUNCTION install_rehash_rules()"
    )
    op.execute(
        f"CREATE TRIGGER {RULES}_rehash_deleted AFTER DELETE ON {RULES} "
        "REFERENCING OLD TABLE AS previous "
        "FOR EACH STATEMENT EXECUTE FUNCTION install_rehash_rules()"
    )


def downgrade() -> None:
    for event in ("inserted", "updated", "deleted"):
        op.execute(f"DROP TRIGGER {RULES}_rehash_{event} ON {RULES}")
    op.execute("DROP FUNCTION install_rehash_rules()")
    for table in TABLES:
        op.execute(f"DROP TRIGGER {table}_rehash_updated ON {table}")
        op.execute(f"DROP TRIGGER {table}_rehash_inserted ON {table}")
        op.execute(f"DROP FUNCTION install_rehash_{table}()")
    op.execute(f"DROP FUNCTION install_content({RT})")
    op.execute(f"DROP FUNCTION install_content({RT}, jsonb)")
    op.execute("DROP FUNCTION install_rules(uuid[])")
    for table in TABLES:
        if table != RT:
            op.execute(f"DROP FUNCTION install_content({table})")
        op.drop_column(table, "content_hash")
