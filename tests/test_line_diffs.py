"""Long text reads as lines: drift, release diffs, plans and conflicts carry a unified line
diff wherever a changed value spans lines; and dry runs say whether they would conflict."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service import textdiff
from install_service.actor import SYSTEM, Actor
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.errors import InstallConflict
from install_service.installs import repair
from install_service.installs.schemas import InstallResult, Resolution
from install_service.schema import service as schema
from install_service.templates import service as templates
from install_service.templates.documents import parse
from install_service.testing import install_template, make_user, publish_template
from tests.conftest import Cli, dump, execute, small_doc
from tests.test_invariants import delete_knows

PROMPT = "Find people.\nFind companies.\nLink each person to the company they work for.\n"


def doc_with(prompt: str = PROMPT, company: str = "Company") -> dict[str, Any]:
    doc = small_doc()
    doc["watchers"][0]["prompt"] = prompt
    doc["entity_types"][1]["name"] = company
    return doc


async def write_prompt(engine: AsyncEngine, org: Any, prompt: str) -> None:
    """The org's own prompt, as a new version of its watcher (written outside the service)."""
    await execute(
        engine,
        """WITH w AS (SELECT id FROM watchers WHERE organization_id = :o AND slug = 'inbox'),
           v AS (INSERT INTO watcher_versions (organization_id, watcher_id, version, name,
                     prompt, extraction_schema, sources_schema, reactions_guidance)
                 SELECT :o, w.id, 2, 'Inbox', :p, '{"type": "object"}', '{"type": "object"}',
                        'Link people to companies.' FROM w
                 RETURNING id, watcher_id)
           UPDATE watchers SET current_version_id = v.id FROM v WHERE watchers.id = v.watcher_id""",
        o=org,
        p=prompt,
    )


@pytest.fixture
async def installed(engine: AsyncEngine, owner: Actor) -> InstallResult:
    await publish_template(engine, doc_with())
    return await install_template(engine, owner, "starter")


DESCRIPTION = "Tracks people.\nAnd companies.\n"
OURS = PROMPT.replace("Find people.", "Find people and their roles.")
THEIRS = PROMPT.replace("Link each person", "Link every person")


class TestUnified:
    def test_only_text_spanning_lines(self) -> None:
        assert textdiff.unified("a", "b", old_label="x", new_label="y") is None
        assert textdiff.unified("a\nb", "a\nb", old_label="x", new_label="y") is None
        assert textdiff.unified({"a": "b\nc"}, "b\nc", old_label="x", new_label="y") is None
        assert textdiff.unified("a\nb\n", "a\nc\n", old_label="x", new_label="y") == (
            "--- x\n+++ y\n@@ -1,2 +1,2 @@\n a\n-b\n+c"
        )
        # An absent value is no text at all.
        assert textdiff.unified(None, "a\nb", old_label="x", new_label="y") == (
            "--- x\n+++ y\n@@ -0,0 +1,2 @@\n+a\n+b"
        )

    def test_pointers_and_lines(self) -> None:
        doc = {"a/b": {"~": "x"}, "c": 1}
        assert textdiff.at_pointer(doc, "/a~1b/~0") == "x"
        assert textdiff.at_pointer(doc, "/c/d") is None
        assert textdiff.at_pointer(doc, "") == doc
        assert [
            textdiff.line_kind(s) for s in ("--- a", "+++ b", "@@ -1 +1 @@", "+x", "-y", " z")
        ] == [
            "header",
            "header",
            "hunk",
            "added",
            "removed",
            "context",
        ]


