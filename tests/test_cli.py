"""The command line: every operation an admin has over HTTP, tables for people, one JSON
document with --json (errors included), and never a traceback for a user's mistake."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.engine import URL

from install_service.cli import main
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.orgs.tokens import actor_for_token
from tests.conftest import Cli, small_doc


def query(url: URL, sql: str, **params: Any) -> list[Any]:
    """Run one statement on the test's database and commit."""

    async def run() -> list[Any]:
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                return list((await conn.execute(text(sql), params)).all())
        finally:
            await engine.dispose()

    return asyncio.run(run())


@pytest.fixture
def starter(tmp_path: Path) -> Path:
    path = tmp_path / "starter" / "template.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(small_doc()))
    return path


def test_every_command_takes_json() -> None:
    # serve and worker run until stopped and say everything as JSON log lines already.
    def commands(group: click.Group, prefix: str) -> Iterator[tuple[str, click.Command]]:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    found = dict(commands(main, ""))
    assert {"install", "installs uninstall", "installs drift", "installs history"} <= set(found)
    assert {"runs show", "runs retry", "members add", "templates releases"} <= set(found)
    without = [
        name
        for name, command in found.items()
        if name not in ("serve", "worker") and not any("--json" in p.opts for p in command.params)
    ]
    assert without == []


