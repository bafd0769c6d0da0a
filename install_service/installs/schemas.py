"""Request and response bodies of the install API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta

from install_service.installs.engine import PlanItem
from install_service.orgs.schemas import In, OrgRef, Out
from install_service.pagination import Page
from install_service.templates.schemas import Slug

Action = Literal["install", "upgrade", "rollback", "reinstall", "uninstall", "none"]
Version = Annotated[int, Meta(ge=1, le=2_147_483_647)]
OrgReference = Annotated[
    str, Meta(min_length=1, max_length=100, description="Organization slug or id")
]


class InstallRequest(In, kw_only=True):
    template: Slug
    # Omitted: the caller's personal organization.
    organization: OrgReference | None = None
    # Omitted: the latest release.
    version: Version | None = None
    dry_run: bool = False
    # Let the template win over local edits (`locally_modified` conflicts only).
    force: bool = False


class UpgradeRequest(In, kw_only=True):
    version: Version | None = None
    dry_run: bool = False
    force: bool = False


class TemplateRef(Out, kw_only=True):
    slug: str


class KindChanges(Out, kw_only=True):
    created: int
    updated: int
    unchanged: int
    archived: int


class InstallResult(Out, kw_only=True):
    """What an install, upgrade, rollback, dry run or uninstall did (or would do)."""

    id: uuid.UUID | None
    organization: OrgRef
    template: TemplateRef
    version: int
    status: str
    created: bool
    dry_run: bool
    action: Action
    changes: dict[str, KindChanges]
    items: list[PlanItem] | None = None


class Install(Out, kw_only=True):
    id: uuid.UUID
    organization: OrgRef
    template: TemplateRef
    version: int | None
    status: str
    installed_at: datetime
    last_synced_at: datetime | None
    installed_by_user_id: uuid.UUID | None


class HistoryEvent(Out, kw_only=True):
    id: uuid.UUID
    action: str
    from_version: int | None
    to_version: int | None
    actor_user_id: uuid.UUID | None
    changes: dict[str, Any]
    created_at: datetime


class DriftItem(Out, kw_only=True):
    kind: str
    slug: str
    id: uuid.UUID | None
    drift: Literal["modified", "archived", "deleted"]


class DriftReport(Out, kw_only=True):
    install: Install
    drift: list[DriftItem]


class InstallPage(Page[Install], kw_only=True):
    pass


class HistoryPage(Page[HistoryEvent], kw_only=True):
    pass
