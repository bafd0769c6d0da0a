"""SQLAlchemy models: the schema the migrations create, kept in step by `alembic check`.

The install engine speaks set-based SQL against these tables; the models exist for the
migrations' truth test, for simple look-ups, and as the one place the data model is written down.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from install_service.states import ITEM_STATUSES, RUN_STATUSES, UNFINISHED, sql_list
from install_service.vocabulary import EVENT_TYPES, WATCHER_UNSCHEDULED

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSONB,
        list[Any]: JSONB,
        uuid.UUID: UUID(as_uuid=True),
    }


def _pk() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, server_default=text("gen_random_uuid()"))


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


def _org_fk() -> Mapped[uuid.UUID]:
    return mapped_column(ForeignKey("organizations.id"), index=True)


class Organization(Base):
    """A tenant. A `personal` org belongs to exactly one user (`personal_owner_id`); every user
    has exactly one, which the database enforces (a unique key here, a deferred trigger on
    `users`)."""

    __tablename__ = "organizations"
    __table_args__ = (
        CheckConstraint("kind IN ('personal', 'team')", name="kind"),
        CheckConstraint("visibility IN ('private', 'public')", name="visibility"),
        CheckConstraint(
            "(kind = 'personal') = (personal_owner_id IS NOT NULL)", name="personal_owner"
        ),
    )

    id: Mapped[uuid.UUID] = _pk()
    slug: Mapped[str] = mapped_column(String(100), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20), server_default="team")
    visibility: Mapped[str] = mapped_column(String(20), server_default="private")
    personal_owner_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"), unique=True)
    created_at: Mapped[datetime] = _created_at()


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = _pk()
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), server_default="")
    is_platform_admin: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = _created_at()
    # Set: every token of the user stops working.
    deactivated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (
        UniqueConstraint("organization_id", "user_id"),
        CheckConstraint("role IN ('owner', 'admin', 'member')", name="role"),
    )

    id: Mapped[uuid.UUID] = _pk()
    organization_id: Mapped[uuid.UUID] = _org_fk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    role: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = _created_at()


class ApiToken(Base):
    """Opaque bearer tokens; only the SHA-256 of the token is stored, and its first characters
    (`prefix`) so people can tell their tokens apart."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint("bootstrap IN ('env', 'generated')", name="bootstrap"),)

    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), server_default="")
    prefix: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Written at most once a minute, so reads stay (nearly) write-free.
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Made by `serve` for the platform admin: from INSTALL_SERVICE_ADMIN_TOKEN ('env', revoked
    # when that value changes) or generated and printed once ('generated').
    bootstrap: Mapped[str | None] = mapped_column(String(20))


class Agent(Base):
    """A template agent (`is_template`, in its template org) or an install of one."""

    __tablename__ = "agents"
    __table_args__ = (
        UniqueConstraint("template_agent_id", "organization_id"),
        CheckConstraint("status IN ('active', 'uninstalled')", name="status"),
        CheckConstraint(
            "NOT (is_template AND template_agent_id IS NOT NULL)", name="template_kind"
        ),
        Index(
            "uq_agents_template_org",
            "organization_id",
            unique=True,
            postgresql_where=text("is_template"),
        ),
    )

    id: Mapped[uuid.UUID] = _pk()
    organization_id: Mapped[uuid.UUID] = _org_fk()
    slug: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, server_default="")
    is_template: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    template_agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id"), index=True)
    installed_release_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("template_releases.id", use_alter=True)
    )
    status: Mapped[str] = mapped_column(String(20), server_default="active")
    installed_by_user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    installed_at: Mapped[datetime] = _created_at()
    last_synced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A pin holds the install at its release against resyncs (never against the org's own
    # upgrades) from `pinned_at` until `pinned_until` (NULL: until unpinned).
    pinned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    pinned_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    pin_reason: Mapped[str | None] = mapped_column(Text)
    pinned_by_user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))


RELEASE_SOURCES = "('seed', 'api', 'cli', 'unknown')"


