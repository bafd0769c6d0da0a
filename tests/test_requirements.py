"""Template dependencies (contract §13): `requires`, qualified references `<template>:<slug>`,
publish-time checks, installs with and without their requirements, `required_by` on upgrades
and uninstalls. Every refusal leaves the database exactly as it was."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service import engine as install_engine
from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.errors import Conflict, InstallConflict, TemplateDocumentInvalid
from install_service.installs import service as installs
from install_service.templates import service as templates
from install_service.templates.documents import parse
from install_service.testing import install_template, make_org, publish_template
from tests.conftest import dump, rows, scalar

CORE: dict[str, Any] = {
    "slug": "core-people",
    "name": "Core people",
    "entity_types": [
        {"slug": "person", "name": "Person"},
        {"slug": "household", "name": "Household"},
    ],
    "relationship_types": [
        {"slug": "member_of", "name": "Member of", "rules": [
            {"source": "person", "target": "household"}]},
    ],
    "watchers": [{"slug": "inbox", "name": "Inbox", "prompt": "Read the inbox."}],
}

BUDGET: dict[str, Any] = {
    "slug": "household-budget",
    "name": "Household budget",
    "requires": [{"template": "core-people"}],
    "entity_types": [{"slug": "budget", "name": "Budget"}],
    "relationship_types": [
        {"slug": "budget_for", "name": "Budget for", "rules": [
            {"source": "budget", "target": "core-people:household"},
            {"source": "budget", "target": "core-people:person"}]},
    ],
    "classifiers": [
        {"slug": "spend", "name": "Spend", "attribute_key": "spend",
         "entity_type": "core-people:person", "watcher": "core-people:inbox"},
    ],
}


def doc(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    found = copy.deepcopy(base)
    found.update(changes)
    return found


async def installs_of(engine: AsyncEngine, org: Any) -> dict[str, tuple[str, int]]:
    found = await rows(
        engine,
        """SELECT q.slug, a.status, r.version FROM agents a
           JOIN agents t ON t.id = a.template_agent_id
           JOIN organizations q ON q.id = t.organization_id
           JOIN template_releases r ON r.id = a.installed_release_id
           WHERE a.organization_id = :org""",
        org=org,
    )
    return {r.slug: (r.status, r.version) for r in found}


async def publish_refused(engine: AsyncEngine, document: dict[str, Any]) -> list[dict[str, str]]:
    before = await dump(engine)
    with pytest.raises(TemplateDocumentInvalid) as refused:
        await publish_template(engine, document)
    assert await dump(engine) == before
    return refused.value.extra["problems"]


class TestPublish:
    async def test_a_dependent_references_its_requirements_items(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, CORE)
        published = await publish_template(engine, BUDGET)
        assert published.created
        async with transaction(engine) as session:
            shown = await templates.manifest(session, Actor.system(), "household-budget")
            core = await templates.manifest(session, Actor.system(), "core-people")
            release = await templates.release(session, Actor.system(), "household-budget", 1)
        assert [(r.template, r.version, r.checked_version) for r in shown.requires] == [
            ("core-people", None, 1)
        ]
        assert core.required_by == ["household-budget"]
        assert release.snapshot["requires"] == [{"template": "core-people", "version": None}]
        # The template org's rule points at the required template org's row.
        targets = await rows(
            engine,
            """SELECT q.slug AS org, e.slug FROM entity_relationship_type_rules r
               JOIN entity_relationship_types t ON t.id = r.relationship_type_id
               JOIN entity_types e ON e.id = r.target_entity_type_id
               JOIN organizations q ON q.id = e.organization_id
               WHERE t.slug = 'budget_for' ORDER BY e.slug""",
        )
        assert [(r.org, r.slug) for r in targets] == [
            ("core-people", "household"),
            ("core-people", "person"),
        ]
        # Publishing the same document again cuts no release.
        assert not (await publish_template(engine, BUDGET)).created

    async def test_every_problem_is_listed_and_nothing_is_written(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, CORE)
        bad = doc(
            BUDGET,
            requires=[{"template": "core-people", "version": 7}, {"template": "nowhere"}],
            entity_types=[{"slug": "budget", "name": "B"}, {"slug": "person", "name": "P"}],
            classifiers=[
                {"slug": "spend", "name": "S", "attribute_key": "spend",
                 "entity_type": "core-people:persn", "watcher": "core-people:inbox"}
            ],
        )
        problems = await publish_refused(engine, bad)
        paths = sorted(p["path"] for p in problems)
        assert "$.requires[0].version" in paths
        assert "$.requires[1].template" in paths
        # a minimum that does not exist is checked nowhere else; the valid parts still are
        bad2 = doc(
            BUDGET,
            entity_types=[{"slug": "budget", "name": "B"}, {"slug": "person", "name": "P"}],
            classifiers=[
                {"slug": "spend", "name": "S", "attribute_key": "spend",
                 "entity_type": "core-people:persn", "watcher": "core-people:inbox"}
            ],
        )
        problems = await publish_refused(engine, bad2)
        messages = {p["path"]: p["message"] for p in problems}
        assert "has no entity type 'persn'" in messages["$.classifiers[0].entity_type"]
        assert "also a entity type of 'core-people'" in messages["$.entity_types[1].slug"]

    def test_a_qualifier_not_in_requires_is_refused_by_the_document(self) -> None:
        with pytest.raises(TemplateDocumentInvalid) as refused:
            parse(doc(BUDGET, requires=[]))
        assert {p["path"] for p in refused.value.extra["problems"]} >= {
            "$.relationship_types[0].rules[0].target",
            "$.classifiers[0].entity_type",
        }

    async def test_cycles_are_refused(self, engine: AsyncEngine) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        problems = await publish_refused(
            engine, doc(CORE, requires=[{"template": "household-budget"}])
        )
        assert any("cycle" in p["message"] for p in problems)


class TestInstall:
    async def test_missing_requirement_is_a_422_and_writes_nothing(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        before = await dump(engine)
        with pytest.raises(install_engine.MissingRequirement) as refused:
            await install_template(engine, owner, "household-budget")
        assert refused.value.status == 422
        assert refused.value.extra["requirements"] == [
            {"template": "core-people", "version": None, "installed_version": None}
        ]
        assert await dump(engine) == before

    async def test_with_requirements_installs_them_first_and_repoints(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        org = await make_org(engine, owner=owner)
        result = await install_template(
            engine, owner, "household-budget", org.slug, with_requirements=True
        )
        assert result.created
        assert await installs_of(engine, org.id) == {
            "core-people": ("active", 1),
            "household-budget": ("active", 1),
        }
        # Every reference points at the org's own rows, managed by the requirement's install.
        refs = await rows(
            engine,
            """SELECT e.organization_id = :org AS same_org, q.slug AS managed_by
               FROM event_classifiers c
               JOIN entity_types e ON e.id = c.entity_type_id
               JOIN agents t ON t.id = e.managed_by_template_agent_id
               JOIN organizations q ON q.id = t.organization_id
               WHERE c.organization_id = :org AND c.slug = 'spend'
               UNION ALL
               SELECT e.organization_id = :org, q.slug
               FROM entity_relationship_type_rules r
               JOIN entity_relationship_types t0 ON t0.id = r.relationship_type_id
               JOIN entity_types e ON e.id = r.target_entity_type_id
               JOIN agents t ON t.id = e.managed_by_template_agent_id
               JOIN organizations q ON q.id = t.organization_id
               WHERE t0.organization_id = :org AND t0.slug = 'budget_for'""",
            org=org.id,
        )
        assert [(r.same_org, r.managed_by) for r in refs] == [(True, "core-people")] * 3
        # One history event each, and nothing drifted.
        events = await scalar(
            engine,
            "SELECT count(*) FROM install_events WHERE organization_id = :org",
            org=org.id,
        )
        assert events == 2
        feed = await scalar(
            engine,
            "SELECT count(*) FROM events WHERE organization_id = :org AND type LIKE 'install.%'",
            org=org.id,
        )
        assert feed == 2
        async with transaction(engine) as session:
            assert await scalar_drift(session, org.id) == 0
        # Installing again is a no-op.
        again = await install_template(engine, owner, "household-budget", org.slug)
        assert (again.created, again.action) == (False, "none")

    async def test_concurrent_dependents_create_the_requirement_once(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        other = doc(BUDGET, slug="chores", entity_types=[{"slug": "chore", "name": "Chore"}],
                    relationship_types=[], classifiers=[
                        {"slug": "chore-kind", "name": "K", "attribute_key": "kind",
                         "entity_type": "core-people:household"}])
        await publish_template(engine, other)
        org = await make_org(engine, owner=owner)
        await asyncio.gather(
            install_template(engine, owner, "household-budget", org.slug, with_requirements=True),
            install_template(engine, owner, "chores", org.slug, with_requirements=True),
        )
        assert await installs_of(engine, org.id) == {
            "core-people": ("active", 1),
            "household-budget": ("active", 1),
            "chores": ("active", 1),
        }

    async def test_a_newer_minimum_upgrades_the_requirement(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        org = await make_org(engine, owner=owner)
        await install_template(engine, owner, "core-people", org.slug)
        core2 = doc(CORE, entity_types=[*CORE["entity_types"], {"slug": "pet", "name": "Pet"}])
        await publish_template(engine, core2)
        await publish_template(
            engine,
            doc(BUDGET, requires=[{"template": "core-people", "version": 2}]),
        )
        with pytest.raises(install_engine.MissingRequirement) as refused:
            await install_template(engine, owner, "household-budget", org.slug)
        assert refused.value.extra["requirements"] == [
            {"template": "core-people", "version": 2, "installed_version": 1}
        ]
        await install_template(engine, owner, "household-budget", org.slug, with_requirements=True)
        assert (await installs_of(engine, org.id))["core-people"] == ("active", 2)

    async def test_a_requirements_conflict_leaves_nothing_installed(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        org = await make_org(engine, owner=owner)
        # The org has its own `person`: the requirement conflicts (user_authored).
        async with transaction(engine) as session:
            await session.execute(
                install_engine.statement(
                    "INSERT INTO entity_types (organization_id, slug, name) "
                    "VALUES (:org, 'person', 'Mine')"
                ),
                {"org": org.id},
            )
        before = await dump(engine)
        with pytest.raises(InstallConflict) as refused:
            await install_template(
                engine, owner, "household-budget", org.slug, with_requirements=True
            )
        assert refused.value.conflicts[0]["template"] == "core-people"
        assert refused.value.conflicts[0]["reason"] == "user_authored"
        assert await dump(engine) == before


async def scalar_drift(session: Any, org: Any) -> int:
    from sqlalchemy import text

    found = await session.scalar(
        text("""SELECT count(*) FROM (
                    SELECT content_hash, mirrored_hash FROM entity_types WHERE organization_id = :o
                    UNION ALL SELECT content_hash, mirrored_hash FROM entity_relationship_types
                    WHERE organization_id = :o
                    UNION ALL SELECT content_hash, mirrored_hash FROM event_classifiers
                    WHERE organization_id = :o
                    UNION ALL SELECT content_hash, mirrored_hash FROM watchers
                    WHERE organization_id = :o) x
                WHERE content_hash IS DISTINCT FROM mirrored_hash"""),
        {"o": org},
    )
    return int(found)


class TestRequiredBy:
    async def test_uninstalling_a_requirement_is_refused_unless_cascade(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        org = await make_org(engine, owner=owner)
        await install_template(engine, owner, "household-budget", org.slug, with_requirements=True)
        core_install = await scalar(
            engine,
            """SELECT a.id FROM agents a JOIN agents t ON t.id = a.template_agent_id
               JOIN organizations q ON q.id = t.organization_id
               WHERE a.organization_id = :org AND q.slug = 'core-people'""",
            org=org.id,
        )
        before = await dump(engine)
        with pytest.raises(Conflict) as refused:
            async with transaction(engine) as session:
                await installs.uninstall(session, owner, core_install)
        assert refused.value.code == "required_by"
        assert [d["template"] for d in refused.value.extra["required_by"]] == ["household-budget"]
        assert await dump(engine) == before
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, core_install, cascade=True)
        assert await installs_of(engine, org.id) == {
            "core-people": ("uninstalled", 1),
            "household-budget": ("uninstalled", 1),
        }

    async def test_an_upgrade_that_drops_a_referenced_item_conflicts(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        org = await make_org(engine, owner=owner)
        await install_template(engine, owner, "household-budget", org.slug, with_requirements=True)
        # Release 2 drops `household` (budget_for and chore-kind reference it) and `inbox`.
        await publish_template(
            engine,
            doc(CORE, entity_types=[{"slug": "person", "name": "Person"}],
                relationship_types=[], watchers=[]),
        )
        before = await dump(engine)
        with pytest.raises(InstallConflict) as refused:
            await install_template(engine, owner, "core-people", org.slug)
        found = {(c["kind"], c["slug"]): c for c in refused.value.conflicts}
        assert set(found) == {("entity_types", "household"), ("watchers", "inbox")}
        assert found[("entity_types", "household")]["reason"] == "required_by"
        assert found[("entity_types", "household")]["required_by"] == [
            {"template": "household-budget", "kind": "relationship_types",
             "slug": "budget_for"}
        ]
        assert await dump(engine) == before