class TestWhereTheyShow:
    async def test_drift_and_release_diffs(
        self, engine: AsyncEngine, owner: Actor, installed: InstallResult
    ) -> None:
        assert installed.id is not None
        await write_prompt(engine, installed.organization.id, OURS)
        async with transaction(engine) as session:
            report = await repair.drift(session, owner, installed.id)
        (field,) = report.drift[0].fields
        assert field.diff == (
            "--- mirrored\n+++ current\n@@ -1,3 +1,3 @@\n-Find people.\n"
            "+Find people and their roles.\n Find companies.\n"
            " Link each person to the company they work for."
        )
        await publish_template(engine, doc_with(THEIRS, company="Organisation"))
        async with transaction(engine) as session:
            diff = await templates.release_diff(session, owner, "starter", 1, 2)
        paths = {p.path: p for item in diff.items for p in item.paths}
        assert paths["/name"].diff is None  # one line: old and new say it all
        assert paths["/prompt"].diff is not None
        assert "-Link each person" in paths["/prompt"].diff
        assert paths["/prompt"].diff.startswith("--- release 1\n+++ release 2\n")

    async def test_the_templates_own_long_text_reads_as_lines(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        """The template's own fields (`template_paths`) carry line diffs as its items' paths
        do: before publishing and between releases alike."""
        await publish_template(engine, small_doc(description=DESCRIPTION))
        changed = small_doc(description=DESCRIPTION.replace("companies", "organisations"))
        async with transaction(engine) as session:
            before = await templates.diff(session, parse(changed), actor=SYSTEM)
        await publish_template(engine, changed)
        async with transaction(engine) as session:
            after = await templates.release_diff(session, owner, "starter", 1, 2)
        for diff in (before, after):
            assert [(p.path, p.diff) for p in diff.template_paths] == [
                (
                    "/description",
                    "--- release 1\n+++ release 2\n@@ -1,2 +1,2 @@\n Tracks people.\n"
                    "-And companies.\n+And organisations.",
                )
            ]

    async def test_a_dry_run_says_it_would_conflict_and_shows_both_sides(
        self, engine: AsyncEngine, owner: Actor, installed: InstallResult
    ) -> None:
        assert installed.id is not None
        await write_prompt(engine, installed.organization.id, OURS)
        await publish_template(engine, doc_with(THEIRS, company="Organisation"))
        before = await dump(engine)
        plan = await install_template(engine, owner, "starter", dry_run=True)
        assert plan.action == "upgrade"
        assert (plan.conflicts, plan.would_conflict) == (1, True)
        assert plan.changes["watchers"].conflict == 1
        assert plan.changes["entity_types"].conflict == 0
        assert plan.changes["entity_types"].updated == 1
        (inbox,) = [i for i in plan.items or [] if i.slug == "inbox"]
        (field,) = inbox.fields or []
        assert field.outcome == "conflict"
        assert field.diff is not None
        assert field.diff.startswith("--- organization\n+++ release 2\n")
        assert "-Find people and their roles.\n+Find people." in field.diff
        assert "+Link every person" in field.diff
        (company,) = [i for i in plan.items or [] if i.slug == "company"]
        assert [f.diff for f in company.fields or []] == [None]

        with pytest.raises(InstallConflict) as refused:
            await install_template(engine, owner, "starter")
        (conflict,) = refused.value.conflicts
        assert conflict["diffs"] == [{"path": "/prompt", "diff": field.diff}]
        assert await dump(engine) == before

        # A clean dry run says so too.
        clean = await install_template(
            engine,
            owner,
            "starter",
            dry_run=True,
            resolutions=[Resolution(kind="watchers", slug="inbox", path="/prompt", take="local")],
        )
        assert (clean.conflicts, clean.would_conflict) == (0, False)
        assert {c.conflict for c in clean.changes.values()} == {0}

    def test_the_command_line_prints_the_lines(self, url: URL, cli: Cli) -> None:
        async def setup() -> InstallResult:
            engine = create_engine(url)
            try:
                await publish_template(engine, doc_with())
                owner, _, _ = await make_user(engine)
                installed = await install_template(engine, owner, "starter")
                await write_prompt(engine, installed.organization.id, OURS)
                return installed
            finally:
                await engine.dispose()

        async def release() -> None:
            engine = create_engine(url)
            try:
                await publish_template(engine, doc_with(THEIRS))
            finally:
                await engine.dispose()

        installed = asyncio.run(setup())
        shown = cli("installs", "drift", str(installed.id))
        assert shown.exit_code == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert "watchers inbox /prompt" in lines
        assert "-Find people." in lines
        assert "+Find people and their roles." in lines
        assert "(line diff below)" in shown.stdout
        asyncio.run(release())
        org = installed.organization.slug
        planned = cli("install", "starter", "--org", org, "--dry-run")
        assert planned.exit_code == 0, planned.stderr
        assert "(dry run; 1 conflict)" in planned.stdout
        assert "+Link every person to the company they work for." in planned.stdout.splitlines()
        refused = cli("install", "starter", "--org", org)
        assert refused.exit_code == 1
        assert "-Find people and their roles." in refused.stderr.splitlines()

    def test_the_command_line_prints_the_templates_own_lines(self, url: URL, cli: Cli) -> None:
        async def publish(description: str) -> None:
            engine = create_engine(url)
            try:
                await publish_template(engine, small_doc(description=description))
            finally:
                await engine.dispose()

        asyncio.run(publish(DESCRIPTION))
        asyncio.run(publish(DESCRIPTION.replace("companies", "organisations")))
        shown = cli("templates", "compare", "starter", "1", "2")
        assert shown.exit_code == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert "template starter /description" in lines
        assert "-And companies." in lines
        assert "+And organisations." in lines
        assert "(line diff below)" in shown.stdout


class TestReconcileDryRun:
    # A managed row deleted behind the service's back is what the checker reports; it stays.
    @pytest.mark.allow_violations
    async def test_a_reconcile_dry_run_says_it_would_conflict(
        self, engine: AsyncEngine, owner: Actor, installed: InstallResult
    ) -> None:
        """The org deleted a managed row and made one of its own with its slug: reconciling
        would need it back, so the dry run counts the conflict (the write would be a 409)."""
        assert installed.id is not None
        org = installed.organization
        await delete_knows(engine, org.id)
        async with transaction(engine) as session:
            await schema.create_item(
                session,
                owner,
                org.slug,
                "relationship_types",
                {"slug": "knows", "name": "Knows", "is_symmetric": True},
            )
        before = await dump(engine)
        async with transaction(engine) as session:
            plan = await repair.reconcile(session, owner, installed.id, dry_run=True)
        assert (plan.dry_run, plan.conflicts, plan.would_conflict) == (True, 1, True)
        assert plan.changes["relationship_types"].conflict == 1
        (knows,) = [i for i in plan.items or [] if i.slug == "knows"]
        assert (knows.action, knows.reason) == ("conflict", "user_authored")
        with pytest.raises(InstallConflict):
            async with transaction(engine) as session:
                await repair.reconcile(session, owner, installed.id)
        assert await dump(engine) == before
