"""Initial schema: tenancy, templates and releases, mirrored schema tables, append-only versions.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 18:32

Reviewed by hand. Beyond what the models declare, this migration installs:
- `install_content_hash(jsonb)`: the one definition of a content hash, used for release content
  hashes and for every mirrored row's `mirrored_hash`;
- triggers that make `watcher_versions`, `event_classifier_versions` and `template_releases`
  refuse UPDATE, DELETE and TRUNCATE: history is append-only in the database itself;
- the foreign keys that close reference cycles (agents <-> releases, current versions).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY_TABLES = ("watcher_versions", "event_classifier_versions", "template_releases")
CYCLE_FKS = (
    ("fk_agents_installed_release_id", "agents", "template_releases", "installed_release_id"),
    ("fk_watchers_current_version_id", "watchers", "watcher_versions", "current_version_id"),
    (
        "fk_event_classifiers_current_version_id",
        "event_classifiers",
        "event_classifier_versions",
        "current_version_id",
    ),
)


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("slug", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=20), server_default="team", nullable=False),
        sa.Column("visibility", sa.String(length=20), server_default="private", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("kind IN ('personal', 'team')", name=op.f("ck_organizations_kind")),
        sa.CheckConstraint(
            "visibility IN ('private', 'public')", name=op.f("ck_organizations_visibility")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
        sa.UniqueConstraint("slug", name=op.f("uq_organizations_slug")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("name", sa.String(length=200), server_default="", nullable=False),
        sa.Column(
            "is_platform_admin", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("slug", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("is_template", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("template_agent_id", sa.UUID(), nullable=True),
        sa.Column("installed_release_id", sa.UUID(), nullable=True),
        sa.Column("status", sa.String(length=20), server_default="active", nullable=False),
        sa.Column("installed_by_user_id", sa.UUID(), nullable=True),
        sa.Column(
            "installed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('active', 'uninstalled')", name=op.f("ck_agents_status")),
        sa.CheckConstraint(
            "NOT (is_template AND template_agent_id IS NOT NULL)",
            name=op.f("ck_agents_template_kind"),
        ),
        sa.ForeignKeyConstraint(
            ["installed_by_user_id"], ["users.id"], name=op.f("fk_agents_installed_by_user_id")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name=op.f("fk_agents_organization_id")
        ),
        sa.ForeignKeyConstraint(
            ["template_agent_id"], ["agents.id"], name=op.f("fk_agents_template_agent_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint(
            "template_agent_id",
            "organization_id",
            name=op.f("uq_agents_template_agent_id_organization_id"),
        ),
    )
    op.create_index(op.f("ix_agents_organization_id"), "agents", ["organization_id"], unique=False)
    op.create_index(
        op.f("ix_agents_template_agent_id"), "agents", ["template_agent_id"], unique=False
    )
    op.create_index(
        "uq_agents_template_org",
        "agents",
        ["organization_id"],
        unique=True,
        postgresql_where=sa.text("is_template"),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), server_default="", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index(op.f("ix_api_tokens_user_id"), "api_tokens", ["user_id"], unique=False)
    op.create_table(
        "memberships",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "role IN ('owner', 'admin', 'member')", name=op.f("ck_memberships_role")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name=op.f("fk_memberships_organization_id")
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_memberships_user_id")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_memberships")),
        sa.UniqueConstraint(
            "organization_id", "user_id", name=op.f("uq_memberships_organization_id_user_id")
        ),
    )
    op.create_index(
        op.f("ix_memberships_organization_id"), "memberships", ["organization_id"], unique=False
    )
    op.create_index(op.f("ix_memberships_user_id"), "memberships", ["user_id"], unique=False)
    op.create_table(
        "template_releases",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("template_agent_id", sa.UUID(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("predecessor_id", sa.UUID(), nullable=True),
        sa.Column("snapshot", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("notes", sa.Text(), server_default="", nullable=False),
        sa.Column("created_by_user_id", sa.UUID(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["created_by_user_id"],
            ["users.id"],
            name=op.f("fk_template_releases_created_by_user_id"),
        ),
        sa.ForeignKeyConstraint(
            ["predecessor_id"],
            ["template_releases.id"],
            name=op.f("fk_template_releases_predecessor_id"),
        ),
        sa.ForeignKeyConstraint(
            ["template_agent_id"],
            ["agents.id"],
            name=op.f("fk_template_releases_template_agent_id"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_template_releases")),
        sa.UniqueConstraint(
            "template_agent_id",
            "version",
            name=op.f("uq_template_releases_template_agent_id_version"),
        ),
    )
    op.create_table(
        "entity_relationship_types",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column(
            "metadata_schema",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("is_symmetric", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("inverse_type_id", sa.UUID(), nullable=True),
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("slug", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="active", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("managed_by_template_agent_id", sa.UUID(), nullable=True),
        sa.Column("source_template_org_id", sa.UUID(), nullable=True),
        sa.Column("source_row_id", sa.UUID(), nullable=True),
        sa.Column("mirrored_release_id", sa.UUID(), nullable=True),
        sa.Column("mirrored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mirrored_hash", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'archived')", name=op.f("ck_entity_relationship_types_status")
        ),
        sa.ForeignKeyConstraint(
            ["inverse_type_id"],
            ["entity_relationship_types.id"],
            name=op.f("fk_entity_relationship_types_inverse_type_id"),
        ),
        sa.ForeignKeyConstraint(
            ["managed_by_template_agent_id"],
            ["agents.id"],
            name=op.f("fk_entity_relationship_types_managed_by_template_agent_id"),
        ),
        sa.ForeignKeyConstraint(
            ["mirrored_release_id"],
            ["template_releases.id"],
            name=op.f("fk_entity_relationship_types_mirrored_release_id"),
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_entity_relationship_types_organization_id"),
        ),
        sa.ForeignKeyConstraint(
            ["source_template_org_id"],
            ["organizations.id"],
            name=op.f("fk_entity_relationship_types_source_template_org_id"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entity_relationship_types")),
        sa.UniqueConstraint(
            "organization_id",
            "slug",
            name=op.f("uq_entity_relationship_types_organization_id_slug"),
        ),
    )
    op.create_index(
        "ix_entity_relationship_types_managed_by",
        "entity_relationship_types",
        ["managed_by_template_agent_id", "organization_id"],
        unique=False,
        postgresql_where=sa.text("managed_by_template_agent_id IS NOT NULL"),
    )
    op.create_index(
        op.f("ix_entity_relationship_types_organization_id"),
        "entity_relationship_types",
        ["organization_id"],
        unique=False,
    )
    op.create_index(
        "ix_entity_relationship_types_source_row",
        "entity_relationship_types",
        ["source_row_id"],
        unique=False,
        postgresql_where=sa.text("source_row_id IS NOT NULL"),
    )
    op.create_table(
        "entity_types",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("icon", sa.String(length=100), nullable=True),
        sa.Column("color", sa.String(length=50), nullable=True),
        sa.Column(
            "metadata_schema",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "event_kinds",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("slug", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="active", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("managed_by_template_agent_id", sa.UUID(), nullable=True),
        sa.Column("source_template_org_id", sa.UUID(), nullable=True),
        sa.Column("source_row_id", sa.UUID(), nullable=True),
        sa.Column("mirrored_release_id", sa.UUID(), nullable=True),
        sa.Column("mirrored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mirrored_hash", sa.String(length=64), nullable=True),
        sa.CheckConstraint("status IN ('active', 'archived')", name=op.f("ck_entity_types_status")),
        sa.ForeignKeyConstraint(
            ["managed_by_template_agent_id"],
            ["agents.id"],
            name=op.f("fk_entity_types_managed_by_template_agent_id"),
        ),
        sa.ForeignKeyConstraint(
            ["mirrored_release_id"],
            ["template_releases.id"],
            name=op.f("fk_entity_types_mirrored_release_id"),
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name=op.f("fk_entity_types_organization_id")
        ),
        sa.ForeignKeyConstraint(
            ["source_template_org_id"],
            ["organizations.id"],
            name=op.f("fk_entity_types_source_template_org_id"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entity_types")),
        sa.UniqueConstraint(
            "organization_id", "slug", name=op.f("uq_entity_types_organization_id_slug")
        ),
    )
    op.create_index(
        "ix_entity_types_managed_by",
        "entity_types",
        ["managed_by_template_agent_id", "organization_id"],
        unique=False,
        postgresql_where=sa.text("managed_by_template_agent_id IS NOT NULL"),
    )
    op.create_index(
        op.f("ix_entity_types_organization_id"), "entity_types", ["organization_id"], unique=False
    )
    op.create_index(
        "ix_entity_types_source_row",
        "entity_types",
        ["source_row_id"],
        unique=False,
        postgresql_where=sa.text("source_row_id IS NOT NULL"),
    )
    op.create_table(
        "install_events",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("install_id", sa.UUID(), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("from_release_id", sa.UUID(), nullable=True),
        sa.Column("to_release_id", sa.UUID(), nullable=True),
        sa.Column("actor_user_id", sa.UUID(), nullable=True),
        sa.Column("changes", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "action IN ('install', 'upgrade', 'rollback', 'reinstall', 'uninstall')",
            name=op.f("ck_install_events_action"),
        ),
        sa.ForeignKeyConstraint(
            ["actor_user_id"], ["users.id"], name=op.f("fk_install_events_actor_user_id")
        ),
        sa.ForeignKeyConstraint(
            ["from_release_id"],
            ["template_releases.id"],
            name=op.f("fk_install_events_from_release_id"),
        ),
        sa.ForeignKeyConstraint(
            ["install_id"], ["agents.id"], name=op.f("fk_install_events_install_id")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_install_events_organization_id"),
        ),
        sa.ForeignKeyConstraint(
            ["to_release_id"],
            ["template_releases.id"],
            name=op.f("fk_install_events_to_release_id"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_install_events")),
    )
    op.create_index(
        op.f("ix_install_events_install_id"), "install_events", ["install_id"], unique=False
    )
    op.create_index(
        op.f("ix_install_events_organization_id"),
        "install_events",
        ["organization_id"],
        unique=False,
    )
    op.create_table(
        "watchers",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("schedule", sa.String(length=100), nullable=True),
        sa.Column("schedule_enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("connection_id", sa.UUID(), nullable=True),
        sa.Column("current_version_id", sa.UUID(), nullable=True),
        sa.Column("agent_id", sa.UUID(), nullable=True),
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("slug", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="active", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("managed_by_template_agent_id", sa.UUID(), nullable=True),
        sa.Column("source_template_org_id", sa.UUID(), nullable=True),
        sa.Column("source_row_id", sa.UUID(), nullable=True),
        sa.Column("mirrored_release_id", sa.UUID(), nullable=True),
        sa.Column("mirrored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mirrored_hash", sa.String(length=64), nullable=True),
        sa.CheckConstraint("status IN ('active', 'archived')", name=op.f("ck_watchers_status")),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_watchers_agent_id")),
        sa.ForeignKeyConstraint(
            ["managed_by_template_agent_id"],
            ["agents.id"],
            name=op.f("fk_watchers_managed_by_template_agent_id"),
        ),
        sa.ForeignKeyConstraint(
            ["mirrored_release_id"],
            ["template_releases.id"],
            name=op.f("fk_watchers_mirrored_release_id"),
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organizations.id"], name=op.f("fk_watchers_organization_id")
        ),
        sa.ForeignKeyConstraint(
            ["source_template_org_id"],
            ["organizations.id"],
            name=op.f("fk_watchers_source_template_org_id"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_watchers")),
        sa.UniqueConstraint(
            "organization_id", "slug", name=op.f("uq_watchers_organization_id_slug")
        ),
    )
    op.create_index(op.f("ix_watchers_agent_id"), "watchers", ["agent_id"], unique=False)
    op.create_index(
        "ix_watchers_managed_by",
        "watchers",
        ["managed_by_template_agent_id", "organization_id"],
        unique=False,
        postgresql_where=sa.text("managed_by_template_agent_id IS NOT NULL"),
    )
    op.create_index(
        op.f("ix_watchers_organization_id"), "watchers", ["organization_id"], unique=False
    )
    op.create_index(
        "ix_watchers_source_row",
        "watchers",
        ["source_row_id"],
        unique=False,
        postgresql_where=sa.text("source_row_id IS NOT NULL"),
    )
    op.create_table(
        "entity_relationship_type_rules",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("relationship_type_id", sa.UUID(), nullable=False),
        sa.Column("source_entity_type_id", sa.UUID(), nullable=False),
        sa.Column("target_entity_type_id", sa.UUID(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_entity_relationship_type_rules_organization_id"),
        ),
        sa.ForeignKeyConstraint(
            ["relationship_type_id"],
            ["entity_relationship_types.id"],
            name=op.f("fk_entity_relationship_type_rules_relationship_type_id"),
        ),
        sa.ForeignKeyConstraint(
            ["source_entity_type_id"],
            ["entity_types.id"],
            name=op.f("fk_entity_relationship_type_rules_source_entity_type_id"),
        ),
        sa.ForeignKeyConstraint(
            ["target_entity_type_id"],
            ["entity_types.id"],
            name=op.f("fk_entity_relationship_type_rules_target_entity_type_id"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entity_relationship_type_rules")),
        sa.UniqueConstraint(
            "relationship_type_id",
            "source_entity_type_id",
            "target_entity_type_id",
            name="uq_entity_relationship_type_rules_endpoints",
        ),
    )
    op.create_index(
        op.f("ix_entity_relationship_type_rules_organization_id"),
        "entity_relationship_type_rules",
        ["organization_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_entity_relationship_type_rules_source_entity_type_id"),
        "entity_relationship_type_rules",
        ["source_entity_type_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_entity_relationship_type_rules_target_entity_type_id"),
        "entity_relationship_type_rules",
        ["target_entity_type_id"],
        unique=False,
    )
    op.create_table(
        "event_classifiers",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("attribute_key", sa.String(length=100), nullable=False),
        sa.Column("entity_type_id", sa.UUID(), nullable=True),
        sa.Column("watcher_id", sa.UUID(), nullable=True),
        sa.Column("current_version_id", sa.UUID(), nullable=True),
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("slug", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=20), server_default="active", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("managed_by_template_agent_id", sa.UUID(), nullable=True),
        sa.Column("source_template_org_id", sa.UUID(), nullable=True),
        sa.Column("source_row_id", sa.UUID(), nullable=True),
        sa.Column("mirrored_release_id", sa.UUID(), nullable=True),
        sa.Column("mirrored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("mirrored_hash", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'archived')", name=op.f("ck_event_classifiers_status")
        ),
        sa.ForeignKeyConstraint(
            ["entity_type_id"],
            ["entity_types.id"],
            name=op.f("fk_event_classifiers_entity_type_id"),
        ),
        sa.ForeignKeyConstraint(
            ["managed_by_template_agent_id"],
            ["agents.id"],
            name=op.f("fk_event_classifiers_managed_by_template_agent_id"),
        ),
        sa.ForeignKeyConstraint(
            ["mirrored_release_id"],
            ["template_releases.id"],
            name=op.f("fk_event_classifiers_mirrored_release_id"),
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_event_classifiers_organization_id"),
        ),
        sa.ForeignKeyConstraint(
            ["source_template_org_id"],
            ["organizations.id"],
            name=op.f("fk_event_classifiers_source_template_org_id"),
        ),
        sa.ForeignKeyConstraint(
            ["watcher_id"], ["watchers.id"], name=op.f("fk_event_classifiers_watcher_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_classifiers")),
        sa.UniqueConstraint(
            "organization_id", "slug", name=op.f("uq_event_classifiers_organization_id_slug")
        ),
    )
    op.create_index(
        op.f("ix_event_classifiers_entity_type_id"),
        "event_classifiers",
        ["entity_type_id"],
        unique=False,
    )
    op.create_index(
        "ix_event_classifiers_managed_by",
        "event_classifiers",
        ["managed_by_template_agent_id", "organization_id"],
        unique=False,
        postgresql_where=sa.text("managed_by_template_agent_id IS NOT NULL"),
    )
    op.create_index(
        op.f("ix_event_classifiers_organization_id"),
        "event_classifiers",
        ["organization_id"],
        unique=False,
    )
    op.create_index(
        "ix_event_classifiers_source_row",
        "event_classifiers",
        ["source_row_id"],
        unique=False,
        postgresql_where=sa.text("source_row_id IS NOT NULL"),
    )
    op.create_index(
        op.f("ix_event_classifiers_watcher_id"), "event_classifiers", ["watcher_id"], unique=False
    )
    op.create_table(
        "watcher_versions",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("watcher_id", sa.UUID(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("extraction_schema", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("sources_schema", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("reactions_guidance", sa.Text(), nullable=True),
        sa.Column("change_notes", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_watcher_versions_organization_id"),
        ),
        sa.ForeignKeyConstraint(
            ["watcher_id"], ["watchers.id"], name=op.f("fk_watcher_versions_watcher_id")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_watcher_versions")),
        sa.UniqueConstraint(
            "watcher_id", "version", name=op.f("uq_watcher_versions_watcher_id_version")
        ),
    )
    op.create_index(
        op.f("ix_watcher_versions_organization_id"),
        "watcher_versions",
        ["organization_id"],
        unique=False,
    )
    op.create_table(
        "event_classifier_versions",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("organization_id", sa.UUID(), nullable=False),
        sa.Column("classifier_id", sa.UUID(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("attribute_values", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("fallback_value", sa.String(length=200), nullable=True),
        sa.Column("extraction_config", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["classifier_id"],
            ["event_classifiers.id"],
            name=op.f("fk_event_classifier_versions_classifier_id"),
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_event_classifier_versions_organization_id"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_classifier_versions")),
        sa.UniqueConstraint(
            "classifier_id",
            "version",
            name=op.f("uq_event_classifier_versions_classifier_id_version"),
        ),
    )
    op.create_index(
        op.f("ix_event_classifier_versions_organization_id"),
        "event_classifier_versions",
        ["organization_id"],
        unique=False,
    )
    for name, table, referred, column in CYCLE_FKS:
        op.create_foreign_key(name, table, referred, [column], ["id"])

    op.execute(
        """
        CREATE FUNCTION install_content_hash(content jsonb) RETURNS text
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
        RETURN encode(sha256(convert_to(content::text, 'UTF8')), 'hex')
        """
    )
    op.execute(
        """
        CREATE FUNCTION refuse_append_only_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'restrict_violation';
        END
        $$
        """
    )
    for table in APPEND_ONLY_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION refuse_append_only_change()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION refuse_append_only_change()"
        )


def downgrade() -> None:
    for table in APPEND_ONLY_TABLES:
        op.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
    op.execute("DROP FUNCTION refuse_append_only_change()")
    op.execute("DROP FUNCTION install_content_hash(jsonb)")
    for name, table, _referred, _column in CYCLE_FKS:
        op.drop_constraint(name, table, type_="foreignkey")
    op.drop_index(
        op.f("ix_event_classifier_versions_organization_id"), table_name="event_classifier_versions"
    )
    op.drop_table("event_classifier_versions")
    op.drop_index(op.f("ix_watcher_versions_organization_id"), table_name="watcher_versions")
    op.drop_table("watcher_versions")
    op.drop_index(op.f("ix_event_classifiers_watcher_id"), table_name="event_classifiers")
    op.drop_index(
        "ix_event_classifiers_source_row",
        table_name="event_classifiers",
        postgresql_where=sa.text("source_row_id IS NOT NULL"),
    )
    op.drop_index(op.f("ix_event_classifiers_organization_id"), table_name="event_classifiers")
    op.drop_index(
        "ix_event_classifiers_managed_by",
        table_name="event_classifiers",
        postgresql_where=sa.text("managed_by_template_agent_id IS NOT NULL"),
    )
    op.drop_index(op.f("ix_event_classifiers_entity_type_id"), table_name="event_classifiers")
    op.drop_table("event_classifiers")
    op.drop_index(
        op.f("ix_entity_relationship_type_rules_target_entity_type_id"),
        table_name="entity_relationship_type_rules",
    )
    op.drop_index(
        op.f("ix_entity_relationship_type_rules_source_entity_type_id"),
        table_name="entity_relationship_type_rules",
    )
    op.drop_index(
        op.f("ix_entity_relationship_type_rules_organization_id"),
        table_name="entity_relationship_type_rules",
    )
    op.drop_table("entity_relationship_type_rules")
    op.drop_index(
        "ix_watchers_source_row",
        table_name="watchers",
        postgresql_where=sa.text("source_row_id IS NOT NULL"),
    )
    op.drop_index(op.f("ix_watchers_organization_id"), table_name="watchers")
    op.drop_index(
        "ix_watchers_managed_by",
        table_name="watchers",
        postgresql_where=sa.text("managed_by_template_agent_id IS NOT NULL"),
    )
    op.drop_index(op.f("ix_watchers_agent_id"), table_name="watchers")
    op.drop_table("watchers")
    op.drop_index(op.f("ix_install_events_organization_id"), table_name="install_events")
    op.drop_index(op.f("ix_install_events_install_id"), table_name="install_events")
    op.drop_table("install_events")
    op.drop_index(
        "ix_entity_types_source_row",
        table_name="entity_types",
        postgresql_where=sa.text("source_row_id IS NOT NULL"),
    )
    op.drop_index(op.f("ix_entity_types_organization_id"), table_name="entity_types")
    op.drop_index(
        "ix_entity_types_managed_by",
        table_name="entity_types",
        postgresql_where=sa.text("managed_by_template_agent_id IS NOT NULL"),
    )
    op.drop_table("entity_types")
    op.drop_index(
        "ix_entity_relationship_types_source_row",
        table_name="entity_relationship_types",
        postgresql_where=sa.text("source_row_id IS NOT NULL"),
    )
    op.drop_index(
        op.f("ix_entity_relationship_types_organization_id"), table_name="entity_relationship_types"
    )
    op.drop_index(
        "ix_entity_relationship_types_managed_by",
        table_name="entity_relationship_types",
        postgresql_where=sa.text("managed_by_template_agent_id IS NOT NULL"),
    )
    op.drop_table("entity_relationship_types")
    op.drop_table("template_releases")
    op.drop_index(op.f("ix_memberships_user_id"), table_name="memberships")
    op.drop_index(op.f("ix_memberships_organization_id"), table_name="memberships")
    op.drop_table("memberships")
    op.drop_index(op.f("ix_api_tokens_user_id"), table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_index(
        "uq_agents_template_org", table_name="agents", postgresql_where=sa.text("is_template")
    )
    op.drop_index(op.f("ix_agents_template_agent_id"), table_name="agents")
    op.drop_index(op.f("ix_agents_organization_id"), table_name="agents")
    op.drop_table("agents")
    op.drop_table("users")
    op.drop_table("organizations")
