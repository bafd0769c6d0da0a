"""Loading and validating template documents, reporting every problem at once.

msgspec stops at the first error of a value, so the document is checked item by item: each
item's structural error is reported with its path, then the references between items are
checked on the items that decoded. Nothing here touches the database.
"""

from __future__ import annotations

import dataclasses
import graphlib
import heapq
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from install_service.errors import SchemaItemInvalid, TemplateDocumentInvalid, in_words
from install_service.templates.schemas import (
    ITEM_KINDS,
    ClassifierDoc,
    Doc,
    EntityTypeDoc,
    RelationshipTypeDoc,
    TemplateDocument,
)
from install_service.watchers import schedules

Format = Literal["yaml", "toml", "json"]
DOCUMENT_NAMES = ("template.yaml", "template.yml", "template.toml", "template.json")
MAX_ITEMS_PER_KIND = 2_000
MAX_JSON_OBJECT_BYTES = 256 * 1024
# Control characters other than tab, newline and carriage return; NUL cannot be stored at all.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class _Problems:
    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append({"path": path, "message": message})


def decode(raw: bytes | str, fmt: Format) -> Any:
    """Decode YAML, TOML or JSON into JSON-compatible builtins (YAML dates become strings)."""
    try:
        if fmt == "json":
            return msgspec.json.decode(raw)
        data = msgspec.yaml.decode(raw) if fmt == "yaml" else msgspec.toml.decode(raw)
        return msgspec.json.decode(msgspec.json.encode(data))
    except (msgspec.DecodeError, msgspec.EncodeError, ValueError) as exc:
        raise TemplateDocumentInvalid(
            [{"path": "$", "message": f"not valid {fmt.upper()}: {exc}"}]
        ) from exc


def load_path(path: Path) -> TemplateDocument:
    """Load `path` (a document file, or a directory holding `template.yaml|toml|json`)."""
    if path.is_dir():
        found = [path / name for name in DOCUMENT_NAMES if (path / name).is_file()]
        if not found:
            raise TemplateDocumentInvalid(
                [{"path": str(path), "message": f"no {' or '.join(DOCUMENT_NAMES)} here"}]
            )
        path = found[0]
    suffix = path.suffix.lstrip(".")
    fmt: Format = "yaml" if suffix in ("yaml", "yml") else "toml" if suffix == "toml" else "json"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TemplateDocumentInvalid(
            [{"path": str(path), "message": f"cannot read it: {exc.strerror or exc}"}]
        ) from exc
    return parse(decode(raw, fmt))


def load_directory(directory: Path) -> list[tuple[Path, TemplateDocument]]:
    """Every document in `directory`'s subdirectories (`<slug>/template.yaml|toml|json`), with
    its path, in the order to publish them in (`requirement_order`)."""
    return requirement_order(
        (path, load_path(path)) for path in sorted(directory.glob("*/template.*"))
    )


def requirement_order(
    found: Iterable[tuple[Path, TemplateDocument]],
) -> list[tuple[Path, TemplateDocument]]:
    """Documents in the order to publish them in: each after the documents it requires among
    them (publishing checks a document against its requirements' releases, so those must be
    published first), otherwise in the order given. Requirements not among them are left to
    publishing to find; requirements that make a cycle are refused here, naming it."""
    listed = list(found)
    by_slug: dict[str, list[int]] = {}
    for index, (_, document) in enumerate(listed):
        by_slug.setdefault(document.slug, []).append(index)
    sorter: graphlib.TopologicalSorter[int] = graphlib.TopologicalSorter()
    for index, (_, document) in enumerate(listed):
        sorter.add(index, *(i for r in document.requires for i in by_slug.get(r.template, ())))
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        cycle = " -> ".join(listed[i][1].slug for i in reversed(exc.args[1]))
        path = listed[exc.args[1][0]][0]
        raise TemplateDocumentInvalid(
            [{"path": f"{path}: $.requires", "message": f"requirements make a cycle: {cycle}"}]
        ) from exc
    ordered: list[tuple[Path, TemplateDocument]] = []
    ready: list[int] = []
    while sorter.is_active():
        for index in sorter.get_ready():
            heapq.heappush(ready, index)
        index = heapq.heappop(ready)
        ordered.append(listed[index])
        sorter.done(index)
    return ordered


def parse(data: Any) -> TemplateDocument:
    """Validate decoded builtins as a template document; raise with every problem found."""
    problems = _Problems()
    if not isinstance(data, dict):
        raise TemplateDocumentInvalid([{"path": "$", "message": "expected a mapping"}])
    _check_strings(data, "$", problems)

    head = {k: v for k, v in data.items() if k not in ITEM_KINDS}
    document = _convert(head, TemplateDocument, "$", problems)
    items: dict[str, list[Any]] = {}
    for kind, item_type in ITEM_KINDS.items():
        items[kind] = _convert_items(data.get(kind, []), item_type, f"$.{kind}", problems)
    if document is None:
        raise TemplateDocumentInvalid(problems.items)

    complete: TemplateDocument = msgspec.structs.replace(document, **items)
    _check_references(complete, problems)
    if problems.items:
        raise TemplateDocumentInvalid(problems.items)
    return complete


