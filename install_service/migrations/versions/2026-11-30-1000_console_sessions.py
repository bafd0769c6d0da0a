"""Console sessions: a browser signed in with an API token, held server-side.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 10:00

Reviewed by hand.
- `console_sessions`: one row per signed-in browser. The cookie carries a random secret; only
  its SHA-256 is stored (like API tokens), so reading the table does not let anyone sign in.
  Each session is bound to the token it was opened with: revoking or expiring that token, or
  deactivating its user, ends the session on its next request (checked in the same look-up).
  Signing out deletes the row. `csrf_hash` binds the form token the browser holds to this
  session. Expired rows are deleted at later sign-ins.
- `console_secret`: one row holding the key that signs the console's CSRF tokens, generated
  here from PostgreSQL's strong random source, so every replica on this database signs and
  checks tokens with the same key.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column(
            "id",
            postgresql.UUID(as_uuid=True),
            server_default=sa.text("gen_random_uuid()"),
            nullable=False,
        ),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("token_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("user_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("csrf_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "last_seen_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["api_tokens.id"],
            name=op.f("fk_console_sessions_token_id"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_console_sessions_user_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_sessions")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_console_sessions_secret_hash")),
    )
    op.create_index(
        op.f("ix_console_sessions_token_id"), "console_sessions", ["token_id"], unique=False
    )
    op.create_index(
        op.f("ix_console_sessions_user_id"), "console_sessions", ["user_id"], unique=False
    )
    op.create_table(
        "console_secret",
        sa.Column("id", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("secret", sa.String(length=64), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_console_secret_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_secret")),
    )
    # 244 random bits from PostgreSQL's strong random source (gen_random_uuid), hashed.
    op.execute("""
        INSERT INTO console_secret (secret)
        SELECT encode(sha256(convert_to(
            gen_random_uuid()::text || gen_random_uuid()::text || clock_timestamp()::text,
            'UTF8')), 'hex')""")


def downgrade() -> None:
    op.drop_table("console_secret")
    op.drop_index(op.f("ix_console_sessions_user_id"), table_name="console_sessions")
    op.drop_index(op.f("ix_console_sessions_token_id"), table_name="console_sessions")
    op.drop_table("console_sessions")
