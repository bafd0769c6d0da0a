"""How every command prints, so that adding one is a few lines:

    @group.command("list")
    @json_option
    def list_things() -> None:
        emit(run(service.list_things), title="things", columns=["slug", ("latest", latest_of)])

Without `--json` a command prints tables and short notes for people on stdout; with `--json`
it prints exactly one JSON document on stdout: its result, or, when it fails, a problem object
with the same `code` the HTTP API uses (exit status 1; 2 for a usage mistake). Human-readable
errors go to stderr. Nothing printed is ever cut short, and text from the data is never read as
markup.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from install_service.errors import InstallServiceError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table

F = TypeVar("F", bound=Callable[..., Any])
# A table column: an attribute of each row's value, or a header and how to get the cell.
Column = str | tuple[str, Callable[[Any], Any]]

_json = False


# As wide as a line may be when nobody reads it on a terminal.
_UNBOUNDED = 100_000


# The consoles are made when a command first prints (rich is not imported for `--help`).
@functools.cache
def _console(*, stderr: bool) -> Console:
    from rich.console import Console, ConsoleDimensions

    class Output(Console):
        """A console as wide as the terminal it writes to; writing to a pipe or a file (no
        terminal, and no `COLUMNS` saying how wide), as wide as each table's longest row, so
        that ids and timestamps stay on one line for grep, cut and the next program."""

        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            # Rich fixes the width from COLUMNS once, here; read it at each print instead
            # (the size below does), so the process's environment when printing is what
            # counts.
            self._width = None

        @property
        def size(self) -> ConsoleDimensions:
            found = super().size
            if self.is_terminal or os.environ.get("COLUMNS", "").isdigit():
                return found
            return ConsoleDimensions(_UNBOUNDED, found.height)

        @size.setter
        def size(self, new_size: tuple[int, int]) -> None:
            Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    return Output(stderr=stderr, highlight=False, soft_wrap=True)


def stdout() -> Console:
    return _console(stderr=False)


def stderr() -> Console:
    return _console(stderr=True)


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _json
    _json = _json or value


def json_option(command: F) -> F:
    """Give a command `--json`. The command does not take it as a parameter: `emit`, `note`
    and the error handler ask `wants_json()`."""
    option = click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_json,
        help="Print one JSON document (the result, or the error) instead of tables.",
    )
    return option(command)


def wants_json() -> bool:
    return _json


def reset() -> None:
    global _json
    _json = False


def emit(
    value: Any,
    *,
    title: str = "",
    columns: Sequence[Column] = (),
    view: Callable[[Any], RenderableType] | None = None,
) -> None:
    """Print a command's result: with `--json`, the value as JSON; otherwise `view(value)`,
    or a table of `columns` with one row per item (a list) or a single row."""
    if wants_json():
        click.echo(to_json(value))
        return
    if view is not None:
        stdout().print(view(value))
        return
    items = value if isinstance(value, list) else [value]
    stdout().print(table(title, columns, items))


def to_json(value: Any) -> str:
    import msgspec

    return msgspec.json.encode(value).decode()


def table(title: str, columns: Sequence[Column], items: Sequence[Any]) -> Table:
    """A table that wraps long cells instead of cutting them, and shows text as it is."""
    from rich.table import Table
    from rich.text import Text

    result = Table(title=Text(title) if title else None, title_justify="left")
    getters: list[Callable[[Any], Any]] = []
    for column in columns:
        header, getter = (column, _attribute(column)) if isinstance(column, str) else column
        result.add_column(Text(header), overflow="fold")
        getters.append(getter)
    for item in items:
        result.add_row(*(_cell(get(item)) for get in getters))
    return result


def _attribute(name: str) -> Callable[[Any], Any]:
    return lambda item: item[name] if isinstance(item, dict) else getattr(item, name)


def _cell(value: Any) -> Any:
    import msgspec
    from rich.text import Text

    if value is None:
        return Text("")
    if isinstance(value, msgspec.Struct | list | dict):
        return Text(to_json(value))
    return Text(str(value))


def line_diff(heading: str, diff: str) -> RenderableType:
    """A unified line diff as people read it: its heading, then every line as it is,
    removed lines in red and added ones in green (text from the data is never markup)."""
    from rich.console import Group
    from rich.text import Text

    from install_service.textdiff import line_kind

    styles = {"added": "green", "removed": "red", "hunk": "cyan", "header": "bold"}
    return Group(
        Text(heading, style="bold"),
        *(Text(line, style=styles.get(line_kind(line), "")) for line in diff.split("\n")),
        Text(""),
    )


def with_diffs(head: RenderableType, diffs: Sequence[tuple[str, str]]) -> RenderableType:
    """`head` (a table, say), then each `(heading, diff)` in full below it."""
    if not diffs:
        return head
    from rich.console import Group

    return Group(head, *(line_diff(heading, diff) for heading, diff in diffs))


def note(message: str) -> None:
    """A line for people (not printed with `--json`)."""
    if not wants_json():
        from rich.text import Text

        stdout().print(Text(message))


def secret(label: str, value: str) -> None:
    """A value shown once (a token): printed whole on its own line, never wrapped or cut."""
    if not wants_json():
        click.echo(f"{label}: {value}")


def problem(exc: InstallServiceError) -> dict[str, Any]:
    """The RFC 9457 problem object the API would answer with."""
    return {
        "type": f"urn:install-service:problem:{exc.code}",
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
        "code": exc.code,
        **exc.extra,
    }


def fail(exc: InstallServiceError, *, exit_code: int = 1) -> NoReturn:
    """Report an error the way the API does and exit: a problem object on stdout with
    `--json`, else a sentence and every listed problem or conflict on stderr."""
    if wants_json():
        click.echo(to_json(problem(exc)))
    else:
        from rich.text import Text

        stderr().print(Text.assemble(("error", "red"), f" {exc.code}: {exc.detail}"))
        for item in [*exc.extra.get("conflicts", []), *exc.extra.get("problems", [])]:
            shown = ", ".join(f"{k}={v}" for k, v in item.items() if k != "diffs")
            stderr().print(Text("  " + shown))
            for found in item.get("diffs", []):
                heading = f"  {item.get('kind')} {item.get('slug')} {found['path']}"
                stderr().print(line_diff(heading, found["diff"]))
    raise SystemExit(exit_code)