def parse_item(kind: str, data: Any, known: Known) -> Any:
    """Validate decoded builtins as one item of `kind` (an organization's own edit): the
    item Struct and every rule a document's item follows, its references resolved in
    `known` (to which the item itself is added, as a document would list it). Raise with
    every problem found, paths starting at the item (`$.name`).

    Field policies are release metadata a template declares; an item written on its own has
    none."""
    problems = _Problems()
    if not isinstance(data, dict):
        raise SchemaItemInvalid([{"path": "$", "message": "expected a mapping"}])
    _check_strings(data, "$", problems)
    slug = data.get("slug")
    if isinstance(slug, str) and slug.startswith("$"):
        problems.add(
            "$.slug", f"slug {slug!r} is reserved: slugs starting with '$' are system rows"
        )
        raise SchemaItemInvalid(problems.items)
    item = _convert(data, ITEM_KINDS[kind], "$", problems)
    if item is not None:
        if item.policies:
            problems.add(
                "$.policies",
                "policies are release metadata that a template declares; "
                "an organization's item has none",
            )
        check_item(kind, item, "$", _adding(known, kind, item), problems, pairs_free_inverse=True)
    if problems.items:
        raise SchemaItemInvalid(problems.items)
    return item


def _adding(known: Known, kind: str, item: Any) -> Known:
    """`known` with `item` in it (replacing the item of the same slug)."""
    if kind == "entity_types":
        return dataclasses.replace(known, entity_types={*known.entity_types, item.slug})
    if kind == "watchers":
        return dataclasses.replace(known, watchers={*known.watchers, item.slug})
    if kind == "relationship_types":
        pairs = {**known.relationship_types, item.slug: (item.inverse, item.is_symmetric)}
        return dataclasses.replace(known, relationship_types=pairs)
    return known


def item_content(item: Any) -> dict[str, Any]:
    """An item as its content: the shape a release item has and a row is rebuilt in
    (`install_content`), every optional field explicit, rules in order, no policies."""
    content: dict[str, Any] = msgspec.to_builtins(item)
    content.pop("policies", None)
    if "rules" in content:
        content["rules"] = sorted(content["rules"], key=lambda r: (r["source"], r["target"]))
    return content


def _convert(value: Any, type_: type[Doc], path: str, problems: _Problems) -> Any:
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        problems.add(path, in_words(str(exc)).replace("`$", f"`{path}"))
        return None


def _convert_items(raw: Any, item_type: type[Doc], path: str, problems: _Problems) -> list[Any]:
    if not isinstance(raw, list):
        problems.add(path, "expected a list")
        return []
    if len(raw) > MAX_ITEMS_PER_KIND:
        problems.add(path, f"at most {MAX_ITEMS_PER_KIND} items, got {len(raw)}")
    converted = []
    for index, item in enumerate(raw):
        item_path = f"{path}[{index}]"
        slug = item.get("slug") if isinstance(item, dict) else None
        if isinstance(slug, str) and slug.startswith("$"):
            problems.add(
                f"{item_path}.slug",
                f"slug {slug!r} is reserved: slugs starting with '$' are system rows",
            )
            continue
        value = _convert(item, item_type, item_path, problems)
        if value is not None:
            converted.append(value)
    return converted


