"""Benchmarks: each prints a table and writes its figures to bench/results/<name>.json.

Run them as modules from the project root, e.g. `uv run python -m bench.install`. They are
figures, never tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import psutil
from sqlalchemy import text
from sqlalchemy.engine import URL

from install_service.db import embedded, migrate
from install_service.db.engine import async_url, asyncpg_dsn, ensure_database, start_embedded
from install_service.templates.documents import bare, load_path, parse
from install_service.templates.schemas import ITEM_KINDS, TemplateDocument

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "install_service" / "templates" / "bundled"


def personal_finance() -> TemplateDocument:
    """The bundled personal-finance as one template of its own: the items of the templates it
    requires (business-core's `company`) inlined, `requires` dropped and the references to
    them plain. The benchmarks install one template into fresh orgs; this keeps the rows they
    write, and so their figures, comparable with the runs made before `company` moved to
    business-core."""
    doc = msgspec.to_builtins(load_path(BUNDLED / "personal-finance"))
    for requirement in doc.pop("requires", []):
        required = msgspec.to_builtins(load_path(BUNDLED / requirement["template"]))
        for kind in ITEM_KINDS:
            doc[kind] = required[kind] + doc[kind]
    for rel in doc["relationship_types"]:
        rel["rules"] = [{end: bare(ref) for end, ref in rule.items()} for rule in rel["rules"]]
        if rel["inverse"] is not None:
            rel["inverse"] = bare(rel["inverse"])
    for classifier in doc["classifiers"]:
        for field in ("entity_type", "watcher"):
            if classifier[field] is not None:
                classifier[field] = bare(classifier[field])
    return parse(doc)


@contextmanager
def bench_database(tmp: Path) -> Iterator[URL]:
    """A fresh, migrated database on INSTALL_SERVICE_DATABASE_URL's server, else on an
    embedded PostgreSQL under `tmp`."""
    configured = os.environ.get("INSTALL_SERVICE_DATABASE_URL")
    server = async_url(configured) if configured else start_embedded(tmp)
    try:
        url = server.set(database=f"bench_{uuid.uuid4().hex[:8]}")
        asyncio.run(ensure_database(server, url.database or ""))
        migrate.upgrade(url)
        yield url
    finally:
        if not configured:
            embedded.release(tmp)  # stop the server before `tmp` is removed


def write_results(name: str, results: list[dict[str, Any]]) -> Path:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def _cpu_seconds(process: psutil.Process, *, children: bool) -> float:
    """User and system CPU of a process (and, with `children`, of its live and reaped
    descendants); 0 once it is gone."""
    try:
        times = process.cpu_times()
        total = times.user + times.system
        if children:
            total += times.children_user + times.children_system
            for child in process.children(recursive=True):
                try:
                    child_times = child.cpu_times()
                    total += child_times.user + child_times.system
                except psutil.NoSuchProcess:
                    pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


async def postmaster(url: URL) -> psutil.Process:
    """The PostgreSQL server process of `url`'s database (it must run on this machine): its
    backends are its children, so their CPU is read from /proc, live and reaped alike."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        data_directory = await conn.fetchval("SHOW data_directory")
    finally:
        await conn.close()
    pid = int((Path(data_directory) / "postmaster.pid").read_text().split()[0])
    return psutil.Process(pid)


async def backend_pid(conn: Any) -> int:
    """The server process serving a connection (asyncpg or SQLAlchemy)."""
    if isinstance(conn, asyncpg.Connection):
        return int(await conn.fetchval("SELECT pg_backend_pid()"))
    return int(await conn.scalar(text("SELECT pg_backend_pid()")))


class CpuMeter:
    """CPU seconds spent by named groups of processes between two readings.

    `groups` maps a name to (process, with its descendants?). `exclude` lists PostgreSQL
    backends (by pid) whose CPU is the measurement's own (a poller), reported apart under
    `<name>_excluded`: PostgreSQL's figure is then the server's CPU minus theirs."""

    def __init__(
        self,
        groups: dict[str, tuple[psutil.Process, bool]],
        *,
        exclude: Iterable[int] = (),
        exclude_from: str = "postgres",
    ) -> None:
        self.groups, self.exclude, self.exclude_from = groups, list(exclude), exclude_from
        self.start = self.read()

    def _excluded(self) -> float:
        total = 0.0
        for pid in self.exclude:
            with suppress(psutil.NoSuchProcess):
                total += _cpu_seconds(psutil.Process(pid), children=False)
        return total

    def read(self) -> dict[str, float]:
        reading = {
            name: _cpu_seconds(process, children=children)
            for name, (process, children) in self.groups.items()
        }
        reading[f"{self.exclude_from}_excluded"] = self._excluded()
        return reading

    def since(self, start: dict[str, float] | None = None) -> dict[str, float]:
        """CPU seconds per group since `start` (default: since the meter was made)."""
        start = start or self.start
        now = self.read()
        spent = {name: now[name] - start[name] for name in now}
        spent[self.exclude_from] -= spent[f"{self.exclude_from}_excluded"]
        return spent


def per_unit_ms(spent: dict[str, float], units: int) -> dict[str, float]:
    """CPU seconds per group as milliseconds per unit (an install, an org)."""
    return {name: round(seconds * 1000 / max(units, 1), 2) for name, seconds in spent.items()}
