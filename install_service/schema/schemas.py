"""An organization's schema items as the API, the command line and the console show them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import msgspec

from install_service.pagination import Page
from install_service.schemas import Kind, Out

# The kinds as the API's paths name them, and the kind each is everywhere else.
KindPath = Literal["entity-types", "relationship-types", "classifiers", "watchers"]
KINDS: dict[str, Kind] = {
    "entity-types": "entity_types",
    "relationship-types": "relationship_types",
    "classifiers": "classifiers",
    "watchers": "watchers",
}
PATHS: dict[str, str] = {kind: path for path, kind in KINDS.items()}
Status = Literal["active", "archived"]


class Provenance(Out, kw_only=True, omit_defaults=True):
    """Where an item comes from: `own` (authored in the organization), `managed` (mirrored
    by an install of `template`, last from its release `release`) or `detached` (taken over
    from `template`'s install: upgrades leave it alone)."""

    type: Literal["own", "managed", "detached"]
    template: str | None = None
    release: int | None = None
    install_id: uuid.UUID | None = None


class SchemaItem(Out, kw_only=True):
    """One item of an organization's schema. `document` is the item in its template
    document shape (references by slug); `etag` is the hash of that content (`If-Match`
    takes it); `edited`: a managed item that differs from what was mirrored; `version`:
    a watcher's or classifier's current version."""

    kind: Kind
    slug: str
    status: Status
    provenance: Provenance
    edited: bool
    etag: str
    version: int | None
    updated_at: datetime
    document: dict[str, Any]


class SchemaItemPage(Page, kw_only=True):
    items: list[SchemaItem]


class SchemaWrite(msgspec.Struct, kw_only=True):
    """What a write did: the item as it is now, and whether anything changed (an edit that
    leaves the item as it was, or archiving an archived one, writes nothing)."""

    item: SchemaItem
    changed: bool
