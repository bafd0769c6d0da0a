"""Audit log entries as the API returns them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from install_service.pagination import Page


class AuditEntry(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    occurred_at: datetime
    # Null: the operator (command line) or the service itself.
    actor_user_id: uuid.UUID | None
    actor_email: str | None
    action: str
    target_type: str
    target_id: str
    organization_id: uuid.UUID | None
    request_id: str | None
    details: dict[str, Any]


class AuditPage(Page, kw_only=True):
    items: list[AuditEntry]
