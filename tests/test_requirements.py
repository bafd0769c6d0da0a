"""Template dependencies (contract §13): `requires`, qualified references `<template>:<slug>`,
publish-time checks, installs with and without their requirements, `required_by` on upgrades
and uninstalls. Every refusal leaves the database exactly as it was."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service import engine as install_engine
from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.errors import Conflict, InstallConflict, TemplateDocumentInvalid
from install_service.installs import service as installs
from install_service.resync import fleet
from install_service.resync import service as resync
from install_service.resync.schemas import ResyncRequest
from install_service.templates import service as templates
from install_service.templates.documents import parse
from install_service.testing import install_template, make_org, publish_template
from tests.conftest import dump, execute, install_ids, rows, scalar, waits_for_a_lock
from tests.runs import items, work_until_idle
from tests.test_bulk_install import bare_orgs

CORE: dict[str, Any] = {
    "slug": "core-people",
    "name": "Core people",
    "entity_types": [
        {"slug": "person", "name": "Person"},
        {"slug": "household", "name": "Household"},
    ],
    "relationship_types": [
        {
            "slug": "member_of",
            "name": "Member of",
            "rules": [{"source": "person", "target": "household"}],
        },
    ],
    "watchers": [{"slug": "inbox", "name": "Inbox", "prompt": "Read the inbox."}],
}

BUDGET: dict[str, Any] = {
    "slug": "household-budget",
    "name": "Household budget",
    "requires": [{"template": "core-people"}],
    "entity_types": [{"slug": "budget", "name": "Budget"}],
    "relationship_types": [
        {
            "slug": "budget_for",
            "name": "Budget for",
            "rules": [
                {"source": "budget", "target": "core-people:household"},
                {"source": "budget", "target": "core-people:person"},
            ],
        },
    ],
    "classifiers": [
        {
            "slug": "spend",
            "name": "Spend",
            "attribute_key": "spend",
            "entity_type": "core-people:person",
            "watcher": "core-people:inbox",
        },
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
    async def test_a_dependent_references_its_requirements_items(self, engine: AsyncEngine) -> None:
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

    async def test_a_template_orgs_reference_is_the_required_templates_row(
        self, engine: AsyncEngine
    ) -> None:
        """Release 1 defines its own `person`; release 2 uses core-people's instead: the
        template org's rule points at core-people's row, never at its own archived one."""
        await publish_template(engine, CORE)
        standalone = doc(
            BUDGET,
            requires=[],
            entity_types=[{"slug": "budget", "name": "Budget"}, {"slug": "person", "name": "P"}],
            relationship_types=[
                {
                    "slug": "budget_for",
                    "name": "Budget for",
                    "rules": [{"source": "budget", "target": "person"}],
                }
            ],
            classifiers=[],
        )
        await publish_template(engine, standalone)
        await publish_template(
            engine,
            doc(
                standalone,
                requires=[{"template": "core-people"}],
                entity_types=[{"slug": "budget", "name": "Budget"}],
                relationship_types=[
                    {
                        "slug": "budget_for",
                        "name": "Budget for",
                        "rules": [{"source": "budget", "target": "core-people:person"}],
                    }
                ],
            ),
        )
        found = await rows(
            engine,
            """SELECT q.slug AS org, e.slug, e.status FROM entity_relationship_type_rules r
               JOIN entity_relationship_types t ON t.id = r.relationship_type_id
               JOIN organizations tq ON tq.id = t.organization_id
               JOIN entity_types e ON e.id = r.target_entity_type_id
               JOIN organizations q ON q.id = e.organization_id
               WHERE tq.slug = 'household-budget' AND t.slug = 'budget_for'""",
        )
        assert [(r.org, r.slug, r.status) for r in found] == [("core-people", "person", "active")]

    async def test_every_problem_is_listed_and_nothing_is_written(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, CORE)
        bad = doc(
            BUDGET,
            requires=[{"template": "core-people", "version": 7}, {"template": "nowhere"}],
            entity_types=[{"slug": "budget", "name": "B"}, {"slug": "person", "name": "P"}],
            classifiers=[
                {
                    "slug": "spend",
                    "name": "S",
                    "attribute_key": "spend",
                    "entity_type": "core-people:persn",
                    "watcher": "core-people:inbox",
                }
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
                {
                    "slug": "spend",
                    "name": "S",
                    "attribute_key": "spend",
                    "entity_type": "core-people:persn",
                    "watcher": "core-people:inbox",
                }
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
        other = doc(
            BUDGET,
            slug="chores",
            entity_types=[{"slug": "chore", "name": "Chore"}],
            relationship_types=[],
            classifiers=[
                {
                    "slug": "chore-kind",
                    "name": "K",
                    "attribute_key": "kind",
                    "entity_type": "core-people:household",
                }
            ],
        )
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
        core_install = (await install_ids(engine, org.id))["core-people"]
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
            doc(
                CORE,
                entity_types=[{"slug": "person", "name": "Person"}],
                relationship_types=[],
                watchers=[],
            ),
        )
        before = await dump(engine)
        with pytest.raises(InstallConflict) as refused:
            await install_template(engine, owner, "core-people", org.slug)
        found = {(c["kind"], c["slug"]): c for c in refused.value.conflicts}
        assert set(found) == {("entity_types", "household"), ("watchers", "inbox")}
        assert found[("entity_types", "household")]["reason"] == "required_by"
        assert found[("entity_types", "household")]["required_by"] == [
            {"template": "household-budget", "kind": "relationship_types", "slug": "budget_for"}
        ]
        assert await dump(engine) == before


class TestFleet:
    async def test_bulk_install_with_requirements_installs_them_per_org(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        orgs = await bare_orgs(engine, 4, "hh")
        # One org already has its own `person`: its requirement conflicts, so that org gets
        # nothing at all; the others get both templates.
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:org, 'person', 'x')",
            org=orgs[0],
        )
        # Another has its own `budget`: its requirement would install, the template itself
        # conflicts, so the requirement is not left behind either.
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:org, 'budget', 'x')",
            org=orgs[1],
        )
        async with transaction(engine) as session:
            plan = await fleet.dry_run(
                session,
                Actor.system(),
                "household-budget",
                ResyncRequest(orgs=[str(o) for o in orgs], install=True),
            )
        assert {i.reason for i in plan.items} == {"missing_requirement"}
        assert plan.totals.conflict == 4
        without = await run_for(engine, url, orgs, with_requirements=False)
        assert (without.counts.conflict, without.counts.succeeded) == (4, 0)
        assert {i.reason for i in await items(engine, without.id)} == {"missing_requirement"}
        for org in orgs:
            assert await installs_of(engine, org) == {}
        finished = await run_for(engine, url, orgs, with_requirements=True)
        assert (finished.counts.succeeded, finished.counts.conflict) == (2, 2)
        assert await installs_of(engine, orgs[0]) == {}
        assert await installs_of(engine, orgs[1]) == {}
        for org in orgs[2:]:
            assert await installs_of(engine, org) == {
                "core-people": ("active", 1),
                "household-budget": ("active", 1),
            }

    async def test_a_resync_of_a_requirement_conflicts_only_where_dependents_need_it(
        self, engine: AsyncEngine, url: URL
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        orgs = await bare_orgs(engine, 3, "rq")
        async with transaction(engine) as session:
            for org in orgs:
                await installs.install(
                    session, Actor.system(), template="core-people", organization=str(org)
                )
            await installs.install(
                session, Actor.system(), template="household-budget", organization=str(orgs[0])
            )
        await publish_template(
            engine,
            doc(
                CORE,
                entity_types=[{"slug": "person", "name": "Person"}],
                relationship_types=[],
                watchers=[],
            ),
        )
        async with transaction(engine) as session:
            plan = await fleet.dry_run(session, Actor.system(), "core-people", ResyncRequest())
        by_org = {i.organization.id: i for i in plan.items}
        assert by_org[orgs[0]].outcome == "conflict"
        assert {c["reason"] for c in by_org[orgs[0]].conflicts or []} == {"required_by"}
        assert {by_org[o].outcome for o in orgs[1:]} == {"upgrade"}
        async with transaction(engine) as session:
            started = await resync.start_run(
                session, Actor.system(), "core-people", ResyncRequest()
            )
        await work_until_idle(engine, url)
        async with transaction(engine) as session:
            finished = await resync.get_run(session, started.id)
        assert (finished.counts.succeeded, finished.counts.conflict) == (2, 1)
        assert (await installs_of(engine, orgs[0]))["core-people"] == ("active", 1)
        for org in orgs[1:]:
            assert (await installs_of(engine, org))["core-people"] == ("active", 2)
        # The dependent's rows still point at active rows.
        active = await scalar(
            engine,
            """SELECT bool_and(e.status = 'active') FROM entity_relationship_type_rules r
               JOIN entity_types e ON e.id = r.target_entity_type_id
               WHERE r.organization_id = :org""",
            org=orgs[0],
        )
        assert active is True


async def run_for(
    engine: AsyncEngine, url: URL, orgs: list[Any], *, with_requirements: bool
) -> Any:
    """A bulk install of household-budget into `orgs`, run to its end."""
    request = ResyncRequest(
        orgs=[str(o) for o in orgs], install=True, with_requirements=with_requirements
    )
    async with transaction(engine) as session:
        started = await resync.start_run(session, Actor.system(), "household-budget", request)
    await work_until_idle(engine, url)
    async with transaction(engine) as session:
        return await resync.get_run(session, started.id)


A = {"slug": "base-a", "name": "A", "entity_types": [{"slug": "thing", "name": "Thing"}]}
B = {
    "slug": "left-b",
    "name": "B",
    "requires": [{"template": "base-a"}],
    "relationship_types": [
        {
            "slug": "left_of",
            "name": "Left",
            "rules": [{"source": "base-a:thing", "target": "base-a:thing"}],
        }
    ],
}
C = {
    "slug": "right-c",
    "name": "C",
    "requires": [{"template": "base-a"}],
    "classifiers": [
        {"slug": "side", "name": "Side", "attribute_key": "side", "entity_type": "base-a:thing"}
    ],
}
D = {
    "slug": "top-d",
    "name": "D",
    "requires": [{"template": "left-b"}, {"template": "right-c"}],
    "relationship_types": [
        {"slug": "top_of", "name": "Top", "inverse": "left-b:left_of"},
    ],
}


class TestShapes:
    async def test_a_diamond_installs_the_shared_requirement_once(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        for document in (A, B, C, D):
            await publish_template(engine, document)
        org = await make_org(engine, owner=owner)
        await install_template(engine, owner, "top-d", org.slug, with_requirements=True)
        assert await installs_of(engine, org.id) == {
            "base-a": ("active", 1),
            "left-b": ("active", 1),
            "right-c": ("active", 1),
            "top-d": ("active", 1),
        }
        # A qualified inverse points at the requirement's row in the org.
        inverse = await scalar(
            engine,
            """SELECT i.slug || ' ' || (i.organization_id = t.organization_id)
               FROM entity_relationship_types t
               JOIN entity_relationship_types i ON i.id = t.inverse_type_id
               WHERE t.organization_id = :org AND t.slug = 'top_of'""",
            org=org.id,
        )
        assert inverse == "left_of true"
        # base-a is required (through left-b and right-c): uninstalling it cascades to all.
        base = (await install_ids(engine, org.id))["base-a"]
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, base, cascade=True)
        assert {s for s, _ in (await installs_of(engine, org.id)).values()} == {"uninstalled"}

    async def test_a_detached_requirement_item_is_the_orgs_and_dependents_keep_it(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        from install_service.installs import repair

        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        org = await make_org(engine, owner=owner)
        await install_template(engine, owner, "household-budget", org.slug, with_requirements=True)
        ids = await install_ids(engine, org.id)
        async with transaction(engine) as session:
            await repair.detach(
                session, owner, ids["core-people"], kind="entity_types", slug="person"
            )
        async with transaction(engine) as session:
            drift = await repair.drift(session, owner, ids["household-budget"])
            assert drift.drift == []
        # The dependent upgrades (a new release) and keeps pointing at the org's own row.
        await publish_template(engine, doc(BUDGET, description="v2"))
        upgraded = await install_template(engine, owner, "household-budget", org.slug)
        assert upgraded.action == "upgrade"
        target = await scalar(
            engine,
            """SELECT e.managed_by_template_agent_id IS NULL FROM event_classifiers c
               JOIN entity_types e ON e.id = c.entity_type_id
               WHERE c.organization_id = :org AND c.slug = 'spend'""",
            org=org.id,
        )
        assert target is True

    async def test_a_symmetric_type_cannot_be_a_qualified_inverse(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(
            engine,
            doc(A, relationship_types=[{"slug": "near", "name": "Near", "is_symmetric": True}]),
        )
        problems = await publish_refused(
            engine,
            doc(B, relationship_types=[{"slug": "left_of", "name": "L", "inverse": "base-a:near"}]),
        )
        assert [p["path"] for p in problems] == ["$.relationship_types[0].inverse"]


class TestHttp:
    async def test_the_api_shows_and_refuses_as_documented(
        self, engine: AsyncEngine, install_service_client: Any
    ) -> None:
        from install_service.orgs.service import ensure_admin
        from install_service.testing import bearer

        client = install_service_client
        async with transaction(engine) as session:
            await ensure_admin(session, "deps-admin")
        admin = bearer("deps-admin")
        assert (
            await client.put("/api/v1/admin/templates/core-people", json=CORE, headers=admin)
        ).status_code == 201
        bad = doc(BUDGET, requires=[{"template": "core-people", "version": 9}])
        refused = await client.put(
            "/api/v1/admin/templates/household-budget", json=bad, headers=admin
        )
        assert refused.status_code == 422
        assert refused.json()["problems"][0]["path"] == "$.requires[0].version"
        assert (
            await client.put("/api/v1/admin/templates/household-budget", json=BUDGET, headers=admin)
        ).status_code == 201
        shown = (await client.get("/api/v1/templates/core-people", headers=admin)).json()
        assert shown["required_by"] == ["household-budget"]
        shown = (await client.get("/api/v1/templates/household-budget", headers=admin)).json()
        assert shown["requires"] == [
            {"template": "core-people", "version": None, "checked_version": 1}
        ]
        org = await make_org(engine, slug="deps-http")
        body = {"template": "household-budget", "organization": "deps-http"}
        missing = await client.post("/api/v1/installs", json=body, headers=admin)
        assert missing.status_code == 422
        assert missing.json()["code"] == "missing_requirement"
        assert missing.json()["requirements"][0]["template"] == "core-people"
        assert await installs_of(engine, org.id) == {}
        done = await client.post(
            "/api/v1/installs", json={**body, "with_requirements": True}, headers=admin
        )
        assert done.status_code == 201
        dependent = (
            await client.get(f"/api/v1/installs/{done.json()['id']}", headers=admin)
        ).json()
        assert [(r["template"], r["status"]) for r in dependent["requires"]] == [
            ("core-people", "active")
        ]
        core_id = dependent["requires"][0]["install_id"]
        core = (await client.get(f"/api/v1/installs/{core_id}", headers=admin)).json()
        assert [r["template"] for r in core["required_by"]] == ["household-budget"]
        refused = await client.delete(f"/api/v1/installs/{core_id}", headers=admin)
        assert refused.status_code == 409
        assert refused.json()["code"] == "required_by"
        bad_flag = await client.delete(f"/api/v1/installs/{core_id}?cascade=maybe", headers=admin)
        assert bad_flag.status_code == 400
        gone = await client.delete(f"/api/v1/installs/{core_id}?cascade=true", headers=admin)
        assert gone.status_code == 200
        assert {s for s, _ in (await installs_of(engine, org.id)).values()} == {"uninstalled"}


class TestLifecycle:
    async def test_an_uninstalled_dependent_holds_nothing_back(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        org = await make_org(engine, owner=owner)
        await install_template(engine, owner, "household-budget", org.slug, with_requirements=True)
        ids = await install_ids(engine, org.id)
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, ids["household-budget"])
        await publish_template(
            engine,
            doc(
                CORE,
                entity_types=[{"slug": "person", "name": "Person"}],
                relationship_types=[],
                watchers=[],
            ),
        )
        upgraded = await install_template(engine, owner, "core-people", org.slug)
        assert upgraded.action == "upgrade"
        assert (await installs_of(engine, org.id))["core-people"] == ("active", 2)
        # Nor does it hold the requirement's uninstall back, or show among what requires it.
        async with transaction(engine) as session:
            assert (
                await installs.get_install(session, owner, ids["core-people"])
            ).required_by == []
            await installs.uninstall(session, owner, ids["core-people"])
        assert (await installs_of(engine, org.id))["core-people"][0] == "uninstalled"

    async def test_only_the_orgs_own_dependents_hold_a_requirement_at_their_release(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        here = await make_org(engine, owner=owner)
        there = await make_org(engine, owner=owner)
        for org in (here, there):
            await install_template(
                engine, owner, "household-budget", org.slug, with_requirements=True
            )
        changed = copy.deepcopy(BUDGET)
        changed["relationship_types"][0]["description"] = "What a budget is for."
        await publish_template(engine, changed)
        await install_template(engine, owner, "household-budget", here.slug)
        ids = await install_ids(engine, here.id)

        # `required_by` lists the dependent at its own release (2), not the requirement's (1).
        async with transaction(engine) as session:
            found = await installs.get_install(session, owner, ids["core-people"])
        assert [(d.template, d.install_id, d.version) for d in found.required_by] == [
            ("household-budget", ids["household-budget"], 2)
        ]
        # Another org's active dependent holds nothing back here.
        theirs = await install_ids(engine, there.id)
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, theirs["household-budget"])
            await installs.uninstall(session, owner, theirs["core-people"])
        assert (await installs_of(engine, there.id))["core-people"][0] == "uninstalled"
        assert (await installs_of(engine, here.id))["core-people"] == ("active", 1)

    async def test_an_orgs_edit_of_a_dependent_item_merges_through_an_upgrade(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        org = await make_org(engine, owner=owner)
        await install_template(engine, owner, "household-budget", org.slug, with_requirements=True)
        await execute(
            engine,
            """UPDATE entity_relationship_types SET name = 'Ours'
               WHERE organization_id = :org AND slug = 'budget_for'""",
            org=org.id,
        )
        changed = copy.deepcopy(BUDGET)
        changed["relationship_types"][0]["description"] = "What a budget is for."
        await publish_template(engine, changed)
        upgraded = await install_template(engine, owner, "household-budget", org.slug)
        assert (upgraded.action, upgraded.conflicts) == ("upgrade", 0)
        found = (
            await rows(
                engine,
                """SELECT name, description, content_hash = mirrored_hash AS clean
                   FROM entity_relationship_types
                   WHERE organization_id = :org AND slug = 'budget_for'""",
                org=org.id,
            )
        )[0]
        assert (found.name, found.description, found.clean) == (
            "Ours",
            "What a budget is for.",
            False,
        )
        targets = await scalar(
            engine,
            """SELECT count(*) FROM entity_relationship_type_rules r
               JOIN entity_relationship_types t ON t.id = r.relationship_type_id
               WHERE t.organization_id = :org AND t.slug = 'budget_for'""",
            org=org.id,
        )
        assert targets == 2

    async def test_a_requirement_is_not_uninstalled_under_a_dependent_being_installed(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        org = await make_org(engine, owner=owner)
        await install_template(engine, owner, "core-people", org.slug)
        core = (await install_ids(engine, org.id))["core-people"]
        async with transaction(engine) as installing:
            await installs.install(
                installing, owner, template="household-budget", organization=org.slug
            )

            async def uninstall() -> Any:
                async with transaction(engine) as session:
                    return await installs.uninstall(session, owner, core)

            racing = asyncio.ensure_future(uninstall())
            await waits_for_a_lock(engine, racing)
        with pytest.raises(Conflict) as refused:
            await racing
        assert refused.value.code == "required_by"
        assert await installs_of(engine, org.id) == {
            "core-people": ("active", 1),
            "household-budget": ("active", 1),
        }


class TestUninstalledRequirement:
    async def test_an_uninstalled_requirement_is_missing_and_installed_again_with_it(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        org = await make_org(engine, owner=owner)
        await install_template(engine, owner, "core-people", org.slug)
        async with transaction(engine) as session:
            await installs.uninstall(
                session, owner, (await install_ids(engine, org.id))["core-people"]
            )
        before = await dump(engine)
        with pytest.raises(install_engine.MissingRequirement) as refused:
            await install_template(engine, owner, "household-budget", org.slug)
        assert refused.value.extra["requirements"] == [
            {"template": "core-people", "version": None, "installed_version": None}
        ]
        assert await dump(engine) == before
        await install_template(engine, owner, "household-budget", org.slug, with_requirements=True)
        assert await installs_of(engine, org.id) == {
            "core-people": ("active", 1),
            "household-budget": ("active", 1),
        }
        archived = await scalar(
            engine,
            "SELECT count(*) FROM entity_types WHERE organization_id = :org AND status <> 'active'",
            org=org.id,
        )
        assert archived == 0


class TestReleaseDiff:
    async def test_a_change_of_requirements_shows_in_the_release_diff(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, CORE)
        await publish_template(engine, BUDGET)
        second = await publish_template(
            engine, doc(BUDGET, requires=[{"template": "core-people", "version": 1}])
        )
        assert (second.created, second.version) == (True, 2)
        async with transaction(engine) as session:
            diff = await templates.release_diff(session, Actor.system(), "household-budget", 1, 2)
        assert diff.items == []
        assert [(p.path, p.old, p.new) for p in diff.template_paths] == [
            (
                "/requires",
                [{"template": "core-people", "version": None}],
                [{"template": "core-people", "version": 1}],
            )
        ]
