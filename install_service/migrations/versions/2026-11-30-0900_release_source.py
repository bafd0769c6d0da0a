"""Releases record where they came from: seeding, the API, or the CLI.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 09:00

Reviewed by hand. `serve` publishes its bundled templates only while a template's latest
release came from seeding, so a release published by the API or the CLI is never replaced by
the bundled copy at the next start. Releases cut before this revision cannot say where they
came from: they are `unknown`, which seeding treats like any other release it did not cut
(it leaves them alone). Adding a column with a constant default rewrites no row, so the
append-only trigger on releases is not involved.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "template_releases",
        sa.Column("source", sa.Text(), server_default="unknown", nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_template_releases_source"),
        "template_releases",
        "source IN ('seed', 'api', 'cli', 'unknown')",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_template_releases_source"), "template_releases")
    op.drop_column("template_releases", "source")
