"""Line diffs of long text, for the paths drift, release diffs, conflicts and plans name.

A changed prompt is one value at one path (`/prompt`); shown as two whole strings it is
unreadable. Wherever a changed string spans lines, its path entry also carries a unified diff
of its lines (`difflib`), which the command line prints and the console marks line by line.

A leaf module: the standard library only.
"""

from __future__ import annotations

import difflib
from typing import Any

# Lines of context around each change, as `diff -u` shows them.
CONTEXT_LINES = 3


def unified(old: Any, new: Any, *, old_label: str, new_label: str) -> str | None:
    """The unified diff of `old` and `new` when both are text (or absent: no text) and at
    least one spans lines, else None (equal values, other JSON values, one-line text)."""
    if old == new or not all(v is None or isinstance(v, str) for v in (old, new)):
        return None
    before, after = old or "", new or ""
    if "\n" not in before and "\n" not in after:
        return None
    lines = difflib.unified_diff(
        before.splitlines(),
        after.splitlines(),
        fromfile=old_label,
        tofile=new_label,
        n=CONTEXT_LINES,
        lineterm="",
    )
    return "\n".join(lines) or None


def at_pointer(document: Any, pointer: str) -> Any:
    """The value at an RFC 6901 JSON Pointer (`/metadata_schema/properties/a~1b`) into JSON
    objects, or None where there is none (paths only ever lead through objects)."""
    value = document
    if pointer == "":
        return value
    for token in pointer.split("/")[1:]:
        if not isinstance(value, dict):
            return None
        value = value.get(token.replace("~1", "/").replace("~0", "~"))
    return value


def line_kind(line: str) -> str:
    """How a line of a unified diff reads: `added`, `removed`, `hunk`, `header` or
    `context` (for marking lines when showing a diff)."""
    if line.startswith(("+++", "---")):
        return "header"
    if line.startswith("@@"):
        return "hunk"
    if line.startswith("+"):
        return "added"
    if line.startswith("-"):
        return "removed"
    return "context"
