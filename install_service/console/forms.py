"""The console's forms that build the API's request bodies: what a person typed, kept as typed
(so a refused form comes back with its values), and turned into the same msgspec Structs the
API decodes, with the same validation. No rule of their own lives here: a wave, a rate, a pin
is whatever `ResyncRequest` and `PinRequest` say it is."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, cast

import msgspec

from install_service.errors import BadRequest, in_words
from install_service.installs.schemas import PinRequest, UpgradeRequest
from install_service.resync.schemas import ResyncRequest

# How many wave rows the form offers (the API and the CLI take up to 100 waves).
WAVE_ROWS = 5
WaveKind = Literal["count", "percent", "orgs"]
WAVE_KINDS: tuple[WaveKind, ...] = ("count", "percent", "orgs")


# A query string's or a posted form's fields (Litestar's multi-dicts).
FormData = Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class WaveRow:
    kind: WaveKind = "count"
    # A number of installs, a percentage, or organization slugs; empty: no wave.
    size: str = ""


@dataclass(frozen=True, kw_only=True)
class ResyncForm:
    """The staged-resync form as typed. Empty fields mean what the API's omitted ones do."""

    version: str = ""
    waves: tuple[WaveRow, ...] = ()
    max_conflict_rate: str = ""
    max_failure_rate: str = ""
    bake_seconds: str = ""
    orgs: str = ""
    exclude: str = ""
    include_pinned: bool = False
    force: bool = False
    with_requirements: bool = False
    rows: tuple[WaveRow, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        padded = (*self.waves, *(WaveRow() for _ in range(WAVE_ROWS - len(self.waves))))
        object.__setattr__(self, "rows", padded)

    @classmethod
    def default(cls) -> ResyncForm:
        """A canary of ten installs, then half of them, then the rest; halt after a wave
        where more than one in ten conflicts or fails."""
        return cls(
            waves=(
                WaveRow(kind="count", size="10"),
                WaveRow(kind="percent", size="50"),
                WaveRow(kind="percent", size="100"),
            ),
            max_conflict_rate="0.1",
            max_failure_rate="0.1",
        )

    @classmethod
    def read(cls, data: FormData) -> ResyncForm:
        def text(name: str) -> str:
            value = data.get(name)
            return value.strip() if isinstance(value, str) else ""

        waves = []
        for n in range(1, WAVE_ROWS + 1):
            kind = text(f"wave-{n}-kind")
            if kind not in WAVE_KINDS:
                kind = "count"
            waves.append(WaveRow(kind=kind, size=text(f"wave-{n}-size")))  # type: ignore[arg-type]
        while waves and not waves[-1].size:
            waves.pop()
        return cls(
            version=text("version"),
            waves=tuple(waves),
            max_conflict_rate=text("max_conflict_rate"),
            max_failure_rate=text("max_failure_rate"),
            bake_seconds=text("bake_seconds"),
            orgs=text("orgs"),
            exclude=text("exclude"),
            include_pinned=text("include_pinned") == "on",
            force=text("force") == "on",
            with_requirements=text("with_requirements") == "on",
        )

    def fields(self) -> list[tuple[str, str]]:
        """Every field as the form posts it: what the confirm form carries through."""
        out = [
            ("version", self.version),
            ("max_conflict_rate", self.max_conflict_rate),
            ("max_failure_rate", self.max_failure_rate),
            ("bake_seconds", self.bake_seconds),
            ("orgs", self.orgs),
            ("exclude", self.exclude),
        ]
        for n, row in enumerate(self.waves, start=1):
            out += [(f"wave-{n}-kind", row.kind), (f"wave-{n}-size", row.size)]
        out += [
            (name, "on")
            for name in ("include_pinned", "force", "with_requirements")
            if getattr(self, name)
        ]
        return out

    def request(self, *, dry_run: bool = False) -> ResyncRequest:
        """The API's request body for this form, validated as the API validates it; a
        refusal is a 400 that names the form's field."""
        filled = [(n, row) for n, row in enumerate(self.waves, start=1) if row.size]
        body: dict[str, Any] = {
            "force": self.force,
            "include_pinned": self.include_pinned,
            "with_requirements": self.with_requirements,
            "dry_run": dry_run,
            "waves": [
                {row.kind: _names(row.size) if row.kind == "orgs" else row.size}
                for _, row in filled
            ],
            "exclude": _names(self.exclude),
        }
        for name in ("version", "max_conflict_rate", "max_failure_rate", "bake_seconds"):
            if getattr(self, name):
                body[name] = getattr(self, name)
        if self.orgs:
            body["orgs"] = _names(self.orgs)
        labels = _RESYNC_LABELS | {f"waves[{i}]": f"Wave {n}" for i, (n, _) in enumerate(filled)}
        return _convert(body, ResyncRequest, labels)


@dataclass(frozen=True, kw_only=True)
class PinForm:
    """The pin form as typed: a reason and an optional end (UTC, as a browser's
    `datetime-local` field sends it, or any ISO 8601 time)."""

    reason: str = ""
    until: str = ""

    @classmethod
    def read(cls, data: FormData) -> PinForm:
        reason, until = data.get("reason"), data.get("until")
        return cls(
            reason=reason.strip() if isinstance(reason, str) else "",
            until=until.strip() if isinstance(until, str) else "",
        )

    def request(self) -> PinRequest:
        body: dict[str, Any] = {"reason": self.reason or None}
        if self.until:
            try:
                until = datetime.fromisoformat(self.until)
            except ValueError:
                raise BadRequest(
                    f"Pinned until: {self.until!r} is not a date and time", code="invalid_request"
                ) from None
            body["until"] = until if until.tzinfo else until.replace(tzinfo=UTC)
        return _convert(body, PinRequest, {"reason": "Reason", "until": "Pinned until"})


_RESYNC_LABELS = {
    "version": "Release",
    "max_conflict_rate": "Halt above this conflict rate",
    "max_failure_rate": "Halt above this failure rate",
    "bake_seconds": "Bake",
    "orgs": "Only these organizations",
    "exclude": "Never these organizations",
    "waves": "Waves",
}
_AT = re.compile(r" - at `\$\.?(?P<field>[a-z_]*(?:\[\d+\])?)[^`]*`$")
T = TypeVar("T")
# msgspec's messages in words a form's user reads.
_PLAIN = [
    (re.compile(r"^Expected `int(?: \| null)?`, got `str`$"), "expected a whole number"),
    (re.compile(r"^Expected `float(?: \| null)?`, got `str`$"), "expected a number"),
    (re.compile(r"^Expected `\w+` <= "), "must be at most "),
    (re.compile(r"^Expected `\w+` >= "), "must be at least "),
    (re.compile(r"^Expected `\w+` < "), "must be below "),
    (re.compile(r"^Expected `\w+` > "), "must be above "),
]


def _names(text: str) -> list[str]:
    """Organization slugs or ids separated by commas or spaces."""
    return [name for name in re.split(r"[\s,]+", text) if name]


def _convert(body: dict[str, Any], into: type[T], labels: dict[str, str]) -> T:
    """`body` as the API's Struct (numbers may come as text); a refusal names the field as
    the form labels it."""
    try:
        return msgspec.convert(body, into, strict=False)
    except msgspec.ValidationError as exc:
        message = in_words(str(exc))
        found = _AT.search(message)
        if found is None:
            raise BadRequest(message, code="invalid_request") from None
        label = labels.get(found["field"]) or labels.get(found["field"].split("[")[0], "Form")
        detail = message[: found.start()]
        for pattern, plain in _PLAIN:
            detail = pattern.sub(plain, detail)
        raise BadRequest(f"{label}: {detail}", code="invalid_request") from None


# How a field of an item is typed in: one line, text spanning lines, JSON, or a checkbox;
# decided by the template document's own Struct (long text is a `Text` or `LongText`).
Widget = Literal["line", "text", "json", "check"]
_LONG_TEXT = 2_000


def _widget(type_info: Any) -> tuple[Widget, bool]:
    """The widget for a field of this msgspec type, and whether it may be empty (null)."""
    import msgspec.inspect as mi

    optional = False
    while True:
        if isinstance(type_info, mi.Metadata):
            type_info = type_info.type
        elif isinstance(type_info, mi.UnionType):
            kept = [t for t in type_info.types if not isinstance(t, mi.NoneType)]
            optional = len(kept) < len(type_info.types)
            type_info = kept[0]
        else:
            break
    if isinstance(type_info, mi.BoolType):
        return "check", optional
    if isinstance(type_info, mi.StrType):
        long = (type_info.max_length or 0) >= _LONG_TEXT
        return ("text" if long else "line"), optional
    return "json", optional


@functools.cache
def item_fields(kind: str) -> list[tuple[str, Widget, bool]]:
    """Every editable field of an item of `kind` (not its slug, nor policies: release
    metadata), its widget and whether it may be empty."""
    import msgspec.inspect as mi

    from install_service.templates.schemas import ITEM_KINDS

    info = cast(mi.StructType, mi.type_info(ITEM_KINDS[kind]))
    return [(f.name, *_widget(f.type)) for f in info.fields if f.name not in ("slug", "policies")]


@dataclass(frozen=True, kw_only=True)
class ItemField:
    name: str
    widget: Widget
    optional: bool
    # What the field shows (or what was typed): text, JSON text, or "on" for a checkbox.
    value: str


@dataclass(frozen=True, kw_only=True)
class SchemaItemForm:
    """An item's fields as the edit form shows them, or as they were typed, and the ETag of
    the item the form was opened on (the edit is refused if the item changed since)."""

    kind: str
    etag: str
    fields: tuple[ItemField, ...]

    @classmethod
    def of(cls, kind: str, document: dict[str, Any], etag: str) -> SchemaItemForm:
        import json

        def shown(name: str, widget: Widget) -> str:
            value = document.get(name)
            if widget == "check":
                return "on" if value else ""
            if widget == "json":
                return json.dumps(value, indent=2, ensure_ascii=False)
            return "" if value is None else str(value)

        return cls(
            kind=kind,
            etag=etag,
            fields=tuple(
                ItemField(name=name, widget=widget, optional=optional, value=shown(name, widget))
                for name, widget, optional in item_fields(kind)
            ),
        )

    @classmethod
    def read(cls, kind: str, data: FormData) -> SchemaItemForm:
        def typed(name: str) -> str:
            value = data.get(name)
            # Browsers send a text area's lines ended with CR LF.
            return value.replace("\r\n", "\n") if isinstance(value, str) else ""

        return cls(
            kind=kind,
            etag=typed("etag"),
            fields=tuple(
                ItemField(name=name, widget=widget, optional=optional, value=typed(name))
                for name, widget, optional in item_fields(kind)
            ),
        )

    def patch(self, current: dict[str, Any]) -> dict[str, Any]:
        """The merge patch the form asks for: every field as typed. An empty optional field
        is null, unless the item holds an empty text there already; JSON that does not parse
        is refused with every such field named."""
        import json

        from install_service.errors import SchemaItemInvalid

        patch: dict[str, Any] = {}
        problems: list[dict[str, str]] = []
        for f in self.fields:
            if f.widget == "check":
                patch[f.name] = f.value == "on"
            elif f.widget == "json":
                try:
                    patch[f.name] = json.loads(f.value) if f.value.strip() else None
                except ValueError as exc:
                    problems.append({"path": f"$.{f.name}", "message": f"not valid JSON: {exc}"})
            elif f.value == "" and f.optional and current.get(f.name) != "":
                patch[f.name] = None
            else:
                patch[f.name] = f.value
        if problems:
            raise SchemaItemInvalid(problems)
        return patch


@dataclass(frozen=True, kw_only=True)
class UpgradeForm:
    """An upgrade confirmed after its dry run: the release it showed, and for each
    conflicting path whether to keep the organization's value or take the release's, the
    organization's own rows to adopt, and whether to install or upgrade the templates the
    release requires first. Fields: `version`, `resolve:KIND:SLUG:PATH` (`local` or
    `template`; PATH empty for the whole item), `adopt:KIND:SLUG`, `with_requirements`."""

    version: str = ""
    choices: tuple[tuple[str, str], ...] = ()
    adopt: tuple[str, ...] = ()
    with_requirements: bool = False

    @classmethod
    def read(cls, data: FormData) -> UpgradeForm:
        keys = list(data.keys()) if hasattr(data, "keys") else []
        version = data.get("version")
        return cls(
            version=version if isinstance(version, str) else "",
            choices=tuple(
                (key.removeprefix("resolve:"), str(data.get(key)))
                for key in keys
                if key.startswith("resolve:")
            ),
            adopt=tuple(key.removeprefix("adopt:") for key in keys if key.startswith("adopt:")),
            with_requirements=data.get("with_requirements") == "on",
        )

    def choice(self, kind: str, slug: str, path: str) -> str:
        """What was chosen for a path (to show the form again as it was), or ""."""
        return dict(self.choices).get(f"{kind}:{slug}:{path}", "")

    def request(self) -> UpgradeRequest:
        resolutions = []
        for key, take in self.choices:
            kind, _, rest = key.partition(":")
            slug, _, path = rest.partition(":")
            resolutions.append({"kind": kind, "slug": slug, "path": path or None, "take": take})
        adopted = [
            dict(zip(("kind", "slug"), key.split(":", 1), strict=False)) for key in self.adopt
        ]
        body: dict[str, Any] = {
            "resolutions": resolutions,
            "adopt": adopted,
            "with_requirements": self.with_requirements,
        }
        if self.version:
            body["version"] = self.version
        return _convert(body, UpgradeRequest, {"version": "Release", "resolutions": "Choices"})
