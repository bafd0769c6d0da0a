"""Template documents (`<slug>/template.yaml`): the msgspec Structs they decode into.

The same Structs generate the JSON Schema editors use (`bundled/template.schema.json` beside
this module, next to the bundled templates), so the schema and the validator cannot drift
apart.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from install_service.errors import worded
from install_service.pagination import Page
from install_service.schemas import Kind, Name, Slug

Text = Annotated[str, Meta(max_length=20_000)]
LongText = Annotated[str, Meta(max_length=200_000)]
# `(?!\n)$`: Python's `$` also matches before a trailing newline; JSON Schema's does not.
AttributeKey = Annotated[
    str,
    Meta(
        pattern=worded(
            r"^[a-z][a-z0-9_]*(?!\n)$",
            "an attribute key (lower-case letters, digits and '_', beginning with a letter)",
        ),
        max_length=100,
    ),
]
JsonObject = Annotated[dict[str, Any], Meta(description="A JSON object (schemas: JSON Schema).")]
# A reference to an item: its slug, or `<template>:<slug>` for an item of a required template.
Ref = Annotated[
    str,
    Meta(
        pattern=worded(
            r"^([a-z0-9][a-z0-9_-]*:)?[a-z0-9][a-z0-9_-]*(?!\n)$",
            "a slug, or '<template>:<slug>' for an item of a required template",
        ),
        max_length=201,
        description="An item's slug, or `<template>:<slug>` for an item of a required template.",
    ),
]
Policy = Annotated[
    Literal["merge", "tenant", "template"],
    Meta(
        description="How upgrades treat an org's change to a field: `merge` (default) merges "
        "it path by path with the release's; `tenant` keeps the org's value once it changed "
        "it; `template` always takes the release's (the org's value is reported overwritten)."
    ),
]
FieldPolicies = Annotated[
    dict[str, Policy],
    Meta(description="Policies by top-level field name (release metadata, not content)."),
]


class Doc(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every document Struct: unknown fields are errors, fields are keyword-only."""


class EntityTypeDoc(Doc, kw_only=True):
    slug: Slug
    name: Name
    description: Text | None = None
    icon: Annotated[str, Meta(max_length=100)] | None = None
    color: Annotated[str, Meta(max_length=50)] | None = None
    metadata_schema: JsonObject = msgspec.field(default_factory=dict)
    event_kinds: list[Annotated[str, Meta(min_length=1, max_length=100)]] = msgspec.field(
        default_factory=list
    )
    policies: FieldPolicies = msgspec.field(default_factory=dict)


class RuleDoc(Doc, kw_only=True):
    source: Ref
    target: Ref


class RelationshipTypeDoc(Doc, kw_only=True):
    slug: Slug
    name: Name
    description: Text | None = None
    metadata_schema: JsonObject = msgspec.field(default_factory=dict)
    is_symmetric: bool = False
    inverse: Ref | None = None
    rules: list[RuleDoc] = msgspec.field(default_factory=list)
    policies: FieldPolicies = msgspec.field(default_factory=dict)


class ClassifierDoc(Doc, kw_only=True):
    slug: Slug
    name: Name
    description: Text | None = None
    attribute_key: AttributeKey
    entity_type: Ref | None = None
    watcher: Ref | None = None
    # Each value maps to a description, or to an object describing it (`{description,
    # examples: [...]}` and the like).
    attribute_values: dict[str, Annotated[str, Meta(max_length=2_000)] | JsonObject] = (
        msgspec.field(default_factory=dict)
    )
    fallback_value: Annotated[str, Meta(max_length=200)] | None = None
    extraction_config: JsonObject = msgspec.field(default_factory=dict)
    policies: FieldPolicies = msgspec.field(default_factory=dict)


class WatcherDoc(Doc, kw_only=True):
    slug: Slug
    name: Name
    description: Text | None = None
    schedule: Annotated[str, Meta(max_length=100)] | None = None
    prompt: LongText
    extraction_schema: JsonObject = msgspec.field(default_factory=dict)
    sources_schema: JsonObject = msgspec.field(default_factory=dict)
    reactions_guidance: LongText | None = None
    policies: FieldPolicies = msgspec.field(default_factory=dict)


class RequirementDoc(Doc, kw_only=True):
    """A template this one builds on: it must be installed in an org (at release `version`
    or later) before this one, and this one's items may reference its items as
    `<template>:<slug>`."""

    template: Slug
    version: Annotated[int, Meta(ge=1)] | None = None


