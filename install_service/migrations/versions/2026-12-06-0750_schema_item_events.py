"""The change feed admits an organization's own schema edits.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 07:50

Reviewed by hand. `events.type` gains `schema.item_created`, `schema.item_updated` and
`schema.item_archived`: one event per write an organization makes to its own schema through
the service (`install_service.schema`). No row changes, no table is rewritten; the check is
replaced in one transaction. Written alongside 0010 (detached_from_many) and placed after it:
the two touch different tables, so either order gives the same schema.

Downgrading keeps every event, these included (the feed is append-only history, and webhook
deliveries refer to them): the older constraint comes back `NOT VALID`, so the rows already
written stay while the older schema refuses new events of these types (the older code never
writes them). Upgrading again validates the constraint as it replaces it.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_TYPES = (
    "install.created",
    "install.upgraded",
    "install.rolled_back",
    "install.reinstalled",
    "install.uninstalled",
    "install.reconciled",
    "install.item_detached",
    "template.published",
)
NEW_TYPES = (*OLD_TYPES, "schema.item_created", "schema.item_updated", "schema.item_archived")


def _check(types: tuple[str, ...]) -> str:
    return "type IN (" + ", ".join(f"'{t}'" for t in types) + ")"


def upgrade() -> None:
    op.drop_constraint(op.f("ck_events_type"), "events", type_="check")
    op.create_check_constraint(op.f("ck_events_type"), "events", _check(NEW_TYPES))


def downgrade() -> None:
    op.drop_constraint(op.f("ck_events_type"), "events", type_="check")
    op.execute(
        f"ALTER TABLE events ADD CONSTRAINT ck_events_type CHECK ({_check(OLD_TYPES)}) NOT VALID"
    )