class TemplateRelease(Base):
    """An immutable published version of a template (the database refuses changes)."""

    __tablename__ = "template_releases"
    __table_args__ = (
        UniqueConstraint("template_agent_id", "version"),
        CheckConstraint(f"source IN {RELEASE_SOURCES}", name="source"),
    )

    id: Mapped[uuid.UUID] = _pk()
    template_agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"))
    version: Mapped[int] = mapped_column(Integer)
    predecessor_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("template_releases.id"))
    snapshot: Mapped[dict[str, Any]]
    content_hash: Mapped[str] = mapped_column(String(64))
    notes: Mapped[str] = mapped_column(Text, server_default="")
    created_by_user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = _created_at()
    # Who cut it: `seed` (bundled content published by `serve`), `api`, `cli`, or `unknown`
    # (cut before releases recorded it). Seeding only ever replaces a `seed` release.
    source: Mapped[str] = mapped_column(Text, server_default="unknown")


class TemplateReleaseItem(Base):
    """One item of a release's snapshot, with its content hash, written when the release is cut.

    The engine reads a release through these rows: an index look-up per item instead of
    unnesting and hashing the whole snapshot in every statement. Append-only like the release.
    """

    __tablename__ = "template_release_items"
    __table_args__ = (
        CheckConstraint(
            "kind IN ('entity_types', 'relationship_types', 'classifiers', 'watchers')",
            name="kind",
        ),
    )

    release_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("template_releases.id"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    slug: Mapped[str] = mapped_column(Text, primary_key=True)
    item: Mapped[dict[str, Any]]
    content_hash: Mapped[str] = mapped_column(String(64))
    # The item's effective field policies (release metadata, not content): the defaults, then
    # the document's per kind, then the item's own.
    policies: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


class TemplateReleaseRequirement(Base):
    """A template a release requires (contract §13): installed and active in an org, at a
    release of at least `min_version`, before the release can be installed there. Written
    with the release, never changed."""

    __tablename__ = "template_release_requirements"
    __table_args__ = (
        Index("ix_template_release_requirements_required", "required_template_agent_id"),
    )

    release_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("template_releases.id"), primary_key=True
    )
    required_template_agent_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("agents.id"), primary_key=True
    )
    min_version: Mapped[int | None]
    # The requirement's release the references were checked against when this was published.
    checked_release_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("template_releases.id"))


class TemplateReleaseReference(Base):
    """An item of a required template that a release references (`<template>:<slug>`), and
    the release's own item that references it. Written with the release, never changed."""

    __tablename__ = "template_release_references"

    release_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("template_releases.id"), primary_key=True
    )
    required_template_agent_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("agents.id"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    slug: Mapped[str] = mapped_column(Text, primary_key=True)
    item_kind: Mapped[str] = mapped_column(Text, primary_key=True)
    item_slug: Mapped[str] = mapped_column(Text, primary_key=True)


class InstallEvent(Base):
    """History of an install: one row per install, upgrade, rollback, reinstall, uninstall."""

    __tablename__ = "install_events"
    __table_args__ = (
        CheckConstraint(
            "action IN ('install', 'upgrade', 'rollback', 'reinstall', 'uninstall', "
            "'reconcile', 'detach')",
            name="action",
        ),
    )

    id: Mapped[uuid.UUID] = _pk()
    organization_id: Mapped[uuid.UUID] = _org_fk()
    install_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"), index=True)
    action: Mapped[str] = mapped_column(String(20))
    from_release_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("template_releases.id"))
    to_release_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("template_releases.id"))
    actor_user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    changes: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _created_at()


