"""Races and edge cases found in review: each test failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service import engine as engine_module
from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.errors import Conflict, InstallConflict
from install_service.installs import invariants, repair
from install_service.installs import service as installs
from install_service.orgs.schemas import Organization
from install_service.releases import get_release
from install_service.templates.documents import snapshot
from install_service.templates.schemas import TemplateDocument
from install_service.testing import install_template, make_org, publish_template
from tests.conftest import dump, execute, scalar, small_doc, waits_for_a_lock


def v2(**names: str) -> dict[str, Any]:
    doc = small_doc()
    doc["entity_types"][0]["name"] = names.get("person", "Human")
    return doc


async def first_install_target(
    engine: AsyncEngine, owner: Actor
) -> tuple[Organization, engine_module.Target]:
    """The starter template published, a new org of `owner`'s, and the engine's target for a
    first install there (to drive plan and apply by hand)."""
    await publish_template(engine, small_doc())
    org = await make_org(engine, owner=owner)
    async with transaction(engine) as session:
        release = await get_release(session, owner, "starter")
    return org, engine_module.Target(
        organization_id=org.id,
        release_id=release["id"],
        owner=release["template_agent_id"],
        agent_id=None,
        source_org_id=release["organization_id"],
    )


class TestPublishBoundaries:
    async def test_publish_never_takes_over_a_customer_org(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        org = await make_org(engine, owner=owner, slug="starter")
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'notes', 'Notes')",
            o=org.id,
        )
        before = await dump(engine)
        with pytest.raises(Conflict) as info:
            await publish_template(engine, small_doc())
        assert info.value.code == "org_slug_taken"
        assert await dump(engine) == before

    async def test_system_rows_are_never_archived(self, engine: AsyncEngine, owner: Actor) -> None:
        await publish_template(engine, small_doc())
        template_org = await scalar(engine, "SELECT id FROM organizations WHERE slug='starter'")
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, '$member', 'M')",
            o=template_org,
        )
        result = await publish_template(engine, v2())
        assert result.changes["entity_types"]["archived"] == 0
        assert (
            await scalar(engine, "SELECT status FROM entity_types WHERE slug = '$member'")
            == "active"
        )


class TestConcurrentChanges:
    async def test_install_racing_an_uninstall_reports_no_false_conflict(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install_template(engine, owner, "starter")
        await publish_template(engine, v2())

        # The uninstall has archived every row but not committed when the upgrade starts:
        # the upgrade must wait for it and then see an uninstalled install, not local edits.
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, first.id)
            racing = asyncio.create_task(install_template(engine, owner, "starter"))
            await waits_for_a_lock(engine, racing)

        result = await racing
        assert (result.action, result.version) == ("reinstall", 2)
        assert await scalar(engine, "SELECT status FROM agents WHERE id = :i", i=first.id) == (
            "active"
        )

    async def test_edit_committed_while_upgrade_waits_is_a_conflict_not_lost(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install_template(engine, owner, "starter")
        await publish_template(engine, v2())

        async with engine.connect() as user:
            await user.execute(
                text(
                    "UPDATE entity_types SET name = 'Local' "
                    "WHERE organization_id = :o AND slug = 'person'"
                ),
                {"o": first.organization.id},
            )
            upgrade = asyncio.create_task(install_template(engine, owner, "starter"))
            await waits_for_a_lock(engine, upgrade)
            await user.commit()

        with pytest.raises(InstallConflict) as info:
            await upgrade
        assert info.value.conflicts == [
            {
                "kind": "entity_types",
                "slug": "person",
                "reason": "locally_modified",
                "fields": ["/name"],
            }
        ]
        assert (
            await scalar(
                engine,
                "SELECT name FROM entity_types WHERE organization_id = :o AND slug = 'person'",
                o=first.organization.id,
            )
            == "Local"
        )

    async def test_rule_deleted_while_upgrade_waits_is_merged_not_lost(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install_template(engine, owner, "starter")
        doc = small_doc()
        doc["relationship_types"][0]["name"] = "Works for"  # employed_by changes
        await publish_template(engine, doc)
        rules = """FROM entity_relationship_type_rules r USING entity_relationship_types t
                   WHERE r.relationship_type_id = t.id AND t.organization_id = :o
                     AND t.slug = 'employed_by'"""

        async with engine.connect() as user:
            await user.execute(text(f"DELETE {rules}"), {"o": first.organization.id})
            upgrade = asyncio.create_task(install_template(engine, owner, "starter"))
            await waits_for_a_lock(engine, upgrade)
            await user.commit()

        # The plan saw the org's deletion (a change to the rules the release left alone):
        # the merge keeps it while taking the release's new name.
        result = await upgrade
        assert result.action == "upgrade"
        assert (
            await scalar(
                engine,
                "SELECT name FROM entity_relationship_types WHERE organization_id = :o "
                "AND slug = 'employed_by'",
                o=first.organization.id,
            )
            == "Works for"
        )
        left = await scalar(
            engine,
            "SELECT count(*) FROM entity_relationship_type_rules r "
            "JOIN entity_relationship_types t ON t.id = r.relationship_type_id "
            "WHERE t.organization_id = :o AND t.slug = 'employed_by'",
            o=first.organization.id,
        )
        assert left == 0

    @pytest.mark.parametrize(
        ("table", "slug", "in_flight", "reason"),
        [
            # Committed before the write: the row is found taken, the write comes up short.
            ("entity_types", "person", False, "entity_types:person"),
            ("event_classifiers", "seniority", False, "classifiers:seniority"),
            # Committed while the write waits on it: references to the planned new row (from
            # rules, classifiers) cannot resolve.
            ("entity_types", "person", True, "fk_"),
        ],
    )
    async def test_row_created_between_plan_and_apply_rolls_everything_back(
        self,
        engine: AsyncEngine,
        owner: Actor,
        table: str,
        slug: str,
        in_flight: bool,
        reason: str,
    ) -> None:
        org, target = await first_install_target(engine, owner)
        # Classifiers need an attribute key; the other tables only a name.
        extra = ("", "") if table != "event_classifiers" else (", attribute_key", ", 'k'")
        insert = text(
            f"INSERT INTO {table} (organization_id, slug, name{extra[0]}) "
            f"VALUES (:o, :s, 'Mine'{extra[1]})"
        )
        before: dict[str, list[str]] = {}

        async def race() -> None:
            nonlocal before
            async with transaction(engine) as session, engine.connect() as other:
                planned = await engine_module.plan(session, target)
                assert {i.action for i in planned.items} == {"create"}
                # Someone else creates a row with a planned slug.
                await other.execute(insert, {"o": org.id, "s": slug})
                if not in_flight:
                    await other.commit()
                    before = await dump(engine)
                    await engine_module.apply(session, [(target, planned)])
                    return
                applying = asyncio.create_task(engine_module.apply(session, [(target, planned)]))
                await waits_for_a_lock(engine, applying)
                await other.commit()
                before = await dump(engine)
                await applying

        with pytest.raises(engine_module.ConcurrentChange) as info:
            await race()
        assert reason in info.value.detail
        assert await dump(engine) == before


class TestEdges:
    @pytest.mark.allow_violations
    async def test_reference_into_another_org_shows_as_drift(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install_template(engine, owner, "starter")
        await execute(
            engine,
            """UPDATE event_classifiers SET entity_type_id =
                   (SELECT id FROM entity_types WHERE slug = 'person'
                    AND organization_id <> :o LIMIT 1)
               WHERE organization_id = :o""",
            o=first.organization.id,
        )
        async with transaction(engine) as session:
            report = await repair.drift(session, owner, first.id)
        assert [(d.kind, d.slug, d.drift) for d in report.drift] == [
            ("classifiers", "seniority", "modified")
        ]
        async with transaction(engine) as session:
            found = await invariants.check(session)
        assert [(v.check, v.detail) for v in found] == [
            ("foreign_reference", "classifier seniority: entity type or watcher in another org")
        ]

    async def test_local_edit_equal_to_the_new_release_is_not_a_conflict(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install_template(engine, owner, "starter")
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Human' WHERE organization_id=:o AND slug='person'",
            o=first.organization.id,
        )
        await publish_template(engine, v2())
        result = await install_template(engine, owner, "starter")
        assert result.changes["entity_types"].updated == 1
        async with transaction(engine) as session:
            assert (await repair.drift(session, owner, first.id)).drift == []


class TestReleaseItems:
    async def test_a_release_inserted_by_any_writer_gets_its_items(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        """A release cut without the service's publish (an older instance during a rolling
        deploy, a hand-written insert) must not read as an empty release that archives all."""
        await publish_template(engine, small_doc())
        first = await install_template(engine, owner, "starter")
        doc = v2()
        snap = msgspec.json.encode(snapshot(msgspec.convert(doc, TemplateDocument))).decode()
        await execute(
            engine,
            """INSERT INTO template_releases (template_agent_id, version, predecessor_id,
                                               snapshot, content_hash)
               SELECT r.template_agent_id, 2, r.id, CAST(:snap AS jsonb),
                      install_content_hash(CAST(:snap AS jsonb))
               FROM template_releases r WHERE r.version = 1""",
            snap=snap,
        )
        result = await install_template(engine, owner, "starter")
        assert (result.action, result.version) == ("upgrade", 2)
        assert result.changes["entity_types"].updated == 1
        assert sum(c.archived for c in result.changes.values()) == 0
        assert (
            await scalar(
                engine,
                "SELECT name FROM entity_types WHERE organization_id = :o AND slug = 'person'",
                o=first.organization.id,
            )
            == "Human"
        )


async def test_row_renamed_while_apply_waits_on_it_is_a_concurrent_change(
    engine: AsyncEngine, owner: Actor
) -> None:
    """The apply statement takes a row seen under a planned slug for that slug's id; if the row
    is renamed away meanwhile, the insert under that id collides: a concurrent change, not a
    database error."""
    org, target = await first_install_target(engine, owner)
    before: dict[str, list[str]] = {}

    async def race() -> None:
        nonlocal before
        async with transaction(engine) as session, engine.connect() as other:
            planned = await engine_module.plan(session, target)
            await other.execute(
                text(
                    "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'person', 'Mine')"
                ),
                {"o": org.id},
            )
            await other.commit()
            await other.execute(
                text(
                    "UPDATE entity_types SET slug = 'human' WHERE organization_id = :o AND slug = 'person'"
                ),
                {"o": org.id},
            )
            applying = asyncio.create_task(engine_module.apply(session, [(target, planned)]))
            await waits_for_a_lock(engine, applying)
            await other.commit()
            before = await dump(engine)
            await applying

    with pytest.raises(engine_module.ConcurrentChange):
        await race()
    assert await dump(engine) == before