def _check_strings(value: Any, path: str, problems: _Problems) -> None:
    """Reject strings PostgreSQL cannot store or that hide control characters."""
    if isinstance(value, str):
        if _CONTROL.search(value):
            problems.add(path, "contains a control character (NUL and the like are not allowed)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            problems.add(path, "contains an unpaired surrogate: not valid Unicode text")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, f"{path} (key)", problems)
            _check_strings(item, f"{path}.{key}", problems)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_strings(item, f"{path}[{index}]", problems)


@dataclass(frozen=True, kw_only=True)
class Known:
    """What an item's references may point at: the slugs of the entity types and watchers,
    and each relationship type's inverse and whether it is symmetric. A document knows its
    own items; an organization's edit knows the organization's active rows."""

    entity_types: Set[str]
    watchers: Set[str]
    relationship_types: Mapping[str, tuple[str | None, bool]]
    # The templates a document requires, whose items it may reference as `<template>:<slug>`
    # (checked against their releases when it is published). An organization's item
    # references the organization's rows by slug alone.
    requires: Set[str] = frozenset()
    # Who writes: `document` or `organization` (for the wording of a refused qualifier).
    writer: str = "organization"


def qualifier(ref: str) -> str | None:
    """The template a reference names (`<template>:<slug>`), None for a plain slug."""
    return ref.split(":", 1)[0] if ":" in ref else None


def bare(ref: str) -> str:
    """A reference's slug, without its template."""
    return ref.rsplit(":", 1)[-1]


def _qualified(ref: str, path: str, known: Known, problems: _Problems) -> bool:
    """Whether `ref` names a required template's item (left to publish to resolve); a
    qualifier that is not allowed here is reported."""
    template = qualifier(ref)
    if template is None:
        return False
    if known.writer == "organization":
        problems.add(
            path,
            f"{ref!r}: an organization's item references the organization's own rows by slug "
            f"(write {bare(ref)!r})",
        )
    elif template not in known.requires:
        problems.add(
            path,
            f"{ref!r} references template {template!r}, which is not in requires",
        )
    return True


def _check_references(doc: TemplateDocument, problems: _Problems) -> None:
    entity_slugs = _unique_slugs(doc.entity_types, "entity_types", problems)
    _unique_slugs(doc.relationship_types, "relationship_types", problems)
    _unique_slugs(doc.classifiers, "classifiers", problems)
    watcher_slugs = _unique_slugs(doc.watchers, "watchers", problems)
    known = Known(
        entity_types=entity_slugs,
        watchers=watcher_slugs,
        relationship_types={r.slug: (r.inverse, r.is_symmetric) for r in doc.relationship_types},
        requires={r.template for r in doc.requires},
        writer="document",
    )
    _check_requires(doc, problems)
    for kind in ITEM_KINDS:
        for index, item in enumerate(getattr(doc, kind)):
            check_item(kind, item, f"$.{kind}[{index}]", known, problems)
    for kind, policies in doc.policies.items():
        _check_policy_fields(kind, policies, f"$.policies.{kind}", problems)


def _check_requires(doc: TemplateDocument, problems: _Problems) -> None:
    counts = Counter(r.template for r in doc.requires)
    for index, requirement in enumerate(doc.requires):
        path = f"$.requires[{index}].template"
        if requirement.template == doc.slug:
            problems.add(path, "a template cannot require itself")
        elif counts[requirement.template] > 1:
            problems.add(path, f"{requirement.template!r} is required more than once")


def references(kind: str, item: Any) -> list[tuple[str, str, str]]:
    """(path under the item, kind referenced, reference) of every reference `item` makes."""
    found: list[tuple[str, str, str]] = []
    if kind == "relationship_types":
        for index, rule in enumerate(item.rules):
            found.append((f"rules[{index}].source", "entity_types", rule.source))
            found.append((f"rules[{index}].target", "entity_types", rule.target))
        if item.inverse is not None:
            found.append(("inverse", "relationship_types", item.inverse))
    elif kind == "classifiers":
        if item.entity_type is not None:
            found.append(("entity_type", "entity_types", item.entity_type))
        if item.watcher is not None:
            found.append(("watcher", "watchers", item.watcher))
    return found


def check_item(
    kind: str,
    item: Any,
    path: str,
    known: Known,
    problems: _Problems,
    *,
    pairs_free_inverse: bool = False,
) -> None:
    """Every rule an item of `kind` (already decoded) must follow beyond its Struct's: its
    references resolve in `known`, an inverse points back, rules are not repeated, a
    fallback is one of the values, sizes, policy fields and schedules.

    `pairs_free_inverse`: an inverse whose own inverse is empty is accepted (the writer
    pairs the two), as an organization makes a pair one item at a time."""
    if kind == "relationship_types":
        _check_relationship(item, path, known, problems, pairs_free_inverse=pairs_free_inverse)
    elif kind == "classifiers":
        _check_classifier(item, path, known, problems)
    _check_sizes(item, path, problems)
    _check_policy_fields(kind, item.policies, f"{path}.policies", problems)
    if kind == "watchers":
        bad = item.schedule is not None and schedules.problem(item.schedule)
        if bad:
            problems.add(f"{path}.schedule", bad)


def merge_fields(kind: str) -> tuple[str, ...]:
    """The top-level fields of an item of `kind` that upgrades merge (and policies name)."""
    return tuple(f for f in ITEM_KINDS[kind].__struct_fields__ if f not in ("slug", "policies"))


def _check_policy_fields(
    kind: str, policies: Mapping[str, str], path: str, problems: _Problems
) -> None:
    allowed = merge_fields(kind)
    for field in policies:
        if field not in allowed:
            problems.add(
                f"{path}.{field}",
                f"{kind} have no field {field!r} to set a policy on (fields: {', '.join(allowed)})",
            )


def _unique_slugs(items: list[Any], kind: str, problems: _Problems) -> set[str]:
    counts = Counter(item.slug for item in items)
    for index, item in enumerate(items):
        if counts[item.slug] > 1:
            problems.add(f"$.{kind}[{index}].slug", f"duplicate slug {item.slug!r} in {kind}")
    return set(counts)


def _check_relationship(
    rel: RelationshipTypeDoc,
    path: str,
    known: Known,
    problems: _Problems,
    *,
    pairs_free_inverse: bool,
) -> None:
    seen: set[tuple[str, str]] = set()
    for index, rule in enumerate(rel.rules):
        rule_path = f"{path}.rules[{index}]"
        for end in ("source", "target"):
            slug = getattr(rule, end)
            if _qualified(slug, f"{rule_path}.{end}", known, problems):
                continue
            if slug not in known.entity_types:
                problems.add(f"{rule_path}.{end}", f"unknown entity type {slug!r}")
        if (rule.source, rule.target) in seen:
            problems.add(rule_path, f"duplicate rule {rule.source} -> {rule.target}")
        seen.add((rule.source, rule.target))
    if rel.inverse is None:
        return
    inverse_path = f"{path}.inverse"
    if _qualified(rel.inverse, inverse_path, known, problems):
        if rel.is_symmetric:
            problems.add(inverse_path, "a symmetric relationship type cannot have an inverse")
        return
    partner = known.relationship_types.get(rel.inverse)
    if partner is None:
        problems.add(inverse_path, f"unknown relationship type {rel.inverse!r}")
    elif rel.inverse == rel.slug:
        problems.add(inverse_path, "a type cannot be its own inverse: mark it is_symmetric instead")
    elif rel.is_symmetric:
        problems.add(inverse_path, "a symmetric relationship type cannot have an inverse")
    elif pairs_free_inverse and partner[0] is None and partner[1]:
        problems.add(
            inverse_path,
            f"inverse {rel.inverse!r} is symmetric: a symmetric type cannot have an inverse",
        )
    elif partner[0] != rel.slug and not (pairs_free_inverse and partner[0] is None):
        problems.add(
            inverse_path,
            f"inverse {rel.inverse!r} does not point back: its inverse is "
            f"{partner[0]!r}, expected {rel.slug!r}",
        )


def _check_classifier(
    classifier: ClassifierDoc, path: str, known: Known, problems: _Problems
) -> None:
    entity_type, watcher = classifier.entity_type, classifier.watcher
    if (
        entity_type is not None
        and not _qualified(entity_type, f"{path}.entity_type", known, problems)
        and entity_type not in known.entity_types
    ):
        problems.add(f"{path}.entity_type", f"unknown entity type {entity_type!r}")
    if (
        watcher is not None
        and not _qualified(watcher, f"{path}.watcher", known, problems)
        and watcher not in known.watchers
    ):
        problems.add(f"{path}.watcher", f"unknown watcher {watcher!r}")
    if (
        classifier.fallback_value is not None
        and classifier.attribute_values
        and classifier.fallback_value not in classifier.attribute_values
    ):
        problems.add(
            f"{path}.fallback_value",
            f"{classifier.fallback_value!r} is not one of attribute_values "
            f"({', '.join(sorted(classifier.attribute_values))})",
        )


def _check_sizes(item: EntityTypeDoc | Any, path: str, problems: _Problems) -> None:
    for field in (
        "metadata_schema",
        "extraction_schema",
        "sources_schema",
        "extraction_config",
        "attribute_values",
    ):
        value = getattr(item, field, None)
        if value is not None and len(msgspec.json.encode(value)) > MAX_JSON_OBJECT_BYTES:
            problems.add(f"{path}.{field}", f"larger than {MAX_JSON_OBJECT_BYTES // 1024} KiB")


def snapshot(doc: TemplateDocument) -> dict[str, Any]:
    """The canonical release snapshot of a document.

    Items are sorted by slug and rules by (source, target), every optional field is explicit, so
    equal content always gives the same snapshot and the same content hash. Policies are
    release metadata, kept apart from the items (`policies` per kind, `item_policies` per
    kind and slug, each only when there are any), so they never enter an item's content.
    """
    data: dict[str, Any] = msgspec.to_builtins(doc)
    item_policies: dict[str, dict[str, Any]] = {}
    for kind in ITEM_KINDS:
        data[kind] = sorted(data[kind], key=lambda item: item["slug"])
        for item in data[kind]:
            if policies := item.pop("policies"):
                item_policies.setdefault(kind, {})[item["slug"]] = policies
    for rel in data["relationship_types"]:
        rel["rules"] = sorted(rel["rules"], key=lambda rule: (rule["source"], rule["target"]))
    data["requires"] = sorted(data["requires"], key=lambda r: r["template"])
    if not data["requires"]:
        del data["requires"]
    if not data["policies"]:
        del data["policies"]
    if item_policies:
        data["item_policies"] = item_policies
    return data