class AuditEntry(Base):
    """Append-only record of every admin action and every install lifecycle action that changed
    something (the database refuses UPDATE, DELETE and TRUNCATE)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_occurred", "occurred_at", "id"),)

    id: Mapped[uuid.UUID] = _pk()
    occurred_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # NULL: the operator (command line) or the service itself.
    actor_user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"), index=True)
    action: Mapped[str] = mapped_column(String(60))
    target_type: Mapped[str] = mapped_column(String(40))
    target_id: Mapped[str] = mapped_column(String(200))
    organization_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("organizations.id"), index=True
    )
    request_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


class _Mirrored:
    """Columns shared by every table an install mirrors into: slug, status and provenance."""

    id: Mapped[uuid.UUID] = _pk()
    organization_id: Mapped[uuid.UUID] = _org_fk()
    slug: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), server_default="active")
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()
    managed_by_template_agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id"))
    source_template_org_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("organizations.id"))
    source_row_id: Mapped[uuid.UUID | None]
    mirrored_release_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("template_releases.id")
    )
    mirrored_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    mirrored_hash: Mapped[str | None] = mapped_column(String(64))
    # The hash of the row's content as it is now (`install_content`), kept true by the
    # database's triggers whoever writes the row (migration 0011).
    content_hash: Mapped[str | None] = mapped_column(String(64))
    # The templates whose installs the org took this row over from (detach): each of them
    # leaves the slug alone until it adopts the row back, whoever manages the row meanwhile
    # (another template may adopt it). Not a foreign key: PostgreSQL has none for arrays, and
    # template agents are never deleted.
    detached_from_template_agent_ids: Mapped[list[uuid.UUID]] = mapped_column(
        ARRAY(UUID(as_uuid=True)), server_default=text("'{}'::uuid[]")
    )
    # Not as the install that manages (or managed) it left it: archived, content not what
    # was mirrored, or detached (migration 0016); what a batch plan reads besides the items
    # a release moves.
    unlike_mirrored: Mapped[bool] = mapped_column(
        Computed(
            "managed_by_template_agent_id IS NOT NULL AND (status <> 'active' "
            "OR content_hash IS DISTINCT FROM mirrored_hash) "
            "OR cardinality(detached_from_template_agent_ids) > 0",
            persisted=True,
        )
    )


def _mirrored_args(table: str) -> tuple[Any, ...]:
    return (
        UniqueConstraint("organization_id", "slug"),
        CheckConstraint("status IN ('active', 'archived')", name="status"),
        Index(
            f"ix_{table}_managed_by",
            "managed_by_template_agent_id",
            "organization_id",
            postgresql_where=text("managed_by_template_agent_id IS NOT NULL"),
        ),
        Index(
            f"ix_{table}_source_row",
            "source_row_id",
            postgresql_where=text("source_row_id IS NOT NULL"),
        ),
        # The rows a batch plan reads besides the items a release moves (migration 0016).
        Index(
            f"ix_{table}_unlike_mirrored",
            "organization_id",
            postgresql_where=text("unlike_mirrored"),
        ),
    )


class EntityType(_Mirrored, Base):
    __tablename__ = "entity_types"
    __table_args__ = _mirrored_args("entity_types")

    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    icon: Mapped[str | None] = mapped_column(String(100))
    color: Mapped[str | None] = mapped_column(String(50))
    metadata_schema: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    event_kinds: Mapped[list[Any]] = mapped_column(server_default=text("'[]'::jsonb"))


class RelationshipType(_Mirrored, Base):
    __tablename__ = "entity_relationship_types"
    __table_args__ = _mirrored_args("entity_relationship_types")

    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    metadata_schema: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    is_symmetric: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    inverse_type_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("entity_relationship_types.id")
    )


class RelationshipTypeRule(Base):
    __tablename__ = "entity_relationship_type_rules"
    __table_args__ = (
        UniqueConstraint(
            "relationship_type_id",
            "source_entity_type_id",
            "target_entity_type_id",
            name="uq_entity_relationship_type_rules_endpoints",
        ),
    )

    id: Mapped[uuid.UUID] = _pk()
    organization_id: Mapped[uuid.UUID] = _org_fk()
    relationship_type_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("entity_relationship_types.id")
    )
    source_entity_type_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("entity_types.id"), index=True
    )
    target_entity_type_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("entity_types.id"), index=True
    )
    created_at: Mapped[datetime] = _created_at()


class Watcher(_Mirrored, Base):
    __tablename__ = "watchers"
    __table_args__ = (
        *_mirrored_args("watchers"),
        Index(
            "ix_watchers_unscheduled",
            "organization_id",
            postgresql_where=text(WATCHER_UNSCHEDULED),
        ),
    )

    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    schedule: Mapped[str | None] = mapped_column(String(100))
    # Tenant-local: survive upgrades.
    schedule_enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    next_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    connection_id: Mapped[uuid.UUID | None]
    current_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("watcher_versions.id", use_alter=True)
    )
    agent_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id"), index=True)


class WatcherVersion(Base):
    """Append-only: the database refuses UPDATE and DELETE."""

    __tablename__ = "watcher_versions"
    __table_args__ = (UniqueConstraint("watcher_id", "version"),)

    id: Mapped[uuid.UUID] = _pk()
    organization_id: Mapped[uuid.UUID] = _org_fk()
    watcher_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("watchers.id"))
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[str] = mapped_column(Text)
    extraction_schema: Mapped[dict[str, Any]]
    sources_schema: Mapped[dict[str, Any]]
    reactions_guidance: Mapped[str | None] = mapped_column(Text)
    change_notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class EventClassifier(_Mirrored, Base):
    __tablename__ = "event_classifiers"
    __table_args__ = _mirrored_args("event_classifiers")

    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    attribute_key: Mapped[str] = mapped_column(String(100))
    entity_type_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("entity_types.id"), index=True
    )
    watcher_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("watchers.id"), index=True)
    current_version_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("event_classifier_versions.id", use_alter=True)
    )


class EventClassifierVersion(Base):
    """Append-only: the database refuses UPDATE and DELETE."""

    __tablename__ = "event_classifier_versions"
    __table_args__ = (UniqueConstraint("classifier_id", "version"),)

    id: Mapped[uuid.UUID] = _pk()
    organization_id: Mapped[uuid.UUID] = _org_fk()
    classifier_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("event_classifiers.id"))
    version: Mapped[int] = mapped_column(Integer)
    attribute_values: Mapped[dict[str, Any]]
    fallback_value: Mapped[str | None] = mapped_column(String(200))
    extraction_config: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = _created_at()


class MirroredDeletion(Base):
    """A managed row deleted from an org (by hand: the service archives), written by the
    tables' statement triggers: a batch plan looks at that slug again (migration 0016)."""

    __tablename__ = "mirrored_deletions"

    template_agent_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    organization_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(30), primary_key=True)
    slug: Mapped[str] = mapped_column(String(100), primary_key=True)
    deleted_at: Mapped[datetime] = _created_at()


