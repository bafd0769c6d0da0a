"""The package's imports form a ladder: a module imports from its own rung and the rungs below
it, never from a rung above, and never from a sibling beside it on its rung.

`LAYERS` names the rungs from the top down. A rung is a tuple of sibling groups that must not
import each other (two domains that need each other share a lower module instead); a group is
a tuple of module names relative to the package, each naming that module and everything under
it, or a glob (`*.api`). A module belongs to the highest rung that names it, so the HTTP
handlers (`orgs.api`) stand with the other edges above their domain (`orgs`). Every import
counts: at module level, inside a function, under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

import install_service

PACKAGE = install_service.__name__
ROOT = Path(install_service.__file__).parent

LAYERS: tuple[tuple[tuple[str, ...], ...], ...] = (
    # Entry points: the command line, the pytest plugin, the migrations.
    (("__main__", "cli"), ("testing",), ("migrations",)),
    # The HTTP application: the API's routes and the console, wired together.
    (("app",),),
    # The HTTP edges: each domain's handlers, the console's pages.
    (("*.api",), ("console",)),
    # What every handler shares: the caller and its unit of work, problem documents.
    (("deps", "problems"),),
    # Domains that drive the ones below: an org's own schema, resyncs, the demo's sample data.
    (("schema",), ("resync",), ("demo",)),
    # Publishing templates; installing them into an org.
    (("templates",), ("installs",)),
    # What publishing and installing share: the engine both run, the releases both read.
    (("engine",), ("releases",)),
    # The change feed and webhooks; watchers' schedules.
    (("events",), ("watchers",)),
    # Organizations, users, memberships, tokens, sessions.
    (("orgs",),),
    (("audit",),),
    # The database, and the service's own metrics.
    (("db",), ("metrics",)),
    # The ground floor: names every layer shares, and plumbing that knows no domain.
    (
        (
            "",
            "vocabulary",
            "actor",
            "states",
            "schemas",
            "errors",
            "pagination",
            "context",
            "config",
            "logs",
            "textdiff",
        ),
    ),
)


@dataclass(frozen=True)
class Place:
    rung: int  # 0 is the ground floor
    group: int
    pattern: str


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, relative to the package
    path: str
    line: int
    target: str  # the imported module, relative to the package


def relative(dotted: str) -> str:
    return "" if dotted == PACKAGE else dotted.removeprefix(PACKAGE + ".")


def names(pattern: str, module: str) -> bool:
    if "*" in pattern:
        return fnmatchcase(module, pattern)
    if not pattern:
        return module == ""  # the package itself
    return module == pattern or module.startswith(pattern + ".")


def place(module: str, layers: tuple[tuple[tuple[str, ...], ...], ...] = LAYERS) -> Place | None:
    """The highest rung naming `module`, and its group there."""
    for index, rung in enumerate(layers):
        for group, patterns in enumerate(rung):
            for pattern in patterns:
                if names(pattern, module):
                    return Place(len(layers) - 1 - index, group, pattern or PACKAGE)
    return None


def modules(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """Every module of the package: its name relative to the package -> (path, source)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = (str(path.relative_to(root.parent)), path.read_text())
    return found


