"""Publishing documents into template orgs and cutting releases."""

from __future__ import annotations

import asyncio
import copy

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import SYSTEM
from install_service.db.session import transaction
from install_service.errors import NotFound
from install_service.templates import service as templates
from install_service.templates.documents import parse
from install_service.templates.service import get_release
from install_service.testing import make_user, publish_template
from tests.conftest import rows, scalar, small_doc


class TestPublish:
    async def test_first_publish_creates_org_agent_rows_and_release_1(
        self, engine: AsyncEngine
    ) -> None:
        result = await publish_template(engine, small_doc())
        assert (result.created, result.version) == (True, 1)
        org = (await rows(engine, "SELECT * FROM organizations WHERE slug = 'starter'"))[0]
        assert (org.visibility, org.kind) == ("public", "team")
        agents = await rows(engine, "SELECT * FROM agents WHERE organization_id = :o", o=org.id)
        assert len(agents) == 1
        assert agents[0].is_template
        assert agents[0].template_agent_id is None
        release = (await rows(engine, "SELECT * FROM template_releases"))[0]
        assert release.predecessor_id is None
        assert [e["slug"] for e in release.snapshot["entity_types"]] == ["company", "person"]
        # template org rows are authored there: no provenance
        assert (
            await scalar(
                engine,
                """SELECT count(*) FROM entity_types WHERE organization_id = :o
               AND managed_by_template_agent_id IS NULL AND mirrored_hash IS NULL""",
                o=org.id,
            )
            == 2
        )

    async def test_unchanged_content_cuts_no_release(self, engine: AsyncEngine) -> None:
        await publish_template(engine, small_doc())
        reordered = small_doc()
        reordered["entity_types"].reverse()
        again = await publish_template(engine, reordered)
        assert (again.created, again.version) == (False, 1)
        assert await scalar(engine, "SELECT count(*) FROM template_releases") == 1

    async def test_changed_content_cuts_next_release_and_archives_dropped_rows(
        self, engine: AsyncEngine
    ) -> None:
        first = await publish_template(engine, small_doc())
        doc = small_doc()
        doc["classifiers"] = []
        second = await publish_template(engine, doc, notes="drop classifier")
        assert (second.created, second.version) == (True, 2)
        release = (await rows(engine, "SELECT * FROM template_releases WHERE version = 2"))[0]
        assert release.predecessor_id == first.release_id
        assert release.notes == "drop classifier"
        assert (
            await scalar(engine, "SELECT status FROM event_classifiers WHERE slug = 'seniority'")
            == "archived"
        )
        # the template's own watcher history grows like any other
        doc["watchers"][0]["prompt"] = "New prompt"
        await publish_template(engine, doc)
        assert await scalar(engine, "SELECT max(version) FROM watcher_versions") == 2

    async def test_concurrent_publishes_get_consecutive_versions(self, engine: AsyncEngine) -> None:
        await publish_template(engine, small_doc())
        docs = []
        for n in range(8):
            doc = copy.deepcopy(small_doc())
            doc["description"] = f"variant {n}"
            docs.append(doc)
        results = await asyncio.gather(*(publish_template(engine, d) for d in docs))
        assert sorted(r.version for r in results) == list(range(2, 10))
        chain = await rows(
            engine,
            """SELECT r.version, p.version AS previous FROM template_releases r
               LEFT JOIN template_releases p ON p.id = r.predecessor_id ORDER BY r.version""",
        )
        assert [(c.version, c.previous) for c in chain] == [(1, None)] + [
            (v, v - 1) for v in range(2, 10)
        ]

    async def test_concurrent_publishes_of_item_changes_get_consecutive_versions(
        self, engine: AsyncEngine
    ) -> None:
        """The template's name and description stay the same: nothing but the template
        agent's row lock orders these publishes."""
        await publish_template(engine, small_doc())
        docs = []
        for n in range(8):
            doc = small_doc()
            doc["entity_types"][0]["name"] = f"Person {n}"
            docs.append(doc)
        results = await asyncio.gather(*(publish_template(engine, d) for d in docs))

        assert sorted(r.version for r in results) == list(range(2, 10))
        chain = await rows(
            engine,
            """SELECT r.version, p.version AS previous,
                      r.snapshot -> 'entity_types' -> 1 ->> 'name' AS person
               FROM template_releases r
               LEFT JOIN template_releases p ON p.id = r.predecessor_id ORDER BY r.version""",
        )
        assert [(c.version, c.previous) for c in chain] == [(1, None)] + [
            (v, v - 1) for v in range(2, 10)
        ]
        assert sorted(c.person for c in chain[1:]) == [f"Person {n}" for n in range(8)]
        # The template org's rows are those of the last release.
        assert await scalar(engine, "SELECT name FROM entity_types WHERE slug = 'person'") == (
            chain[-1].person
        )

    async def test_concurrent_first_publishes_make_one_template(self, engine: AsyncEngine) -> None:
        results = await asyncio.gather(*(publish_template(engine, small_doc()) for _ in range(6)))
        assert sum(r.created for r in results) == 1
        assert await scalar(engine, "SELECT count(*) FROM agents WHERE is_template") == 1
        assert await scalar(engine, "SELECT count(*) FROM entity_types") == 2

    async def test_republishing_with_another_visibility_changes_who_sees_it(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, small_doc())
        outsider, _, _ = await make_user(engine)

        await publish_template(engine, small_doc(visibility="private"))
        assert await scalar(
            engine, "SELECT visibility FROM organizations WHERE slug = 'starter'"
        ) == ("private")
        async with transaction(engine) as session:
            with pytest.raises(NotFound):
                await get_release(session, outsider, "starter")

        await publish_template(engine, small_doc())
        async with transaction(engine) as session:
            assert (await get_release(session, outsider, "starter"))["version"] == 3


class TestDiffBeforePublishing:
    async def test_a_change_of_the_template_itself_is_listed_and_nothing_is_written(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, small_doc())
        renamed = parse(small_doc(name="Renamed", description="Another description."))
        async with transaction(engine) as session:
            diff = await templates.diff(session, renamed, actor=SYSTEM)
        assert (diff.latest_version, diff.next_version, diff.items) == (1, 2, [])
        assert [(p.path, p.old, p.new) for p in diff.template_paths] == [
            ("/description", "A template for tests.", "Another description."),
            ("/name", "Starter template", "Renamed"),
        ]
        assert await scalar(engine, "SELECT count(*) FROM template_releases") == 1
