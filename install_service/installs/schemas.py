"""Request and response bodies of the install API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from install_service.errors import worded
from install_service.orgs.schemas import OrgRef
from install_service.pagination import Page
from install_service.schemas import ONE_LINE, In, Kind, Out, Slug

Action = Literal[
    "install", "upgrade", "rollback", "reinstall", "uninstall", "reconcile", "detach", "none"
]
# An RFC 6901 JSON Pointer into an item ("" is the whole item, "/name" a field).
Pointer = Annotated[
    str,
    Meta(
        pattern=worded(
            r"^(/([^/~]|~[01])*)*(?!\n)$",
            "a JSON Pointer such as /name or /metadata_schema/properties/amount "
            "('~0' for '~', '~1' for '/' in a key)",
        ),
        max_length=1000,
        description="RFC 6901 JSON Pointer ('~0' is '~', '~1' is '/')",
    ),
]
Version = Annotated[int, Meta(ge=1, le=2_147_483_647)]
# One line of text, no control characters.
PinReason = Annotated[str, Meta(max_length=500, pattern=ONE_LINE)]
OrgReference = Annotated[
    str, Meta(min_length=1, max_length=100, description="Organization slug or id")
]


class ItemRef(In, kw_only=True):
    kind: Kind
    slug: Slug


class Resolution(In, kw_only=True):
    """How to settle a conflict: `take` the template's or the org's (`local`) value at `path`
    (omitted: the whole item). `local` also records the release as the item's new base, so
    the same release does not conflict again."""

    kind: Kind
    slug: Slug
    path: Pointer | None = None
    take: Literal["template", "local"]


class UpgradeRequest(In, kw_only=True):
    # Omitted: the latest release.
    version: Version | None = None
    dry_run: bool = False
    # Take the template's value at every conflicting path (never over `tenant` fields, and
    # never adopting the org's own rows).
    force: bool = False
    resolutions: Annotated[list[Resolution], Meta(max_length=10_000)] = msgspec.field(
        default_factory=list
    )
    # The org's own rows whose slugs the release uses, to take over (`true`: all of them).
    adopt: bool | Annotated[list[ItemRef], Meta(max_length=10_000)] = False
    # Pin the install where it lands, so resyncs leave it there (until unpinned).
    pin: bool = False
    # Install (or upgrade) the templates the release requires first, in the same transaction,
    # where the org lacks them; otherwise a missing requirement is a 422.
    with_requirements: bool = False


class InstallRequest(UpgradeRequest, kw_only=True):
    template: Slug
    # Omitted: the caller's personal organization.
    organization: OrgReference | None = None


class DetachRequest(ItemRef, kw_only=True):
    pass


class PinRequest(In, kw_only=True):
    # Omitted: until unpinned. Must be in the future.
    until: Annotated[datetime, Meta(tz=True)] | None = None
    reason: PinReason | None = None


class ReconcileRequest(In, kw_only=True):
    dry_run: bool = False


class TemplateRef(Out, kw_only=True):
    slug: str


class KindChanges(Out, kw_only=True):
    created: int
    updated: int
    unchanged: int
    archived: int
    adopted: int = 0
    detached: int = 0
    # Items a plan found in conflict (a dry run's; an operation that writes has none).
    conflict: int = 0


class FieldOutcome(Out, kw_only=True, omit_defaults=True):
    """What happens at one path of an item: `merged` (the release's value taken),
    `kept_local`, `overwritten` (the org's value replaced; it is kept in the history) or
    `conflict` (changed differently on both sides). `diff`: where the org's value or the
    release's is text spanning lines, the unified line diff from the org's to the
    release's."""

    path: str
    outcome: str
    diff: str | None = None


class RequiredBy(Out, kw_only=True):
    """An item of a dependent template installed in the org that references this one."""

    template: str
    kind: str
    slug: str


class PlanItem(Out, kw_only=True, omit_defaults=True):
    kind: str
    slug: str
    action: str
    reason: str | None = None
    fields: list[FieldOutcome] | None = None
    # A `required_by` conflict: the dependents' items that still reference this item.
    required_by: list[RequiredBy] | None = None


class Overwritten(Out, kw_only=True):
    """A local value an operation replaced with the template's (also kept in the history)."""

    kind: str
    slug: str
    path: str
    local: Any


class InstallResult(Out, kw_only=True):
    """What an install, upgrade, rollback, dry run or uninstall did (or would do).
    `conflicts` counts the items a dry run found in conflict (`would_conflict`: any), with
    `changes[kind].conflict` per kind; the operation itself would then be refused (409)."""

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
    overwritten: list[Overwritten] | None = None
    conflicts: int = 0
    would_conflict: bool = False


class InstallLink(Out, kw_only=True, omit_defaults=True):
    """Another install in the same org that this one requires, or that requires it
    (contract §13): its template, and the install itself (`install_id` None: the org has
    none; `min_version`: the minimum release this install's release asks for)."""

    template: str
    install_id: uuid.UUID | None
    version: int | None
    status: str | None
    min_version: int | None = None


class Install(Out, kw_only=True):
    id: uuid.UUID
    organization: OrgRef
    template: TemplateRef
    version: int | None
    status: str
    installed_at: datetime
    last_synced_at: datetime | None
    installed_by_user_id: uuid.UUID | None
    # Held at its release against resyncs (an expired pin no longer holds: false).
    pinned: bool = False
    pinned_until: datetime | None = None
    pin_reason: str | None = None
    # When the pin was set, and the email of who set it.
    pinned_at: datetime | None = None
    pinned_by: str | None = None
    # The installs in the org this one's release requires, and the active ones requiring it.
    requires: list[InstallLink] = msgspec.field(default_factory=list)
    required_by: list[InstallLink] = msgspec.field(default_factory=list)


class HistoryEvent(Out, kw_only=True):
    id: uuid.UUID
    action: str
    from_version: int | None
    to_version: int | None
    actor_user_id: uuid.UUID | None
    changes: dict[str, Any]
    created_at: datetime


class DriftField(Out, kw_only=True, omit_defaults=True):
    path: str
    # Null when the key is absent on that side.
    mirrored: Any
    current: Any
    # Text spanning lines: the unified line diff from the mirrored value to the current one.
    diff: str | None = None


class DriftItem(Out, kw_only=True):
    kind: str
    slug: str
    id: uuid.UUID | None
    drift: Literal["modified", "archived", "deleted"]
    fields: list[DriftField]


class DriftReport(Out, kw_only=True):
    install: Install
    drift: list[DriftItem]


class InstallPage(Page, kw_only=True):
    items: list[Install]


class HistoryPage(Page, kw_only=True):
    items: list[HistoryEvent]
