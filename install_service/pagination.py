"""Keyset pagination: `{items, next_cursor}` pages for every collection that grows with use.

A cursor is opaque to callers: the sort key of the last row of a page, tagged with the list it
belongs to, encoded as URL-safe base64 JSON. The next page is the rows strictly after that key
in the list's total order, so walking the cursors while rows are added returns every row that
existed at the start exactly once (rows added meanwhile may or may not appear).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import msgspec

from install_service.errors import BadRequest

DEFAULT_LIMIT = 50
MAX_LIMIT = 200

# A key's values as the database can compare them. A cursor is opaque, but one made by hand
# can hold anything its JSON can: a value PostgreSQL cannot take (an integer past the column's
# range, a time without a zone or beyond the calendar once moved to UTC, a NUL in a string)
# would fail the statement, so it is refused here as the malformed cursor it is.
Int4 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
Int8 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_CHECKED: dict[Any, Any] = {
    int: Int8,
    datetime: Annotated[datetime, msgspec.Meta(tz=True)],
    str: Annotated[str, msgspec.Meta(pattern="^[^\x00]*$")],
}


def _representable(value: Any) -> Any:
    if isinstance(value, datetime):
        value.astimezone(UTC)  # OverflowError past year 9999 (or before year 1) in UTC
    return value


class Page(msgspec.Struct, kw_only=True):
    """One page of a collection; `next_cursor` is null on the last page. Each collection
    subclasses it with its own `items: list[...]` (so its schema names the item type)."""

    items: list[Any]
    next_cursor: str | None


P = TypeVar("P", bound=Page)


@dataclass(frozen=True, kw_only=True)
class PageRequest:
    """What the caller asked for: at most `limit` items after `cursor`."""

    limit: int = DEFAULT_LIMIT
    cursor: str | None = None


@dataclass(frozen=True)
class Keyset:
    """The sort key of one list: its name (cursors of other lists are refused) and the types
    of its key's values, in order (`Int4` for an `integer` column; `int` is a `bigint`)."""

    name: str
    types: tuple[Any, ...]

    def after(self, page: PageRequest) -> tuple[Any, ...] | None:
        """The key to continue after, or None for the first page; a bad cursor is a 400."""
        if page.cursor is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(page.cursor.encode("ascii") + b"==")
            name, values = msgspec.json.decode(raw, type=tuple[str, list[Any]])
            if name != self.name or len(values) != len(self.types):
                raise ValueError(name)
            return tuple(
                _representable(msgspec.convert(v, _CHECKED.get(t, t)))
                for v, t in zip(values, self.types, strict=True)
            )
        except (
            ValueError,
            OverflowError,
            UnicodeEncodeError,
            binascii.Error,
            msgspec.MsgspecError,
        ) as exc:
            raise BadRequest(
                f"cursor {page.cursor!r} is not a cursor of this list; "
                "pass the next_cursor of a previous page unchanged",
                code="invalid_cursor",
            ) from exc

    def params(self, page: PageRequest) -> dict[str, Any]:
        """Bind parameters `after_0`, `after_1`, ... (all None on the first page) and
        `limit_plus_one`, for a query written as

            WHERE (CAST(:after_0 AS ...) IS NULL OR (a, b) > (:after_0, :after_1))
            ORDER BY a, b LIMIT :limit_plus_one
        """
        after = self.after(page) or (None,) * len(self.types)
        params: dict[str, Any] = {f"after_{i}": value for i, value in enumerate(after)}
        params["limit_plus_one"] = page.limit + 1
        return params

    def page(
        self,
        into: type[P],
        rows: Sequence[Any],
        page: PageRequest,
        key: Callable[[Any], Sequence[Any]],
    ) -> P:
        """The page (of type `into`) of `rows` fetched with `limit + 1`, and the cursor after
        its last row."""
        items = list(rows[: page.limit])
        if len(rows) <= page.limit or not items:
            return into(items=items, next_cursor=None)
        return into(items=items, next_cursor=self.cursor(key(items[-1])))

    def cursor(self, key: Sequence[Any]) -> str:
        """The cursor of the position right after the row whose sort key is `key`."""
        values = msgspec.to_builtins(list(key))
        cursor = base64.urlsafe_b64encode(msgspec.json.encode([self.name, values]))
        return cursor.decode("ascii").rstrip("=")


async def walk(fetch: Callable[[PageRequest], Awaitable[Page]]) -> list[Any]:
    """Every item of a collection, page by page (for the command line, which shows all)."""
    items: list[Any] = []
    page = PageRequest(limit=MAX_LIMIT)
    while True:
        found = await fetch(page)
        items += found.items
        if found.next_cursor is None:
            return items
        page = PageRequest(limit=MAX_LIMIT, cursor=found.next_cursor)
