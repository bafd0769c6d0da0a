"""`install-service schema`: an organization's own items from the command line, over the same
service as the API, with tables for people, --json for scripts and problems for mistakes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

from install_service.db.engine import create_engine
from install_service.testing import add_membership, install_template, make_org, make_user
from install_service.testing import publish_template as publish
from tests.conftest import Cli, small_doc
from tests.test_cli import query

PROMPT = "Find people.\nFind companies.\n"


@pytest.fixture
def acme(url: URL) -> str:
    """`starter` installed in `acme`, owned by owner@example.com; member@example.com reads."""

    async def build() -> None:
        engine = create_engine(url)
        try:
            doc = small_doc()
            doc["watchers"][0]["prompt"] = PROMPT
            await publish(engine, doc)
            owner, _, _ = await make_user(engine, "owner@example.com")
            member, _, _ = await make_user(engine, "member@example.com")
            org = await make_org(engine, owner=owner, slug="acme")
            await add_membership(engine, org, member, "member")
            await install_template(engine, owner, "starter", "acme")
        finally:
            await engine.dispose()

    asyncio.run(build())
    return "acme"


def current_prompt(url: URL) -> Any:
    (row,) = query(
        url,
        """SELECT v.prompt, v.version FROM watchers w
           JOIN organizations o ON o.id = w.organization_id AND o.slug = 'acme'
           JOIN watcher_versions v ON v.id = w.current_version_id""",
    )
    return tuple(row)


class TestSchemaCommands:
    def test_list_show_edit_create_archive(
        self, url: URL, cli: Cli, acme: str, tmp_path: Path
    ) -> None:
        listed = cli("schema", "list", acme, "entity-types")
        assert listed.exit_code == 0, listed.stderr
        assert "managed by" in listed.stdout
        as_json = cli("schema", "list", acme, "entity_types", "--json").json()
        assert [i["slug"] for i in as_json] == ["company", "person"]
        assert as_json[0]["provenance"]["template"] == "starter"

        shown = cli("schema", "show", acme, "watchers", "inbox", "--as", "member@example.com")
        assert shown.exit_code == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0] == "watchers inbox: active, managed by starter, release 1, version 1"
        assert "  Find companies." in lines
        etag = cli("schema", "show", acme, "watchers", "inbox", "--json").json()["etag"]

        prompt = tmp_path / "prompt.txt"
        prompt.write_text(PROMPT + "Skip newsletters.\n")
        edited = cli(
            "schema", "edit", acme, "watchers", "inbox",
            "--set", f"prompt=@{prompt}",
            "--set", "name=Mailbox",
            "--if-match", etag,
            "--as", "owner@example.com",
            "--json",
        )  # fmt: skip
        assert edited.exit_code == 0, edited.stdout + edited.stderr
        assert edited.json()["changed"] is True
        assert edited.json()["item"]["edited"] is True
        assert current_prompt(url) == (PROMPT + "Skip newsletters.\n", 2)
        (event,) = query(url, "SELECT type, data FROM events WHERE type LIKE 'schema.%'")
        assert event.type == "schema.item_updated"
        assert event.data["items"][0]["version"] == 2

        nested = cli(
            "schema", "edit", acme, "entity-types", "person",
            "--set", "metadata_schema/properties/age/description=Years",
            "--set", "event_kinds=[\"met\", \"called\"]",
        )  # fmt: skip
        assert nested.exit_code == 0, nested.stderr
        (person,) = query(
            url,
            """SELECT t.metadata_schema, t.event_kinds FROM entity_types t
               JOIN organizations o ON o.id = t.organization_id AND o.slug = 'acme'
               WHERE t.slug = 'person'""",
        )
        assert person.metadata_schema["properties"]["age"] == {
            "type": "integer",
            "description": "Years",
        }
        assert person.event_kinds == ["met", "called"]

        document = tmp_path / "pet.yaml"
        document.write_text("slug: pet\nname: Pet\nicon: paw\n")
        created = cli("schema", "create", acme, "entity-types", "--file", str(document))
        assert created.exit_code == 0, created.stderr
        assert "entity_types pet: active, own" in created.stdout
        archived = cli("schema", "archive", acme, "entity-types", "pet", "--json")
        assert archived.json()["item"]["status"] == "archived"
        assert [r.type for r in query(url, "SELECT type FROM events ORDER BY seq")][-4:] == [
            "schema.item_updated",
            "schema.item_updated",
            "schema.item_created",
            "schema.item_archived",
        ]

    def test_refusals_are_the_apis_problems_and_write_nothing(
        self, url: URL, cli: Cli, acme: str
    ) -> None:
        before = query(url, "SELECT count(*) FROM audit_log"), current_prompt(url)
        stale = cli(
            "schema", "edit", acme, "watchers", "inbox", "--set", "prompt=x",
            "--if-match", "0" * 64, "--json",
        )  # fmt: skip
        assert (stale.exit_code, stale.json()["code"]) == (1, "etag_mismatch")
        member = cli(
            "schema", "edit", acme, "watchers", "inbox", "--set", "prompt=x",
            "--as", "member@example.com", "--json",
        )  # fmt: skip
        assert member.json()["status"] == 403
        invalid = cli("schema", "edit", acme, "watchers", "inbox", "--set", "schedule=often")
        assert invalid.exit_code == 1
        assert "invalid_schema_item" in invalid.stderr
        assert "path=$.schedule" in invalid.stderr
        taken = cli("schema", "create", acme, "watchers", "--set", "slug=inbox", "--json")
        assert taken.json()["code"] == "item_exists"
        nothing = cli("schema", "edit", acme, "watchers", "inbox", "--json")
        assert nothing.json()["code"] == "invalid_request"
        bad_path = cli("schema", "edit", acme, "watchers", "inbox", "--set", "a//b=1", "--json")
        assert bad_path.json()["code"] == "invalid_request"
        assert cli("schema", "list", acme, "gadgets").exit_code == 2
        assert (query(url, "SELECT count(*) FROM audit_log"), current_prompt(url)) == before
