"""Release items: each release's snapshot items, keyed by kind and slug, with their hashes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 21:20

Reviewed by hand. The install engine reads a release item by item; before this table every
statement unnested and re-hashed the whole snapshot. A trigger fills a release's items from
its snapshot when the release is inserted, so no writer can leave a release without them (an
engine reading an empty release would archive everything); existing releases are backfilled.
The table is append-only like `template_releases`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = "('entity_types', 'relationship_types', 'classifiers', 'watchers')"
ITEMS_OF = """
            INSERT INTO template_release_items (release_id, kind, slug, item, content_hash)
            SELECT {release}.id, k.kind, i.item->>'slug', i.item, install_content_hash(i.item)
            FROM {releases}unnest(ARRAY['entity_types', 'relationship_types', 'classifiers',
                                       'watchers'])
                 AS k(kind)
            CROSS JOIN LATERAL jsonb_array_elements({release}.snapshot -> k.kind) AS i(item)"""


def upgrade() -> None:
    op.create_table(
        "template_release_items",
        sa.Column("release_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("slug", sa.Text(), nullable=False),
        sa.Column("item", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint(f"kind IN {KINDS}", name=op.f("ck_template_release_items_kind")),
        sa.ForeignKeyConstraint(
            ["release_id"],
            ["template_releases.id"],
            name=op.f("fk_template_release_items_release_id"),
        ),
        sa.PrimaryKeyConstraint(
            "release_id", "kind", "slug", name=op.f("pk_template_release_items")
        ),
    )
    # Every release gets its items from its own snapshot in the database, whoever inserts it.
    op.execute(
        f"""
        CREATE FUNCTION template_release_items_from_snapshot() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            {ITEMS_OF.format(release="NEW", releases="")};
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER template_releases_items AFTER INSERT ON template_releases "
        "FOR EACH ROW EXECUTE FUNCTION template_release_items_from_snapshot()"
    )
    # ... and releases cut before this revision get theirs now.
    op.execute(ITEMS_OF.format(release="r", releases="template_releases r CROSS JOIN "))
    op.execute(
        "CREATE TRIGGER template_release_items_append_only BEFORE UPDATE OR DELETE "
        "ON template_release_items FOR EACH ROW EXECUTE FUNCTION refuse_append_only_change()"
    )
    op.execute(
        "CREATE TRIGGER template_release_items_no_truncate BEFORE TRUNCATE "
        "ON template_release_items FOR EACH STATEMENT EXECUTE FUNCTION refuse_append_only_change()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER template_releases_items ON template_releases")
    op.execute("DROP FUNCTION template_release_items_from_snapshot()")
    op.drop_table("template_release_items")