class ResyncRun(Base):
    """An admin's request to move the active installs of a template to one release, wave by
    wave (see `install_service.states` for what each status means)."""

    __tablename__ = "resync_runs"
    __table_args__ = (
        CheckConstraint(f"status IN {sql_list(RUN_STATUSES)}", name="status"),
        CheckConstraint("max_conflict_rate BETWEEN 0 AND 1", name="max_conflict_rate"),
        CheckConstraint("max_failure_rate BETWEEN 0 AND 1", name="max_failure_rate"),
        CheckConstraint("bake_seconds >= 0", name="bake_seconds"),
        # At most one unfinished run per template: an identical request joins it.
        Index(
            "uq_resync_runs_in_progress",
            "template_agent_id",
            unique=True,
            postgresql_where=text(f"status IN {sql_list(UNFINISHED)}"),
        ),
    )

    id: Mapped[uuid.UUID] = _pk()
    template_agent_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("agents.id"), index=True)
    release_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("template_releases.id"))
    force: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    status: Mapped[str] = mapped_column(String(20), server_default="queued")
    requested_by_user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Which installs, in which waves: the request's `orgs`, `exclude` and `waves` with every
    # organization resolved to its id (`{}`: every active install, one wave).
    selection: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    include_pinned: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    max_conflict_rate: Mapped[Decimal | None] = mapped_column(Numeric)
    max_failure_rate: Mapped[Decimal | None] = mapped_column(Numeric)
    bake_seconds: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    start_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Waves are numbered 1..wave_count; items are claimed from `current_wave` only.
    wave_count: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    current_wave: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    # When a scheduled or baking run moves on.
    next_step_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    halt_reason: Mapped[str | None] = mapped_column(Text)


