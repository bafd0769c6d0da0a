"""Races and edge cases found in review: each test failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.db.session import transaction
from install_service.errors import Conflict, InstallConflict
from install_service.installs import invariants
from install_service.installs import service as installs
from install_service.orgs.service import Actor
from install_service.testing import install_template, make_org, publish_template
from tests.conftest import dump, execute, scalar, small_doc


def v2(**names: str) -> dict[str, Any]:
    doc = small_doc()
    doc["entity_types"][0]["name"] = names.get("person", "Human")
    return doc


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
            await asyncio.sleep(0.5)
            assert not racing.done()

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
            await asyncio.sleep(0.5)
            assert not upgrade.done()  # waiting for the user's row lock
            await user.commit()

        with pytest.raises(InstallConflict) as info:
            await upgrade
        assert info.value.conflicts == [
            {"kind": "entity_types", "slug": "person", "reason": "locally_modified"}
        ]
        assert (
            await scalar(
                engine,
                "SELECT name FROM entity_types WHERE organization_id = :o AND slug = 'person'",
                o=first.organization.id,
            )
            == "Local"
        )


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
            report = await installs.drift(session, owner, first.id)
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
            assert (await installs.drift(session, owner, first.id)).drift == []
