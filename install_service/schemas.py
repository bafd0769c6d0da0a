"""The msgspec types every domain's bodies and documents share: slugs, names, one-line text,
the kinds of item, and the bases of request and response bodies.

On the package's ground floor, so that one domain's schemas never import another's for a
field type (organizations and templates both have slugs and names).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from install_service.errors import worded

# `(?!\n)$`: Python's `$` also matches before a trailing newline; JSON Schema's does not.
Slug = Annotated[
    str,
    Meta(
        pattern=worded(
            r"^[a-z0-9][a-z0-9_-]*(?!\n)$",
            "a slug (lower-case letters, digits, '-' and '_', beginning with a letter or a digit)",
        ),
        max_length=100,
        description="Lower-case letters, digits, '-' and '_'; unique within its kind.",
    ),
]
Name = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=200,
        pattern=worded(
            r"^[^\x00-\x1f\x7f]+(?!\n)$", "text without control characters (one line, no tabs)"
        ),
        description="No control characters.",
    ),
]
ONE_LINE = worded(r"^[^\x00-\x1f\x7f]*(?!\n)$", "text without control characters (one line)")
Kind = Literal["entity_types", "relationship_types", "classifiers", "watchers"]


class In(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are a 400."""


class Out(msgspec.Struct, kw_only=True):
    """Base of response bodies."""
