"""Template documents (`templates/<slug>/template.yaml`): the msgspec Structs they decode into.

The same Structs generate the JSON Schema editors use (`templates/template.schema.json`), so the
schema and the validator cannot drift apart.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Slug = Annotated[
    str,
    Meta(
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        max_length=100,
        description="Lower-case letters, digits, '-' and '_'; unique within its kind.",
    ),
]
Name = Annotated[str, Meta(min_length=1, max_length=200)]
Text = Annotated[str, Meta(max_length=20_000)]
LongText = Annotated[str, Meta(max_length=200_000)]
AttributeKey = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]*$", max_length=100)]
JsonObject = Annotated[dict[str, Any], Meta(description="A JSON object (schemas: JSON Schema).")]


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


class RuleDoc(Doc, kw_only=True):
    source: Slug
    target: Slug


class RelationshipTypeDoc(Doc, kw_only=True):
    slug: Slug
    name: Name
    description: Text | None = None
    metadata_schema: JsonObject = msgspec.field(default_factory=dict)
    is_symmetric: bool = False
    inverse: Slug | None = None
    rules: list[RuleDoc] = msgspec.field(default_factory=list)


class ClassifierDoc(Doc, kw_only=True):
    slug: Slug
    name: Name
    description: Text | None = None
    attribute_key: AttributeKey
    entity_type: Slug | None = None
    watcher: Slug | None = None
    attribute_values: dict[str, Annotated[str, Meta(max_length=2_000)]] = msgspec.field(
        default_factory=dict
    )
    fallback_value: Annotated[str, Meta(max_length=200)] | None = None
    extraction_config: JsonObject = msgspec.field(default_factory=dict)


class WatcherDoc(Doc, kw_only=True):
    slug: Slug
    name: Name
    description: Text | None = None
    schedule: Annotated[str, Meta(max_length=100)] | None = None
    prompt: LongText
    extraction_schema: JsonObject = msgspec.field(default_factory=dict)
    sources_schema: JsonObject = msgspec.field(default_factory=dict)
    reactions_guidance: LongText | None = None


class TemplateDocument(Doc, kw_only=True):
    """One template: its identity and the bundle of schema it installs."""

    slug: Slug
    name: Name
    description: Text = ""
    visibility: Literal["public", "private"] = "public"
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


class TemplateManifest(TemplateSummary, kw_only=True):
    # Item slugs by kind in the latest release.
    items: dict[str, list[str]]


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
