"""`templates`: publish documents, see what publishing would change, read templates and
releases."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from install_service.actor import Actor
from install_service.cli.base import main, run
from install_service.cli.output import emit, json_option, table, with_diffs

if TYPE_CHECKING:
    from rich.console import RenderableType

_KINDS = ("entity_types", "relationship_types", "classifiers", "watchers")


def changes_table(title: str, changes: dict[str, Any]) -> RenderableType:
    """Created / updated / unchanged / archived (/ adopted / detached) counts per kind."""
    import msgspec

    counts = [{"kind": kind, **msgspec.to_builtins(c)} for kind, c in changes.items()]
    extra = [c for c in ("adopted", "detached") if any(row.get(c) for row in counts)]
    return table(title, ["kind", "created", "updated", "unchanged", "archived", *extra], counts)


def diff_table(title: str, diff: Any) -> RenderableType:
    """The template's own changed fields, then changed items, path by path, with the old and
    new values; long text as a line diff below the table."""
    changed = [("template", diff.template, "changed", diff.template_paths)] + [
        (i.kind, i.slug, i.change, i.paths) for i in diff.items
    ]
    rows = [
        {
            "kind": kind,
            "slug": slug,
            "change": change,
            "path": p.path,
            "old": BELOW if p.diff else p.old,
            "new": BELOW if p.diff else p.new,
        }
        for kind, slug, change, paths in changed
        for p in paths
    ]
    diffs = [
        (f"{kind} {slug} {p.path}", p.diff)
        for kind, slug, _, paths in changed
        for p in paths
        if p.diff
    ]
    return with_diffs(table(title, ["kind", "slug", "change", "path", "old", "new"], rows), diffs)


# A value shown as a line diff under the table rather than in its cell.
BELOW = "(line diff below)"


@main.group("templates")
def templates_group() -> None:
    """Publish and inspect templates."""


@templates_group.command("publish")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--notes", default="", help="Release notes.")
@json_option
def templates_publish(paths: tuple[Path, ...], notes: str) -> None:
    """Publish template documents (files, or directories holding template.yaml), each as
    its next release when its content changed; a template after those it requires."""
    from functools import partial

    from rich.console import Group

    from install_service.templates import documents
    from install_service.templates import service as templates

    published = []
    ordered = documents.requirement_order((p, documents.load_path(p)) for p in paths)
    for _, document in ordered:
        publish = partial(
            templates.publish, document=document, actor=Actor.system(), source="cli", notes=notes
        )
        published.append(run(publish))
    emit(
        published,
        view=lambda results: Group(
            *(
                changes_table(
                    f"{r.template} release {r.version}"
                    + (" (new)" if r.created else " (unchanged)"),
                    r.changes,
                )
                for r in results
            )
        ),
    )


@templates_group.command("diff")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@json_option
def templates_diff(path: Path) -> None:
    """What publishing PATH would change; writes nothing."""
    from rich.console import Group

    from install_service.templates import documents
    from install_service.templates import service as templates

    document = documents.load_path(path)
    result = run(lambda s: templates.diff(s, document, actor=Actor.system()))

    def view(d: Any) -> RenderableType:
        if d.next_version is None:
            return changes_table(f"{d.template}: unchanged (release {d.latest_version})", d.changes)
        return Group(
            changes_table(f"{d.template}: would cut release {d.next_version}", d.changes),
            diff_table(f"changes from release {d.latest_version}", d),
        )

    emit(result, view=view)


@templates_group.command("compare")
@click.argument("slug")
@click.argument("from_version", type=click.IntRange(min=1))
@click.argument("to_version", type=click.IntRange(min=1))
@json_option
def templates_compare(slug: str, from_version: int, to_version: int) -> None:
    """What changed between two releases of SLUG, item by item and path by path."""
    from install_service.templates import service as templates

    found = run(lambda s: templates.release_diff(s, Actor.system(), slug, from_version, to_version))
    emit(
        found,
        view=lambda d: diff_table(f"{d.template}: release {d.from_version} -> {d.to_version}", d),
    )


@templates_group.command("list")
@json_option
def templates_list() -> None:
    """Every template and its latest release."""
    from install_service.pagination import walk
    from install_service.templates import service as templates

    found = run(lambda s: walk(lambda page: templates.list_templates(s, Actor.system(), page)))
    emit(
        found,
        title="templates",
        columns=["slug", "name", "visibility", ("latest", lambda t: t.latest_version)],
    )


@templates_group.command("show")
@click.argument("slug")
@json_option
def templates_show(slug: str) -> None:
    """A template's manifest: latest release and item slugs by kind."""
    from rich.console import Group
    from rich.text import Text

    from install_service.templates import service as templates

    found = run(lambda s: templates.manifest(s, Actor.system(), slug))

    def view(m: Any) -> RenderableType:
        head = Text(f"{m.slug}: {m.name} (latest release {m.latest_version}, {m.visibility})")
        rows = [{"kind": kind, "slugs": ", ".join(m.items.get(kind, []))} for kind in _KINDS]
        requires = ", ".join(
            f"{r.template}{f' >= {r.version}' if r.version else ''} (checked {r.checked_version})"
            for r in m.requires
        )
        links = Text(
            f"requires: {requires or 'nothing'}\n"
            f"required by: {', '.join(m.required_by) or 'nothing'}"
        )
        return Group(head, links, table("", ["kind", "slugs"], rows))

    emit(found, view=view)


@templates_group.command("releases")
@click.argument("slug")
@click.argument("version", type=click.IntRange(min=1), required=False)
@json_option
def templates_releases(slug: str, version: int | None) -> None:
    """A template's releases, or one release with its snapshot (VERSION)."""
    from rich.console import Group
    from rich.json import JSON
    from rich.text import Text

    from install_service.pagination import walk
    from install_service.templates import service as templates

    if version is not None:
        release = run(lambda s: templates.release(s, Actor.system(), slug, version))
        emit(
            release,
            view=lambda r: Group(
                Text(f"{r.template} release {r.version} ({r.source}): {r.notes}"),
                JSON.from_data(r.snapshot),
            ),
        )
        return
    found = run(lambda s: walk(lambda page: templates.list_releases(s, Actor.system(), slug, page)))
    emit(
        found,
        title=f"{slug} releases",
        columns=["version", "source", "notes", "content_hash", "created_at"],
    )
