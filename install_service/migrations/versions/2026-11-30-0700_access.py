"""Access lifecycle: token expiry and use, deactivated users, one personal org per user, audit.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 07:00

Reviewed by hand.
- `api_tokens` gain `prefix`, `expires_at`, `last_used_at` and `bootstrap` (tokens `serve`
  made for the platform admin); `users` gain `deactivated_at`.
- Every user has exactly one personal org: `organizations.personal_owner_id` (unique, and
  set exactly for `personal` orgs) plus deferred constraint triggers that refuse a user without
  one at commit. Existing data is brought in line first, deleting nothing: each user keeps the
  personal org named after them (else their oldest personal org no one else kept), other
  personal orgs become `team` orgs, and a user left without one gets a new one.
- `audit_log`, append-only in the database like releases and versions.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One statement each: the driver runs a statement at a time.
PERSONAL_ORG_TRIGGERS = (
    """
    CREATE FUNCTION user_has_personal_org(user_id uuid) RETURNS void
    LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM users WHERE id = user_id)
           AND NOT EXISTS (SELECT 1 FROM organizations WHERE personal_owner_id = user_id) THEN
            RAISE EXCEPTION 'user % has no personal organization', user_id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
    END
    $$""",
    """
    CREATE FUNCTION check_new_user_personal_org() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM user_has_personal_org(NEW.id);
        RETURN NULL;
    END
    $$""",
    """
    CREATE FUNCTION check_personal_org_kept() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM user_has_personal_org(OLD.personal_owner_id);
        RETURN NULL;
    END
    $$""",
    """
    CREATE CONSTRAINT TRIGGER users_personal_org AFTER INSERT ON users
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        EXECUTE FUNCTION check_new_user_personal_org()""",
    """
    CREATE CONSTRAINT TRIGGER organizations_personal_org_kept
        AFTER UPDATE OF personal_owner_id, kind OR DELETE ON organizations
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
        WHEN (OLD.personal_owner_id IS NOT NULL)
        EXECUTE FUNCTION check_personal_org_kept()""",
)


def _one_personal_org_per_user() -> None:
    """Give every user exactly one personal org without deleting anything."""
    conn = op.get_bind()
    # Orgs named after their owner (`user-<id prefix>`, as the service names them) first,
    # then the oldest: the first claim on a user and on an org wins.
    candidates = conn.execute(
        sa.text("""
            SELECT o.id AS org, m.user_id
            FROM organizations o
            JOIN memberships m ON m.organization_id = o.id AND m.role = 'owner'
            WHERE o.kind = 'personal'
            ORDER BY o.slug = 'user-' || left(replace(m.user_id::text, '-', ''), 12) DESC,
                     o.created_at, o.id, m.created_at, m.user_id""")
    ).all()
    kept: dict[object, object] = {}
    for org, user in candidates:
        if user not in kept and org not in kept.values():
            kept[user] = org
    conn.execute(
        sa.text("""
            UPDATE organizations o SET personal_owner_id = k.user_id
            FROM unnest(CAST(:users AS uuid[]), CAST(:orgs AS uuid[])) AS k(user_id, org)
            WHERE o.id = k.org"""),
        {"users": list(kept), "orgs": list(kept.values())},
    )
    conn.execute(
        sa.text(
            "UPDATE organizations SET kind = 'team' "
            "WHERE kind = 'personal' AND personal_owner_id IS NULL"
        )
    )
    conn.execute(
        sa.text("""
            WITH created AS (
                INSERT INTO organizations (slug, name, kind, personal_owner_id)
                SELECT 'user-' || replace(u.id::text, '-', ''),
                       left(coalesce(nullif(u.name, ''), u.email), 200), 'personal', u.id
                FROM users u
                WHERE NOT EXISTS (SELECT 1 FROM organizations o WHERE o.personal_owner_id = u.id)
                RETURNING id, personal_owner_id)
            INSERT INTO memberships (organization_id, user_id, role)
            SELECT id, personal_owner_id, 'owner' FROM created""")
    )


def upgrade() -> None:
    op.add_column("users", sa.Column("deactivated_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("api_tokens", sa.Column("prefix", sa.String(length=16), nullable=True))
    op.add_column("api_tokens", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "api_tokens", sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("api_tokens", sa.Column("bootstrap", sa.String(length=20), nullable=True))
    op.create_check_constraint(
        op.f("ck_api_tokens_bootstrap"), "api_tokens", "bootstrap IN ('env', 'generated')"
    )
    # The tokens `serve` made from INSTALL_SERVICE_ADMIN_TOKEN, so the next change revokes them.
    op.execute("UPDATE api_tokens SET bootstrap = 'env' WHERE name = 'INSTALL_SERVICE_ADMIN_TOKEN'")

    op.add_column("organizations", sa.Column("personal_owner_id", sa.UUID(), nullable=True))
    _one_personal_org_per_user()
    op.create_foreign_key(
        op.f("fk_organizations_personal_owner_id"),
        "organizations",
        "users",
        ["personal_owner_id"],
        ["id"],
    )
    op.create_unique_constraint(
        op.f("uq_organizations_personal_owner_id"), "organizations", ["personal_owner_id"]
    )
    op.create_check_constraint(
        op.f("ck_organizations_personal_owner"),
        "organizations",
        "(kind = 'personal') = (personal_owner_id IS NOT NULL)",
    )
    for statement in PERSONAL_ORG_TRIGGERS:
        op.execute(statement)

    op.create_table(
        "audit_log",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column(
            "occurred_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("actor_user_id", sa.UUID(), nullable=True),
        sa.Column("action", sa.String(length=60), nullable=False),
        sa.Column("target_type", sa.String(length=40), nullable=False),
        sa.Column("target_id", sa.String(length=200), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["actor_user_id"], ["users.id"], name=op.f("fk_audit_log_actor_user_id")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name=op.f("fk_audit_log_organization_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index("ix_audit_log_occurred", "audit_log", ["occurred_at", "id"], unique=False)
    op.create_index(op.f("ix_audit_log_actor_user_id"), "audit_log", ["actor_user_id"])
    op.create_index(op.f("ix_audit_log_organization_id"), "audit_log", ["organization_id"])
    op.execute(
        "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION refuse_append_only_change()"
    )
    op.execute(
        "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
        "FOR EACH STATEMENT EXECUTE FUNCTION refuse_append_only_change()"
    )


def downgrade() -> None:
    op.drop_table("audit_log")  # its triggers go with it
    op.execute("DROP TRIGGER organizations_personal_org_kept ON organizations")
    op.execute("DROP TRIGGER users_personal_org ON users")
    op.execute("DROP FUNCTION check_personal_org_kept()")
    op.execute("DROP FUNCTION check_new_user_personal_org()")
    op.execute("DROP FUNCTION user_has_personal_org(uuid)")
    op.drop_constraint(op.f("ck_organizations_personal_owner"), "organizations", type_="check")
    op.drop_constraint(op.f("uq_organizations_personal_owner_id"), "organizations", type_="unique")
    op.drop_constraint(
        op.f("fk_organizations_personal_owner_id"), "organizations", type_="foreignkey"
    )
    op.drop_column("organizations", "personal_owner_id")
    op.drop_constraint(op.f("ck_api_tokens_bootstrap"), "api_tokens", type_="check")
    for column in ("bootstrap", "last_used_at", "expires_at", "prefix"):
        op.drop_column("api_tokens", column)
    op.drop_column("users", "deactivated_at")
