"""`schema`: an organization's own entity types, relationship types, classifiers and watchers,
read and changed through the same service as `/api/v1/organizations/{org}/schema/...`.
Commands act as the operator (a platform admin) unless `--as EMAIL`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from install_service.cli.base import BadRequest, actor_for, main, run
from install_service.cli.output import emit, json_option

if TYPE_CHECKING:
    from rich.console import RenderableType
    from sqlalchemy.ext.asyncio import AsyncSession

KIND_NAMES = ("entity-types", "relationship-types", "classifiers", "watchers")
as_option = click.option("--as", "as_email", help="Act as this user (default: the operator).")
if_match_option = click.option(
    "--if-match",
    help="Refuse the change unless the item's ETag is still this one (as `show` printed it).",
)


def _kind(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`entity-types` or `entity_types` alike: the kind as the API's path names it."""
    spelled = value.replace("_", "-")
    if spelled not in KIND_NAMES:
        raise click.BadParameter(f"{value!r}: expected one of {', '.join(KIND_NAMES)}")
    return spelled


kind_argument = click.argument("kind", metavar="KIND", callback=_kind)


def _provenance(item: Any) -> str:
    p = item.provenance
    if p.type == "managed":
        return f"managed by {p.template}, release {p.release}"
    if p.type == "detached":
        return f"detached from {p.template}"
    return "own"


def _item_view(item: Any) -> RenderableType:
    """An item's state on one line, then its document field by field, long text whole."""
    import json

    from rich.console import Group
    from rich.text import Text

    state = [item.status, _provenance(item)] + (["edited"] if item.edited else [])
    if item.version is not None:
        state.append(f"version {item.version}")
    lines: list[Any] = [Text(f"{item.kind} {item.slug}: {', '.join(state)}", style="bold")]
    for field, value in item.document.items():
        if field == "slug":
            continue
        if isinstance(value, str) and "\n" in value:
            lines.append(Text(f"{field}:"))
            lines.extend(Text(f"  {line}") for line in value.split("\n"))
        else:
            shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            lines.append(Text(f"{field}: {shown}"))
    lines.append(Text(f"etag: {item.etag}"))
    return Group(*lines)


def _written_view(written: Any) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    said = "changed" if written.changed else "unchanged: nothing was written"
    return Group(Text(said), _item_view(written.item))


def _pointer_tokens(path: str) -> list[str]:
    """`PATH` of `--set`: a JSON Pointer into the item, its leading `/` optional."""
    tokens = path.removeprefix("/").split("/")
    if not path or not all(tokens):
        raise BadRequest(f"--set {path!r}=...: expected a field, or a path such as a/b")
    return [t.replace("~1", "/").replace("~0", "~") for t in tokens]


def _value(raw: str) -> Any:
    """`VALUE` of `--set`: JSON, else the text itself; `@FILE` is that file's text."""
    import json

    if raw.startswith("@"):
        try:
            return Path(raw[1:]).read_text()
        except OSError as exc:
            raise BadRequest(f"--set ...={raw}: cannot read it: {exc.strerror or exc}") from None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def build_patch(assignments: tuple[str, ...], file: Path | None) -> dict[str, Any]:
    """A JSON merge patch from a document file (YAML, TOML or JSON) and `--set PATH=VALUE`
    assignments applied over it in order (`null` removes a field)."""
    patch: dict[str, Any] = {}
    if file is not None:
        from install_service.templates import documents

        suffix = file.suffix.lstrip(".")
        fmt: Any = "yaml" if suffix in ("yaml", "yml") else "toml" if suffix == "toml" else "json"
        try:
            loaded = documents.decode(file.read_bytes(), fmt)
        except OSError as exc:
            raise BadRequest(f"{file}: cannot read it: {exc.strerror or exc}") from None
        if not isinstance(loaded, dict):
            raise BadRequest(f"{file}: expected a mapping of the item's fields")
        patch = loaded
    for assignment in assignments:
        path, equals, raw = assignment.partition("=")
        if not equals:
            raise BadRequest(f"--set {assignment!r}: expected PATH=VALUE")
        *parents, last = _pointer_tokens(path)
        node = patch
        for token in parents:
            child = node.setdefault(token, {})
            if not isinstance(child, dict):
                raise BadRequest(f"--set {assignment!r}: {token!r} is set to a value above")
            node = child
        node[last] = _value(raw)
    return patch


