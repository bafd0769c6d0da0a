"""Benchmarks: each prints a table and writes its figures to bench/results/<name>.json.

Run them as modules from the project root, e.g. `uv run python -m bench.install`. They are
figures, never tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from install_service.db import embedded, migrate
from install_service.db.engine import async_url, ensure_database, start_embedded

ROOT = Path(__file__).resolve().parents[1]


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