def imports(found: dict[str, tuple[str, str]]) -> list[Import]:
    """Every import of a module of the package by another, wherever it is written."""
    result = []
    for module, (path, source) in found.items():
        is_package = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(source, path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = f"{PACKAGE}.{module}" if module else PACKAGE
                    parts = anchor.split(".")
                    parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
                    base = ".".join([*parts, base] if base else parts)
                for alias in node.names:
                    # `from pkg import module` imports the module; `from module import name`
                    # the module that holds the name.
                    candidate = relative(f"{base}.{alias.name}")
                    targets.append(f"{base}.{alias.name}" if candidate in found else base)
            for target in targets:
                if target != PACKAGE and not target.startswith(PACKAGE + "."):
                    continue
                name = relative(target)
                while name and name not in found:
                    name = name.rpartition(".")[0]
                each = Import(module, path, node.lineno, name)
                if name != module and each not in result:
                    result.append(each)
    return result


def up_imports(
    found: dict[str, tuple[str, str]],
    layers: tuple[tuple[tuple[str, ...], ...], ...] = LAYERS,
) -> list[str]:
    """Each import that points up the ladder, or sideways to a sibling group, in words."""
    wrong = []
    for each in imports(found):
        here, there = place(each.module, layers), place(each.target, layers)
        if here is None or there is None:
            continue  # `test_every_module_is_on_a_rung` names them
        if there.rung > here.rung:
            why = f"`{there.pattern}` is above `{here.pattern}`"
        elif there.rung == here.rung and there.group != here.group:
            why = f"`{there.pattern}` is a sibling of `{here.pattern}`"
        else:
            continue
        wrong.append(f"{each.path}:{each.line} imports {PACKAGE}.{each.target}: {why}")
    return wrong


class TestTheLadder:
    def test_no_import_points_up_or_sideways(self) -> None:
        wrong = up_imports(modules())
        assert not wrong, "Imports that point up the ladder or sideways:\n" + "\n".join(wrong)

    def test_every_module_is_on_a_rung(self) -> None:
        assert [module for module in modules() if place(module) is None] == []

    def test_every_name_on_the_ladder_is_a_module(self) -> None:
        found = modules()
        stale = [
            pattern
            for rung in LAYERS
            for group in rung
            for pattern in group
            if not any(names(pattern, module) for module in found)
        ]
        assert stale == []


# A package of a few modules, to show the check names what it should.
SMALL: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("*.api",),),
    (("installs",), ("templates",)),
    (("orgs",),),
    (("", "vocabulary"),),
)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    root = tmp_path / PACKAGE
    for name in ("", "orgs/", "installs/", "templates/"):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "__init__.py").write_text("")
    (root / "vocabulary.py").write_text("")
    (root / "orgs/api.py").write_text(f"from {PACKAGE}.orgs import service\n")
    (root / "orgs/service.py").write_text(f"from {PACKAGE}.vocabulary import X\n")
    (root / "installs/service.py").write_text(f"from {PACKAGE}.orgs.service import Y\n")
    (root / "templates/service.py").write_text("from ..orgs import service\n")
    return root


class TestTheCheck:
    def test_imports_down_the_ladder_pass(self, small: Path) -> None:
        assert up_imports(modules(small), SMALL) == []

    def test_an_import_up_is_named_with_its_line(self, small: Path) -> None:
        (small / "orgs/service.py").write_text(
            f"from {PACKAGE}.vocabulary import X\nfrom {PACKAGE}.installs.service import Z\n"
        )
        assert up_imports(modules(small), SMALL) == [
            f"{PACKAGE}/orgs/service.py:2 imports {PACKAGE}.installs.service: "
            "`installs` is above `orgs`"
        ]

    def test_an_import_inside_a_function_counts(self, small: Path) -> None:
        (small / "vocabulary.py").write_text(f"def f():\n    import {PACKAGE}.orgs.service\n")
        assert up_imports(modules(small), SMALL) == [
            f"{PACKAGE}/vocabulary.py:2 imports {PACKAGE}.orgs.service: `orgs` is above `vocabulary`"
        ]

    def test_a_relative_import_of_a_sibling_is_named(self, small: Path) -> None:
        (small / "templates/service.py").write_text("from ..installs import service\n")
        assert up_imports(modules(small), SMALL) == [
            f"{PACKAGE}/templates/service.py:1 imports {PACKAGE}.installs.service: "
            "`installs` is a sibling of `templates`"
        ]

    def test_an_edge_above_its_own_domain(self) -> None:
        assert place("orgs.api", SMALL) == Place(3, 0, "*.api")
        assert place("orgs.service", SMALL) == Place(1, 0, "orgs")
        assert place("", SMALL) == Place(0, 0, PACKAGE)