@main.group("schema")
def schema_group() -> None:
    """An organization's own schema: list, show, create, edit and archive its items.

    KIND is entity-types, relationship-types, classifiers or watchers."""


@schema_group.command("list")
@click.argument("org")
@kind_argument
@click.option("--status", type=click.Choice(["active", "archived"]), help="Only these items.")
@click.option("--template", help="Only items managed by or detached from this template.")
@as_option
@json_option
def schema_list(
    org: str, kind: str, status: str | None, template: str | None, as_email: str | None
) -> None:
    """Every item of KIND in ORG (slug or id), with where it comes from."""
    from install_service.pagination import walk
    from install_service.schema import service
    from install_service.schema.schemas import KINDS

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await walk(
            lambda page: service.list_items(
                session, actor, org, KINDS[kind], page, status=status, template=template
            )
        )

    emit(
        run(work),
        title=f"{kind} in {org}",
        columns=[
            "slug",
            ("name", lambda i: i.document.get("name")),
            "status",
            ("provenance", _provenance),
            ("edited", lambda i: "edited" if i.edited else ""),
            "version",
        ],
    )


@schema_group.command("show")
@click.argument("org")
@kind_argument
@click.argument("slug")
@as_option
@json_option
def schema_show(org: str, kind: str, slug: str, as_email: str | None) -> None:
    """One item: its state, its document and its ETag."""
    from install_service.schema import service
    from install_service.schema.schemas import KINDS

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await service.get_item(session, actor, org, KINDS[kind], slug)

    emit(run(work), view=_item_view)


@schema_group.command("edit")
@click.argument("org")
@kind_argument
@click.argument("slug")
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="PATH=VALUE",
    help="Set a field (or a path into one, a/b/c) to a JSON value; text that is not JSON "
    "is taken as it is, @FILE is that file's text, null removes the field. Repeatable.",
)
@click.option(
    "--file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A merge patch (or the whole item) as YAML, TOML or JSON.",
)
@if_match_option
@as_option
@json_option
def schema_edit(
    org: str,
    kind: str,
    slug: str,
    assignments: tuple[str, ...],
    file: Path | None,
    if_match: str | None,
    as_email: str | None,
) -> None:
    """Edit an item: a JSON merge patch from --file and --set. Watchers and classifiers get
    a new version; an edit of a managed item is kept through upgrades (they merge it)."""
    from install_service.schema import service
    from install_service.schema.schemas import KINDS

    if not assignments and file is None:
        raise BadRequest("nothing to change: give --set PATH=VALUE or --file")
    patch = build_patch(assignments, file)

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await service.update_item(
            session, actor, org, KINDS[kind], slug, patch, if_match=if_match
        )

    emit(run(work), view=_written_view)


@schema_group.command("create")
@click.argument("org")
@kind_argument
@click.option("--set", "assignments", multiple=True, metavar="PATH=VALUE", help="As for `edit`.")
@click.option(
    "--file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The item as a template document writes it (YAML, TOML or JSON).",
)
@as_option
@json_option
def schema_create(
    org: str, kind: str, assignments: tuple[str, ...], file: Path | None, as_email: str | None
) -> None:
    """Author a new item in ORG, validated as a template document's item; its references
    must name the organization's active items."""
    from install_service.schema import service
    from install_service.schema.schemas import KINDS

    if not assignments and file is None:
        raise BadRequest("nothing to create: give --file or --set slug=... --set name=...")
    document = build_patch(assignments, file)

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await service.create_item(session, actor, org, KINDS[kind], document)

    emit(run(work), view=_written_view)


@schema_group.command("archive")
@click.argument("org")
@kind_argument
@click.argument("slug")
@if_match_option
@as_option
@json_option
def schema_archive(
    org: str, kind: str, slug: str, if_match: str | None, as_email: str | None
) -> None:
    """Archive an item (it keeps its slug and versions). Refused while other active items
    refer to it."""
    from install_service.schema import service
    from install_service.schema.schemas import KINDS

    async def work(session: AsyncSession) -> Any:
        actor = await actor_for(session, as_email)
        return await service.archive_item(session, actor, org, KINDS[kind], slug, if_match=if_match)

    emit(run(work), view=_written_view)