class ResyncItem(Base):
    """One org's part of a run: processed in its own transaction, claimed with SKIP LOCKED."""

    __tablename__ = "resync_items"
    __table_args__ = (
        UniqueConstraint("run_id", "organization_id"),
        CheckConstraint(f"status IN {sql_list(ITEM_STATUSES)}", name="status"),
        # Counts per wave and status (index-only), and listings in (wave, organization) order.
        Index(
            "ix_resync_items_run_wave",
            "run_id",
            "wave",
            "organization_id",
            postgresql_include=["status"],
        ),
        # The claim: the next pending item of a run's current wave, whatever the number of
        # items already finished.
        Index(
            "ix_resync_items_pending",
            "run_id",
            "wave",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = _pk()
    run_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("resync_runs.id"))
    organization_id: Mapped[uuid.UUID] = _org_fk()
    # Empty for an item that installs the template until its install exists.
    install_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id"), index=True)
    # The org had no active install of the template when the run began: the item installs it.
    installs: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    wave: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    status: Mapped[str] = mapped_column(String(20), server_default="pending")
    # Why an item was skipped or cancelled (`pinned`, `uninstalled`, `cancelled`), or that a
    # succeeded item's install was already at the release (`unchanged`).
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    conflicts: Mapped[list[Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Event(Base):
    """The change feed's outbox: one row per lifecycle operation that changed something,
    written in that operation's transaction. Append-only (the database refuses UPDATE, DELETE
    and TRUNCATE).

    Readers follow `(txid, seq)`. A trigger sets `txid` to the larger of the writing
    transaction's id and every `txid` already visible to it, and readers only return events
    whose `txid` is below the oldest transaction of this database still running: an event
    committed later always sorts after everything a reader has already been given.
    """

    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint("type IN (" + ", ".join(f"'{t}'" for t in EVENT_TYPES) + ")", name="type"),
        Index("uq_events_order", "txid", "seq", unique=True),
        Index("ix_events_organization_order", "organization_id", "txid", "seq"),
    )

    id: Mapped[uuid.UUID] = _pk()
    txid: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    type: Mapped[str] = mapped_column(String(60))
    organization_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"))
    install_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("agents.id"))
    occurred_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


class WebhookEndpoint(Base):
    """Where events are pushed, signed per the Standard Webhooks specification."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[uuid.UUID] = _pk()
    url: Mapped[str] = mapped_column(String(2000))
    # The signing secret (`whsec_` + base64); kept because every delivery is signed with it.
    secret: Mapped[str] = mapped_column(String(100))
    # NULL: every type, every organization.
    event_types: Mapped[list[str] | None] = mapped_column(ARRAY(String(60)))
    organization_ids: Mapped[list[uuid.UUID] | None] = mapped_column(ARRAY(UUID(as_uuid=True)))
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_by_user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = _created_at()


class WebhookDelivery(Base):
    """One event owed to one endpoint. Deliveries of one (endpoint, organization) go out in
    feed order: the oldest pending one is the only one attempted."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id"),
        CheckConstraint("status IN ('pending', 'succeeded', 'failed')", name="status"),
        Index(
            "ix_webhook_deliveries_lane",
            "endpoint_id",
            "organization_id",
            "event_txid",
            "event_seq",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = _pk()
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    event_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("events.id"))
    organization_id: Mapped[uuid.UUID] = _org_fk()
    # The event's place in the feed, for ordering a lane without a join.
    event_txid: Mapped[int] = mapped_column(BigInteger)
    event_seq: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20), server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    # Set while a worker is sending it; a worker that dies leaves it to expire.
    leased_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookAttempt(Base):
    """Every attempt to send a delivery, automatic or requested."""

    __tablename__ = "webhook_attempts"

    id: Mapped[uuid.UUID] = _pk()
    delivery_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[float] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    succeeded: Mapped[bool] = mapped_column(Boolean)
    redelivery: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class ConsoleSession(Base):
    """A browser signed in to the console with an API token. The cookie holds a secret whose
    SHA-256 is `secret_hash`; the session lives while its token does (and until sign-out,
    `expires_at`, or a long idle spell)."""

    __tablename__ = "console_sessions"

    id: Mapped[uuid.UUID] = _pk()
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    # SHA-256 of the CSRF token the browser held when it signed in: forms must carry it.
    csrf_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created_at()
    # Written at most once a minute, like a token's `last_used_at`.
    last_seen_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ConsoleSecret(Base):
    """The key that signs the console's CSRF tokens: one row, shared by every replica."""

    __tablename__ = "console_secret"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, server_default=text("1"))
    # Made by the migration from PostgreSQL's strong random source.
    secret: Mapped[str] = mapped_column(String(64))