class TemplateDocument(Doc, kw_only=True):
    """One template: its identity and the bundle of schema it installs."""

    slug: Slug
    name: Name
    description: Text = ""
    visibility: Literal["public", "private"] = "public"
    requires: list[RequirementDoc] = msgspec.field(default_factory=list)
    # Field policies per kind; an item's own `policies` override them. Watchers' `schedule`
    # is `tenant` unless said otherwise.
    policies: dict[Kind, FieldPolicies] = msgspec.field(default_factory=dict)
    entity_types: list[EntityTypeDoc] = msgspec.field(default_factory=list)
    relationship_types: list[RelationshipTypeDoc] = msgspec.field(default_factory=list)
    classifiers: list[ClassifierDoc] = msgspec.field(default_factory=list)
    watchers: list[WatcherDoc] = msgspec.field(default_factory=list)


ITEM_KINDS: dict[str, type[Doc]] = {
    "entity_types": EntityTypeDoc,
    "relationship_types": RelationshipTypeDoc,
    "classifiers": ClassifierDoc,
    "watchers": WatcherDoc,
}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a template document, for editors."""
    schema = msgspec.json.schema(TemplateDocument)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "install-service template document"
    return schema


class TemplateSummary(msgspec.Struct, kw_only=True):
    slug: str
    name: str
    description: str
    visibility: str
    latest_version: int | None


class RequirementInfo(msgspec.Struct, kw_only=True):
    """A template a release requires: the minimum release (None: any), and the release its
    references were checked against when it was published."""

    template: str
    version: int | None
    checked_version: int


class TemplateManifest(TemplateSummary, kw_only=True):
    # Item slugs by kind in the latest release.
    items: dict[str, list[str]]
    # What the latest release requires, and the templates whose latest release requires
    # this one.
    requires: list[RequirementInfo] = msgspec.field(default_factory=list)
    required_by: list[str] = msgspec.field(default_factory=list)


# Where a release came from: seeding by `serve`, the API, the CLI, or not recorded.
ReleaseSource = Literal["seed", "api", "cli", "unknown"]


class ReleaseSummary(msgspec.Struct, kw_only=True):
    template: str
    version: int
    predecessor_version: int | None
    content_hash: str
    notes: str
    source: ReleaseSource
    created_at: datetime


class Release(ReleaseSummary, kw_only=True):
    snapshot: dict[str, Any]
    requires: list[RequirementInfo] = msgspec.field(default_factory=list)


class DiffPath(msgspec.Struct, kw_only=True, omit_defaults=True):
    path: str
    # Null when the key is absent on that side.
    old: Any
    new: Any
    # Text spanning lines: the unified line diff from the old value to the new one.
    diff: str | None = None


class DiffItem(msgspec.Struct, kw_only=True):
    kind: str
    slug: str
    change: Literal["added", "removed", "changed"]
    paths: list[DiffPath]


class ReleaseDiff(msgspec.Struct, kw_only=True):
    template: str
    from_version: int = msgspec.field(name="from")
    to_version: int = msgspec.field(name="to")
    items: list[DiffItem]
    # The template's own fields that differ (`/name`, `/description`, `/visibility`,
    # `/policies/...`, `/requires`): a release may change these and no item.
    template_paths: list[DiffPath] = msgspec.field(default_factory=list)


class TemplatePage(Page, kw_only=True):
    items: list[TemplateSummary]


class ReleasePage(Page, kw_only=True):
    items: list[ReleaseSummary]


class PublishResult(msgspec.Struct, kw_only=True):
    template: str
    version: int
    release_id: uuid.UUID
    created: bool
    changes: dict[str, dict[str, int]]


class SeedResult(msgspec.Struct, kw_only=True):
    """What seeding did with a bundled template: `published` a new release, found it
    `unchanged`, or `kept` a latest release that someone else published (`source`)."""

    template: str
    action: Literal["published", "unchanged", "kept"]
    version: int
    source: ReleaseSource


class TemplateDiff(msgspec.Struct, kw_only=True):
    """What publishing a document would do; nothing was written. `next_version` is the
    release it would cut, None when the content equals the latest release."""

    template: str
    latest_version: int | None
    next_version: int | None
    changes: dict[str, dict[str, int]]
    # The items the new release would change, path by path (as the release diff shows them),
    # and the template's own fields it would change.
    items: list[DiffItem] = msgspec.field(default_factory=list)
    template_paths: list[DiffPath] = msgspec.field(default_factory=list)
