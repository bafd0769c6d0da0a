"""The laws of the three-way merge and of diffs, checked on the database's own functions
(`install_merge`, `install_diff`: the one definition every statement uses) with generated
documents."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import URL

from install_service.db.engine import asyncpg_dsn

# Keys that need RFC 6901 escaping among ordinary ones.
KEYS = st.sampled_from(["a", "b", "c", "name", "a/b", "~", "~1", "x~0y", "/", ""])
SCALARS = st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(["", "x", "y", "zz"])
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
# A document in the shape of an item: top-level fields, each any JSON value.
FIELDS = st.sampled_from(["name", "description", "metadata_schema", "prompt"])
ITEMS = st.dictionaries(FIELDS, VALUES, min_size=1, max_size=4)

LAWS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def sql(install_service_database_url: URL) -> Iterator[psycopg.Connection[Any]]:
    """A plain connection to the test database, to call its functions directly."""
    with psycopg.connect(asyncpg_dsn(install_service_database_url), autocommit=True) as conn:
        yield conn


def merge(
    conn: psycopg.Connection[Any],
    base: dict[str, Any] | None,
    local: dict[str, Any],
    new: dict[str, Any],
    *,
    policies: dict[str, str] | None = None,
    resolutions: dict[str, str] | None = None,
    otherwise: str | None = None,
) -> dict[str, Any]:
    row = conn.execute(
        "SELECT install_merge(%s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s::jsonb, %s)",
        [
            None if base is None else json.dumps(base),
            json.dumps(local),
            json.dumps(new),
            json.dumps(policies or {}),
            json.dumps(resolutions or {}),
            otherwise,
        ],
    ).fetchone()
    assert row is not None
    result: dict[str, Any] = row[0]
    return result


def diff(conn: psycopg.Connection[Any], a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    return [
        (path, old, new)
        for path, old, new in conn.execute(
            "SELECT path, a_value, b_value FROM install_diff(%s::jsonb, %s::jsonb)",
            [None if a is None else json.dumps(a), None if b is None else json.dumps(b)],
        )
    ]


def pointer(keys: list[str]) -> str:
    return "".join("/" + k.replace("~", "~0").replace("/", "~1") for k in keys)


def keys_of(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def leaves(value: Any, at: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (key path, value) of a document, objects walked, arrays and scalars atomic."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from leaves(item, (*at, key))
    else:
        yield at, value


MISSING = object()


def canon(value: Any) -> str:
    """JSON's equality (Python's says False == 0); MISSING stays apart from null."""
    return "<missing>" if value is MISSING else json.dumps(value, sort_keys=True)


def lookup(doc: Any, keys: list[str]) -> Any:
    """The value at a key path, or MISSING (absent and null are different values)."""
    for key in keys:
        if not isinstance(doc, dict) or key not in doc:
            return MISSING
        doc = doc[key]
    return doc


def without_slug(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "slug"}


def with_slug(item: dict[str, Any]) -> dict[str, Any]:
    return {"slug": "s", **item}


class TestMergeLaws:
    @LAWS
    @given(base=ITEMS, new=ITEMS)
    def test_no_local_change_yields_the_release(
        self, sql: psycopg.Connection[Any], base: dict[str, Any], new: dict[str, Any]
    ) -> None:
        result = merge(sql, with_slug(base), with_slug(base), with_slug(new))
        assert canon(result["item"]) == canon(with_slug(new))
        assert result["conflicts"] == []

    @LAWS
    @given(base=ITEMS, local=ITEMS)
    def test_no_release_change_yields_the_local_value(
        self, sql: psycopg.Connection[Any], base: dict[str, Any], local: dict[str, Any]
    ) -> None:
        result = merge(sql, with_slug(base), with_slug(local), with_slug(base))
        assert canon(result["item"]) == canon(with_slug(local))
        assert result["conflicts"] == []

    @LAWS
    @given(base=ITEMS, both=ITEMS)
    def test_equal_changes_never_conflict(
        self, sql: psycopg.Connection[Any], base: dict[str, Any], both: dict[str, Any]
    ) -> None:
        result = merge(sql, with_slug(base), with_slug(both), with_slug(both))
        assert canon(result["item"]) == canon(with_slug(both))
        assert result["conflicts"] == []

    @LAWS
    @given(data=st.data(), base=st.dictionaries(KEYS, VALUES, min_size=1, max_size=4))
    def test_conflicts_are_exactly_the_paths_changed_differently_on_both_sides(
        self, sql: psycopg.Connection[Any], data: st.DataObject, base: dict[str, Any]
    ) -> None:
        """Edits at leaves of one object: each side changes some leaves; a conflict is reported
        at exactly the leaves both changed to different values, and every other edit of either
        side is in the result."""
        spots = [path for path, _ in leaves(base) if path]
        assume(spots)
        mine = data.draw(st.dictionaries(st.sampled_from(spots), SCALARS, max_size=3))
        theirs = data.draw(st.dictionaries(st.sampled_from(spots), SCALARS, max_size=3))

        def edited(changes: dict[tuple[str, ...], Any]) -> dict[str, Any]:
            doc = json.loads(json.dumps(base))
            for path, value in changes.items():
                node = doc
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = value
            return doc

        def at(doc: Any, path: tuple[str, ...]) -> str:
            for key in path:
                doc = doc[key]
            return json.dumps(doc)  # JSON's equality: false is not 0

        local, new = edited(mine), edited(theirs)
        result = merge(
            sql,
            {"slug": "s", "metadata_schema": base},
            {"slug": "s", "metadata_schema": local},
            {"slug": "s", "metadata_schema": new},
        )
        expected = {
            pointer(["metadata_schema", *path])
            for path in set(mine) & set(theirs)
            if at(local, path) != at(new, path)
            and at(local, path) != at(base, path)
            and at(new, path) != at(base, path)
        }
        assert set(result["conflicts"]) == expected
        merged = result["item"]["metadata_schema"]
        for path in mine:
            if at(new, path) == at(base, path):
                assert at(merged, path) == at(local, path)
        for path in theirs:
            if pointer(["metadata_schema", *path]) not in expected and at(new, path) != at(
                base, path
            ):
                assert at(merged, path) == at(new, path)

    @LAWS
    @given(base=ITEMS, local=ITEMS, new=ITEMS)
    def test_the_result_holds_no_path_neither_side_had(
        self,
        sql: psycopg.Connection[Any],
        base: dict[str, Any],
        local: dict[str, Any],
        new: dict[str, Any],
    ) -> None:
        result = merge(sql, with_slug(base), with_slug(local), with_slug(new))
        sides = {path for side in (local, new) for path, _ in leaves(side)}
        for path, value in leaves(without_slug(result["item"])):
            assert path in sides or any(path == p[: len(path)] and value == {} for p in sides), path
        for path in result["conflicts"]:
            # a conflict keeps the org's value
            assert canon(lookup(result["item"], keys_of(path))) == canon(
                lookup(local, keys_of(path))
            )

    @LAWS
    @given(base=ITEMS, local=ITEMS, new=ITEMS)
    def test_force_leaves_no_conflict_and_takes_the_release_there(
        self,
        sql: psycopg.Connection[Any],
        base: dict[str, Any],
        local: dict[str, Any],
        new: dict[str, Any],
    ) -> None:
        plain = merge(sql, with_slug(base), with_slug(local), with_slug(new))
        forced = merge(sql, with_slug(base), with_slug(local), with_slug(new), otherwise="template")
        assert forced["conflicts"] == []
        overwritten = {f["path"] for f in forced["fields"] if f["outcome"] == "overwritten"}
        assert overwritten == set(plain["conflicts"])

    @LAWS
    @given(base=ITEMS, local=ITEMS, new=ITEMS)
    def test_tenant_fields_keep_what_the_org_changed_and_never_conflict(
        self,
        sql: psycopg.Connection[Any],
        base: dict[str, Any],
        local: dict[str, Any],
        new: dict[str, Any],
    ) -> None:
        policies = dict.fromkeys({*base, *local, *new}, "tenant")
        result = merge(sql, with_slug(base), with_slug(local), with_slug(new), policies=policies)
        assert result["conflicts"] == []
        for field in {*local, *new, *base}:
            changed = canon(lookup(local, [field])) != canon(lookup(base, [field]))
            expected = lookup(local if changed else new, [field])
            assert canon(lookup(result["item"], [field])) == canon(expected)

    @LAWS
    @given(base=ITEMS, local=ITEMS, new=ITEMS)
    def test_template_fields_always_take_the_release(
        self,
        sql: psycopg.Connection[Any],
        base: dict[str, Any],
        local: dict[str, Any],
        new: dict[str, Any],
    ) -> None:
        policies = dict.fromkeys({*base, *local, *new}, "template")
        result = merge(sql, with_slug(base), with_slug(local), with_slug(new), policies=policies)
        assert canon(result["item"]) == canon(with_slug(new))
        assert result["conflicts"] == []
        for f in result["fields"]:
            if f["outcome"] == "overwritten":
                [field] = keys_of(f["path"])
                assert canon(f["local"]) == canon(local.get(field))

    @LAWS
    @given(
        base=st.lists(st.sampled_from("abcdef"), unique=True, max_size=5),
        local=st.lists(st.sampled_from("abcdef"), unique=True, max_size=5),
        new=st.lists(st.sampled_from("abcdef"), unique=True, max_size=5),
    )
    def test_sets_merge_without_conflict(
        self, sql: psycopg.Connection[Any], base: list[str], local: list[str], new: list[str]
    ) -> None:
        result = merge(
            sql,
            {"slug": "s", "event_kinds": base},
            {"slug": "s", "event_kinds": local},
            {"slug": "s", "event_kinds": new},
        )
        assert result["conflicts"] == []
        kept = set(result["item"]["event_kinds"])
        b, mine, theirs = set(base), set(local), set(new)
        # removed by either side: removed; added by either side: added
        assert kept == (mine & theirs) | (mine - b) | (theirs - b)
        assert len(result["item"]["event_kinds"]) == len(kept)


class TestDiffLaws:
    @LAWS
    @given(a=VALUES, b=VALUES)
    def test_a_diff_applied_to_a_gives_b(
        self, sql: psycopg.Connection[Any], a: Any, b: Any
    ) -> None:
        patched = {"root": json.loads(json.dumps(a))}
        for path, _old, new in diff(sql, a, b):
            keys = ["root", *keys_of(path)]
            node = patched
            for key in keys[:-1]:
                node = node[key]
            if new is None and path and keys[-1] not in _keys_at(b, keys_of(path)[:-1]):
                del node[keys[-1]]
            else:
                node[keys[-1]] = new
        assert canon(patched["root"]) == canon(b)

    @LAWS
    @given(keys=st.lists(KEYS, min_size=1, max_size=4), value=SCALARS)
    def test_keys_with_slash_and_tilde_round_trip(
        self, sql: psycopg.Connection[Any], keys: list[str], value: Any
    ) -> None:
        a: Any = "before"
        b: Any = value
        for key in reversed(keys):
            a, b = {key: a}, {key: b}
        assume(a != b)
        [(path, old, new)] = diff(sql, a, b)
        assert keys_of(path) == keys
        assert path == pointer(keys)
        assert canon([old, new]) == canon(["before", value])


def _keys_at(doc: Any, keys: list[str]) -> set[str]:
    for key in keys:
        doc = doc[key]
    return set(doc) if isinstance(doc, dict) else set()