class TestLifecycle:
    def test_publish_install_read_upgrade_uninstall(
        self, cli: Cli, starter: Path, install_service_database_url: URL
    ) -> None:
        url = install_service_database_url
        published = cli("templates", "publish", str(starter.parent), "--json")
        assert published.exit_code == 0, published.stderr
        assert [(r["template"], r["version"], r["created"]) for r in published.json()] == [
            ("starter", 1, True)
        ]
        listed = cli("templates", "list", "--json").json()
        assert [(t["slug"], t["latest_version"]) for t in listed] == [("starter", 1)]
        assert cli("templates", "show", "starter", "--json").json()["items"]["watchers"] == [
            "inbox"
        ]
        releases = cli("templates", "releases", "starter", "--json").json()
        assert [(r["version"], r["source"]) for r in releases] == [(1, "cli")]

        user = cli("users", "create", "ada@example.com", "--name", "Ada", "--json").json()
        org = cli("orgs", "create", "ada-team", "--json").json()
        member = cli("members", "add", "ada-team", "ada@example.com", "--role", "owner", "--json")
        assert member.json()["role"] == "owner"

        installed = cli(
            "install", "starter", "--org", "ada-team", "--as", "ada@example.com", "--json"
        ).json()
        assert (installed["created"], installed["action"]) == (True, "install")
        install_id = installed["id"]
        listed_installs = cli("installs", "list", "ada-team", "--as", "ada@example.com", "--json")
        assert [i["id"] for i in listed_installs.json()] == [install_id]
        assert cli("installs", "show", install_id, "--json").json()["status"] == "active"

        query_rows = query(
            url,
            "UPDATE entity_types SET name = 'Mensch' WHERE organization_id = :o "
            "AND slug = 'person' RETURNING id",
            o=org["id"],
        )
        assert len(query_rows) == 1
        drift = cli("installs", "drift", install_id, "--json").json()
        assert [(d["kind"], d["slug"], d["drift"]) for d in drift["drift"]] == [
            ("entity_types", "person", "modified")
        ]

        plan = cli("installs", "upgrade", install_id, "--dry-run", "--json").json()
        assert (plan["dry_run"], plan["action"]) == (True, "none")
        uninstalled = cli("installs", "uninstall", install_id, "--json").json()
        assert (uninstalled["status"], uninstalled["action"]) == ("uninstalled", "uninstall")
        history = cli("installs", "history", install_id, "--json").json()
        assert [e["action"] for e in history] == ["install", "uninstall"]
        assert query(
            url,
            "SELECT DISTINCT status FROM entity_types WHERE organization_id = :o",
            o=org["id"],
        ) == [("archived",)]
        assert user["personal_organization"]["slug"].startswith("user-")

    def test_templates_diff_claims_no_release_it_did_not_cut(
        self, cli: Cli, starter: Path, install_service_database_url: URL
    ) -> None:
        assert cli("templates", "publish", str(starter)).exit_code == 0
        same = cli("templates", "diff", str(starter), "--json").json()
        assert (same["latest_version"], same["next_version"]) == (1, None)

        changed = small_doc()
        changed["entity_types"].append({"slug": "project", "name": "Project"})
        starter.write_text(yaml.safe_dump(changed))
        diff = cli("templates", "diff", str(starter), "--json").json()
        assert "release_id" not in diff
        assert "created" not in diff
        assert (diff["latest_version"], diff["next_version"]) == (1, 2)
        assert diff["changes"]["entity_types"]["created"] == 1
        assert query(install_service_database_url, "SELECT count(*) FROM template_releases") == [
            (1,)
        ]
        human = cli("templates", "diff", str(starter))
        assert "would cut release 2" in human.stdout

    def test_templates_diff_and_compare_list_a_change_of_the_template_itself(
        self, cli: Cli, starter: Path
    ) -> None:
        """A new name changes no item, yet it cuts a release: both say what changed."""
        assert cli("templates", "publish", str(starter)).exit_code == 0
        renamed = small_doc(name="Starter, renamed", visibility="private")
        starter.write_text(yaml.safe_dump(renamed))
        diff = cli("templates", "diff", str(starter), "--json").json()
        assert (diff["next_version"], diff["items"]) == (2, [])
        assert diff["template_paths"] == [
            {"path": "/name", "old": "Starter template", "new": "Starter, renamed"},
            {"path": "/visibility", "old": "public", "new": "private"},
        ]
        human = cli("templates", "diff", str(starter)).stdout
        assert "/name" in human
        assert "Starter, renamed" in human
        assert cli("templates", "publish", str(starter)).exit_code == 0
        compared = cli("templates", "compare", "starter", "1", "2", "--json").json()
        assert (compared["items"], compared["template_paths"]) == ([], diff["template_paths"])

    def test_tables_in_a_pipe_keep_each_row_on_one_line(
        self, cli: Cli, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Not a terminal and no COLUMNS: a row is as long as it needs to be, so an id and a
        timestamp are never broken across lines for the program reading them."""
        monkeypatch.delenv("COLUMNS", raising=False)
        email = "someone-with-a-rather-long-address@example.com"
        created = cli(
            "users", "create", email, "--name", "Someone with a rather long name", "--json"
        )
        user_id = created.json()["id"]
        assert cli("users", "deactivate", email).exit_code == 0
        listed = cli("users", "list").stdout
        [row] = [line for line in listed.splitlines() if user_id in line]
        assert email in row
        assert "Someone with a rather long name" in row
        assert re.search(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d", row), row
        assert len(row) > 80
        monkeypatch.setenv("COLUMNS", "60")  # said how wide: as wide as that
        narrow = cli("users", "list").stdout
        assert max(len(line) for line in narrow.splitlines()) <= 60

    def test_a_new_token_is_shown_whole_however_narrow_the_terminal(
        self, cli: Cli, install_service_database_url: URL, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("COLUMNS", "40")
        created = cli("users", "create", "grace@example.com")
        assert created.exit_code == 0
        token = created.stdout.split("token (shown once): ")[1].strip()

        async def owner() -> Any:
            engine = create_engine(install_service_database_url)
            try:
                async with transaction(engine) as session:
                    return await actor_for_token(session, token)
            finally:
                await engine.dispose()

        assert asyncio.run(owner()) is not None

    def test_resync_waits_for_workers_and_runs_can_be_read_and_retried(
        self, cli: Cli, starter: Path, install_service_database_url: URL, tmp_path: Path
    ) -> None:
        cli("templates", "publish", str(starter))
        cli("users", "create", "ada@example.com")
        assert cli("install", "starter", "--as", "ada@example.com").exit_code == 0
        changed = small_doc()
        changed["watchers"][0]["prompt"] = "Find people, v2."
        starter.write_text(yaml.safe_dump(changed))
        cli("templates", "publish", str(starter))

        env = {
            **os.environ,
            "INSTALL_SERVICE_DATABASE_URL": install_service_database_url.render_as_string(
                hide_password=False
            ),
        }
        with (tmp_path / "worker.log").open("w") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "install_service", "worker"], env=env, stderr=log
            )
        try:
            run = cli("resync", "starter", "--wait", "--json")
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
        assert run.exit_code == 0, run.stderr
        finished = run.json()
        assert (finished["status"], finished["version"]) == ("succeeded", 2)
        assert finished["counts"]["succeeded"] == 1
        shown = cli("runs", "show", finished["id"], "--json").json()
        assert shown["status"] == "succeeded"
        refused = cli("runs", "retry", "00000000-0000-0000-0000-000000000000", "--json")
        assert (refused.exit_code, refused.json()["code"]) == (1, "resync_run_not_found")


class TestCustomizationsAndAccess:
    def test_resolve_drift_reconcile_detach_and_compare(
        self, cli: Cli, starter: Path, install_service_database_url: URL
    ) -> None:
        cli("templates", "publish", str(starter))
        user = cli("users", "create", "ada@example.com", "--json").json()
        install_id = cli("install", "starter", "--as", "ada@example.com", "--json").json()["id"]
        query(
            install_service_database_url,
            "UPDATE entity_types SET name = 'Mine' WHERE organization_id = :o AND slug = 'person' "
            "RETURNING id",
            o=user["personal_organization"]["id"],
        )
        changed = small_doc()
        changed["entity_types"][0]["name"] = "Human"
        starter.write_text(yaml.safe_dump(changed))
        cli("templates", "publish", str(starter))

        refused = cli("installs", "upgrade", install_id, "--json")
        assert refused.exit_code == 1
        assert refused.json()["conflicts"][0]["fields"] == ["/name"]
        bad = cli("installs", "upgrade", install_id, "--resolve", "person=local", "--json")
        assert (bad.exit_code, bad.json()["code"]) == (1, "invalid_request")
        kept = cli(
            "installs",
            "upgrade",
            install_id,
            "--resolve",
            "entity_types:person/name=local",
            "--json",
        )
        assert (kept.exit_code, kept.json()["version"]) == (0, 2), kept.stdout
        drift = cli("installs", "drift", install_id, "--json").json()
        assert drift["drift"][0]["fields"] == [
            {"path": "/name", "mirrored": "Human", "current": "Mine"}
        ]
        assert "/name" in cli("installs", "drift", install_id).stdout
        reconciled = cli("installs", "reconcile", install_id, "--json").json()
        assert reconciled["overwritten"][0]["local"] == "Mine"
        detached = cli("installs", "detach", install_id, "watchers:inbox", "--json").json()
        assert detached["action"] == "detach"
        compared = cli("templates", "compare", "starter", "1", "2", "--json").json()
        assert [(i["slug"], [p["path"] for p in i["paths"]]) for i in compared["items"]] == [
            ("person", ["/name"])
        ]
        assert "/name" in cli("templates", "compare", "starter", "1", "2").stdout

    def test_tokens_people_and_the_audit_log(self, cli: Cli) -> None:
        cli("users", "create", "ada@example.com")
        cli("users", "create", "bob@example.com")
        created = cli("tokens", "create", "ada@example.com", "--name", "ci", "--json").json()
        assert created["token"].startswith("isk_")
        listed = cli("tokens", "list", "ada@example.com", "--json").json()
        assert [t["name"] for t in listed] == ["", "ci"]
        revoked = cli("tokens", "revoke", created["id"], "--json").json()
        assert revoked["revoked_at"] is not None

        cli("orgs", "create", "acme", "--owner", "ada@example.com")
        cli("members", "add", "acme", "bob@example.com")
        changed = cli("members", "role", "acme", "bob@example.com", "owner", "--json").json()
        assert changed["role"] == "owner"
        assert cli("members", "remove", "acme", "ada@example.com", "--json").exit_code == 0
        refused = cli("members", "remove", "acme", "bob@example.com", "--json")
        assert (refused.exit_code, refused.json()["code"]) == (1, "last_owner")
        assert [m["email"] for m in cli("members", "list", "acme", "--json").json()] == [
            "bob@example.com"
        ]
        off = cli("users", "deactivate", "bob@example.com", "--json").json()
        assert off["deactivated_at"] is not None
        assert cli("install", "x", "--as", "bob@example.com", "--json").json()["code"] == (
            "user_deactivated"
        )
        assert (
            cli("users", "reactivate", "bob@example.com", "--json").json()["deactivated_at"] is None
        )
        assert "acme" in [o["slug"] for o in cli("orgs", "list", "--json").json()]
        assert {u["email"] for u in cli("users", "list", "--json").json()} == {
            "ada@example.com",
            "bob@example.com",
        }
        actions = [e["action"] for e in cli("audit", "--json").json()]
        assert {"user.created", "token.revoked", "member.removed", "user.deactivated"} <= set(
            actions
        )


class TestMistakes:
    def test_domain_errors_are_the_api_problem_objects(self, cli: Cli, tmp_path: Path) -> None:
        missing = cli("install", "nope", "--org", "nowhere", "--json")
        assert missing.exit_code == 1
        assert missing.json()["code"] == "org_not_found"
        assert missing.json()["status"] == 404
        unknown = cli("installs", "drift", "00000000-0000-0000-0000-000000000000", "--json")
        assert unknown.json()["code"] == "install_not_found"

        bad = tmp_path / "template.yaml"
        bad.write_text(yaml.safe_dump({"slug": "bad", "name": "Bad", "entity_types": [{}]}))
        refused = cli("templates", "publish", str(bad), "--json")
        assert refused.exit_code == 1
        assert refused.json()["code"] == "invalid_template_document"
        assert refused.json()["problems"]

    def test_a_bad_slug_is_explained_in_words(self, cli: Cli) -> None:
        as_json = cli("orgs", "create", "Not A Slug", "--json")
        assert (as_json.exit_code, as_json.json()["code"]) == (1, "invalid_request")
        assert "a slug (lower-case letters" in as_json.json()["detail"]
        human = cli("orgs", "create", "Not A Slug")
        assert human.exit_code == 1
        expected = (
            "a slug (lower-case letters, digits, '-' and '_', beginning with a letter or a digit)"
        )
        assert expected in human.stderr  # whole: nothing in it read as markup
        assert "regex" not in human.stderr
        assert human.stdout == ""

    def test_usage_mistakes_with_json_are_problem_objects_too(self, cli: Cli) -> None:
        ran = cli("installs", "history", "not-a-uuid", "--json")
        assert ran.exit_code == 2
        assert ran.json()["code"] == "invalid_usage"
        assert "not-a-uuid" in ran.json()["detail"]


class TestDatabaseMistakes:
    @pytest.mark.parametrize(
        ("database_url", "code"),
        [
            ("mysql://root@localhost/app", "invalid_database_url"),
            ("::not a url::", "invalid_database_url"),
            ("postgresql://nobody@127.0.0.1:9/app", "database_unavailable"),
            ("postgresql://nobody@no-such-host.invalid/app", "database_unavailable"),
        ],
    )
    def test_a_bad_or_unreachable_database_is_a_problem_not_a_traceback(
        self, cli: Cli, monkeypatch: pytest.MonkeyPatch, database_url: str, code: str
    ) -> None:
        monkeypatch.setenv("INSTALL_SERVICE_DATABASE_URL", database_url)
        # In-process, an unhandled exception would propagate out of invoke with its traceback.
        human = cli("templates", "list")
        assert (human.exit_code, human.stdout) == (1, "")
        assert human.stderr.startswith(f"error {code}:")
        machine = cli("db", "upgrade", "--json")
        assert machine.exit_code == 1
        assert machine.json()["code"] == code
        if code == "invalid_database_url":  # the URL (a password, maybe) is not repeated
            assert database_url not in machine.stdout + human.stderr

    def test_a_database_that_does_not_exist(
        self, cli: Cli, install_service_server_url: URL, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        url = install_service_server_url.set(database=f"absent_{time.monotonic_ns()}")
        monkeypatch.setenv(
            "INSTALL_SERVICE_DATABASE_URL", url.render_as_string(hide_password=False)
        )
        ran = cli("db", "current", "--json")
        assert (ran.exit_code, ran.json()["code"]) == (1, "database_unavailable")

    def test_the_installed_command_prints_no_traceback(self) -> None:
        ran = subprocess.run(
            [sys.executable, "-m", "install_service", "templates", "list"],
            env={**os.environ, "INSTALL_SERVICE_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/a"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert ran.returncode == 1
        assert "Traceback" not in ran.stderr
        assert ran.stderr.startswith("error database_unavailable: the database is unreachable")


def resync_fleet(cli: Cli, starter: Path, url: URL, people: int = 4) -> list[str]:
    """`people` users with starter installed, the first one's person renamed, v2 published;
    their install ids."""
    cli("templates", "publish", str(starter))
    installs = []
    for n in range(people):
        cli("users", "create", f"p{n}@example.com")
        installs.append(
            cli("install", "starter", "--as", f"p{n}@example.com", "--json").json()["id"]
        )
    query(
        url,
        """UPDATE entity_types SET name = 'Ours' WHERE slug = 'person' AND organization_id =
           (SELECT organization_id FROM agents WHERE id = :i) RETURNING id""",
        i=installs[0],
    )
    changed = small_doc()
    changed["entity_types"][0]["name"] = "Human"
    starter.write_text(yaml.safe_dump(changed))
    cli("templates", "publish", str(starter))
    return installs


class TestStagedResyncCommands:
    def test_dry_run_waves_thresholds_and_control(
        self, cli: Cli, starter: Path, install_service_database_url: URL
    ) -> None:
        installs = resync_fleet(cli, starter, install_service_database_url)
        table = cli("resync", "starter", "--dry-run", "--wave", "1", "--wave", "50%")
        assert table.exit_code == 0, table.stderr
        assert "dry run: starter -> release 2: 3 upgrade, 0 unchanged, 1 conflict" in table.stdout
        assert "entity_types:person locally_modified /name" in table.stdout
        plan = cli("resync", "starter", "--dry-run", "--wave", "1", "--json").json()
        assert (plan["dry_run"], len(plan["items"]), plan["next_cursor"]) == (True, 4, None)

        started = cli(
            "resync",
            "starter",
            "--wave",
            "1",
            "--wave",
            "50%",
            "--max-conflict-rate",
            "0.5",
            "--bake",
            "60",
            "--json",
        ).json()
        assert (started["status"], started["bake_seconds"], len(started["waves"])) == (
            "queued",
            60,
            3,
        )
        same = cli(
            "resync",
            "starter",
            "--wave",
            "1",
            "--wave",
            "50%",
            "--max-conflict-rate",
            "0.5",
            "--bake",
            "60",
            "--json",
        ).json()
        assert (same["id"], same["created"]) == (started["id"], False)
        other = cli("resync", "starter", "--json")
        assert (other.exit_code, other.json()["code"]) == (1, "resync_run_in_progress")
        assert other.json()["run_id"] == started["id"]

        listed = cli("runs", "list", "--template", "starter", "--json").json()
        assert [r["id"] for r in listed] == [started["id"]]
        shown = cli("runs", "list")
        assert (shown.exit_code, started["id"][:6] in shown.stdout) == (0, True)
        first = cli("runs", "items", started["id"], "--wave", "1", "--json").json()
        assert [i["wave"] for i in first] == [1]
        assert cli("runs", "pause", started["id"], "--json").json()["status"] == "paused"
        assert cli("runs", "resume", started["id"], "--json").json()["status"] == "queued"
        assert cli("runs", "cancel", started["id"], "--json").json()["status"] == "cancelled"
        refused = cli("runs", "pause", started["id"], "--json")
        assert (refused.exit_code, refused.json()["code"]) == (1, "resync_run_finished")
        human = cli("runs", "show", started["id"])
        assert "4 cancelled" in human.stdout

        bad = cli("resync", "starter", "--wave", "ten", "--json")
        assert (bad.exit_code, bad.json()["code"]) == (1, "invalid_request")
        bad_org = cli("resync", "starter", "--org", "nobody", "--json")
        assert (bad_org.exit_code, bad_org.json()["code"]) == (1, "unknown_organizations")
        assert installs

    def test_pins_from_the_command_line(
        self, cli: Cli, starter: Path, install_service_database_url: URL
    ) -> None:
        installs = resync_fleet(cli, starter, install_service_database_url, people=1)
        pinned = cli("installs", "pin", installs[0], "--reason", "close", "--json").json()
        assert (pinned["pinned"], pinned["pin_reason"]) == (True, "close")
        assert "close" in cli("installs", "show", installs[0]).stdout
        assert cli("installs", "unpin", installs[0], "--json").json()["pinned"] is False
        past = cli("installs", "pin", installs[0], "--until", "2001-01-01T00:00:00Z", "--json")
        assert (past.exit_code, past.json()["code"]) == (1, "pin_until_in_past")
        upgraded = cli("installs", "upgrade", installs[0], "--force", "--pin", "--json").json()
        assert upgraded["version"] == 2
        assert cli("installs", "show", installs[0], "--json").json()["pinned"] is True

    def test_wait_follows_each_wave_with_a_progress_bar(
        self, cli: Cli, starter: Path, install_service_database_url: URL, tmp_path: Path
    ) -> None:
        resync_fleet(cli, starter, install_service_database_url)
        env = {
            **os.environ,
            "INSTALL_SERVICE_DATABASE_URL": install_service_database_url.render_as_string(
                hide_password=False
            ),
        }
        with (tmp_path / "worker.log").open("w") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "install_service", "worker"], env=env, stderr=log
            )
        try:
            ran = cli("resync", "starter", "--wave", "2", "--wait")
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
        assert ran.exit_code == 0, ran.stderr
        assert "starter v2 wave 1" in ran.stdout
        assert "starter v2 wave 2" in ran.stdout
        assert "partial: 3 succeeded, 1 conflict" in ran.stdout


class TestRequirements:
    def test_publish_in_order_install_with_requirements_uninstall_with_cascade(
        self, cli: Cli, tmp_path: Path
    ) -> None:
        from tests.test_requirements import BUDGET, CORE

        for document in (BUDGET, CORE):
            folder = tmp_path / document["slug"]
            folder.mkdir()
            (folder / "template.json").write_text(json.dumps(document))
        # The dependent is named first: publishing puts its requirement before it.
        published = cli(
            "templates",
            "publish",
            str(tmp_path / "household-budget"),
            str(tmp_path / "core-people"),
            "--json",
        )
        assert published.exit_code == 0, published.stderr
        assert [r["template"] for r in published.json()] == ["core-people", "household-budget"]
        shown = cli("templates", "show", "household-budget")
        assert "requires: core-people (checked 1)" in shown.stdout
        assert "required by: household-budget" in cli("templates", "show", "core-people").stdout

        cli("orgs", "create", "cli-deps", "--json")
        missing = cli("install", "household-budget", "--org", "cli-deps")
        assert missing.exit_code != 0
        assert "missing_requirement" in missing.stderr, missing.stderr
        installed = cli(
            "install", "household-budget", "--org", "cli-deps", "--with-requirements", "--json"
        )
        assert installed.exit_code == 0, installed.stderr
        listed = cli("installs", "list", "cli-deps", "--json").json()
        by_template = {i["template"]["slug"]: i for i in listed}
        assert set(by_template) == {"core-people", "household-budget"}
        core = by_template["core-people"]
        assert [d["template"] for d in core["required_by"]] == ["household-budget"]
        refused = cli("installs", "uninstall", core["id"])
        assert refused.exit_code != 0
        assert "required_by" in refused.stderr, refused.stderr
        done = cli("installs", "uninstall", core["id"], "--cascade", "--json")
        assert done.exit_code == 0, done.stderr
        statuses = {
            i["template"]["slug"]: i["status"]
            for i in cli("installs", "list", "cli-deps", "--json").json()
        }
        assert statuses == {"core-people": "uninstalled", "household-budget": "uninstalled"}

    def test_resync_installs_the_requirements_it_is_told_to(self, cli: Cli, tmp_path: Path) -> None:
        from tests.test_requirements import BUDGET, CORE

        for document in (CORE, BUDGET):
            folder = tmp_path / document["slug"]
            folder.mkdir()
            (folder / "template.json").write_text(json.dumps(document))
            assert cli("templates", "publish", str(folder)).exit_code == 0
        cli("orgs", "create", "cli-fleet-deps")
        asked = ("resync", "household-budget", "--org", "cli-fleet-deps", "--install", "--dry-run")
        (without,) = cli(*asked, "--json").json()["items"]
        assert (without["outcome"], without["reason"]) == ("conflict", "missing_requirement")
        (with_them,) = cli(*asked, "--with-requirements", "--json").json()["items"]
        assert with_them["outcome"] == "install"
        assert "reason" not in with_them
