"""Events, webhook endpoints and deliveries as the API returns them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from install_service.orgs.schemas import OrgRef
from install_service.pagination import Page

EventType = Literal[
    "install.created",
    "install.upgraded",
    "install.rolled_back",
    "install.reinstalled",
    "install.uninstalled",
    "install.reconciled",
    "install.item_detached",
    "template.published",
    "schema.item_created",
    "schema.item_updated",
    "schema.item_archived",
]


class Event(msgspec.Struct, kw_only=True):
    """One lifecycle operation that changed something. `data`: `template`, `from_release` and
    `to_release` (`{id, version}` or null), `items` (`[{kind, slug, action, reason?,
    version_id?, version?}]`), for publishes the release `notes`, and for an organization's
    own schema edits (`schema.*`) the edited item's `provenance` (`template` is then the
    managing template, or null)."""

    id: uuid.UUID
    type: str
    organization: OrgRef
    install_id: uuid.UUID | None
    occurred_at: datetime
    data: dict[str, Any]


class EventPage(msgspec.Struct, kw_only=True):
    """Events after the cursor, oldest first. `next_cursor` is never null: store it and pass
    it back to get what comes next (an empty page returns one to poll with again)."""

    items: list[Event]
    next_cursor: str


class WebhookCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: Annotated[str, Meta(min_length=1, max_length=2000)]
    # Omitted: every type.
    event_types: list[EventType] | None = None
    # Slugs or ids; omitted: every organization.
    organizations: list[Annotated[str, Meta(min_length=1, max_length=100)]] | None = None


class WebhookEndpoint(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    url: str
    event_types: list[str] | None
    organizations: list[OrgRef] | None
    enabled: bool
    disabled_reason: str | None
    disabled_at: datetime | None
    consecutive_failures: int
    created_at: datetime


class WebhookCreated(WebhookEndpoint, kw_only=True):
    """The new endpoint with its signing secret, shown this once."""

    secret: str


class WebhookPage(Page, kw_only=True):
    items: list[WebhookEndpoint]


class DeliveryAttempt(msgspec.Struct, kw_only=True):
    attempted_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None
    succeeded: bool
    # Sent again on request, outside the endpoint's ordered stream.
    redelivery: bool


class Delivery(msgspec.Struct, kw_only=True):
    """One event owed to an endpoint, and every attempt to send it."""

    id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    organization: OrgRef
    status: Literal["pending", "succeeded", "failed"]
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None
    attempts: list[DeliveryAttempt]


class DeliveryPage(Page, kw_only=True):
    items: list[Delivery]
