"""`install-service demo`: sample data made through the service functions, twice without
failing, and what it says it made is what the database holds."""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from sqlalchemy.engine import URL

from install_service import demo
from install_service.cli import main
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.orgs.tokens import actor_for_token


@pytest.fixture
def run_demo(install_service_database_url: URL, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv(
        "INSTALL_SERVICE_DATABASE_URL",
        install_service_database_url.render_as_string(hide_password=False),
    )
    sigterm = signal.getsignal(signal.SIGTERM)

    def invoke() -> Any:
        result = CliRunner().invoke(main, ["demo", "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    yield invoke
    signal.signal(signal.SIGTERM, sigterm)


def query(url: URL, sql: str, **params: Any) -> list[Any]:
    """Rows of one read on the test's database (the CLI runs its own event loop)."""

    async def read() -> list[Any]:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                return list((await conn.execute(text(sql), params)).all())
        finally:
            await engine.dispose()

    return asyncio.run(read())


def owner_of(url: URL, token: str) -> Any:
    async def find() -> Any:
        engine = create_engine(url)
        try:
            async with transaction(engine) as session:
                return await actor_for_token(session, token)
        finally:
            await engine.dispose()

    return asyncio.run(find())


def test_demo_makes_orgs_installs_edits_and_a_new_release(
    install_service_database_url: URL, run_demo: Any
) -> None:
    url = install_service_database_url
    made = run_demo()
    assert made["template"] == demo.TEMPLATE
    assert made["latest_version"] == 2
    assert [o["slug"] for o in made["organizations"]] == [slug for slug, _ in demo.ORGS]
    assert all(o["created"] and o["installed"] for o in made["organizations"])
    installs = query(
        url,
        """SELECT o.slug, r.version FROM agents a
           JOIN organizations o ON o.id = a.organization_id
           JOIN template_releases r ON r.id = a.installed_release_id
           WHERE a.template_agent_id IS NOT NULL ORDER BY o.slug""",
    )
    assert [(i.slug, i.version) for i in installs] == [(slug, 1) for slug, _ in demo.ORGS]
    deals = query(
        url,
        """SELECT o.slug, e.name FROM entity_types e JOIN organizations o
           ON o.id = e.organization_id WHERE e.slug = 'deal' AND o.slug LIKE 'demo-org-%'""",
    )
    renamed = {d.slug for d in deals if d.name == "Pipeline deal"}
    assert renamed == {slug for slug, edit in demo.ORGS if edit == "conflicts"}
    owner = owner_of(url, made["owner_token"])
    assert owner is not None
    owned = query(
        url,
        "SELECT o.slug FROM memberships m JOIN organizations o ON o.id = m.organization_id "
        "WHERE m.user_id = :u AND o.kind = 'team' ORDER BY 1",
        u=owner.user_id,
    )
    assert {o.slug for o in owned} == demo.OWNED


def test_demo_never_reverts_a_newer_release(
    install_service_database_url: URL, run_demo: Any
) -> None:
    url = install_service_database_url
    run_demo()
    newer = demo._v2()
    newer["description"] = "Someone moved on."
    path = Path(tempfile.mkdtemp()) / "template.json"
    path.write_text(json.dumps(newer))
    published = CliRunner().invoke(main, ["templates", "publish", str(path), "--json"])
    assert published.exit_code == 0, published.output
    again = run_demo()
    assert again["latest_version"] == 3
    latest = query(
        url,
        "SELECT r.version, r.snapshot->>'description' AS description FROM template_releases r "
        "JOIN agents a ON a.id = r.template_agent_id JOIN organizations o "
        "ON o.id = a.organization_id WHERE o.slug = :t ORDER BY r.version DESC LIMIT 1",
        t=demo.TEMPLATE,
    )
    assert [(r.version, r.description) for r in latest] == [(3, "Someone moved on.")]


def test_demo_runs_twice_and_keeps_what_exists(
    install_service_database_url: URL, run_demo: Any
) -> None:
    url = install_service_database_url
    run_demo()
    before = query(url, "SELECT count(*) FROM template_releases")
    again = run_demo()
    assert not any(o["created"] or o["installed"] for o in again["organizations"])
    assert again["latest_version"] == 2
    assert query(url, "SELECT count(*) FROM template_releases") == before
    assert query(url, "SELECT count(*) FROM users WHERE email = :e", e=demo.OWNER_EMAIL) == [(1,)]
