"""Upgrades that keep every org's customizations, end to end on real rows: field-level merge,
policies, resolutions, force, adopt, detach, reconcile, drift by path, release diffs."""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service import engine as install_engine
from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.errors import InstallConflict, Invalid, NotFound
from install_service.installs import invariants, repair
from install_service.installs import service as installs
from install_service.installs.schemas import InstallResult, ItemRef, Resolution
from install_service.orgs.service import ensure_admin
from install_service.releases import get_release
from install_service.testing import bearer, install_template, make_user, publish_template
from tests.conftest import dump, execute, rows, scalar, small_doc

ADMIN = "merge-admin-token"


def release(doc: dict[str, Any], **edits: Any) -> dict[str, Any]:
    """`doc` with edits given as `kind__index__field=value`."""
    new = copy.deepcopy(doc)
    for path, value in edits.items():
        kind, index, field = path.split("__")
        new[kind][int(index)][field] = value
    return new


async def upgrade(engine: AsyncEngine, owner: Actor, **kw: Any) -> InstallResult:
    return await install_template(engine, owner, "starter", **kw)


async def person(engine: AsyncEngine, org: Any) -> Any:
    [row] = await rows(
        engine, "SELECT * FROM entity_types WHERE organization_id = :o AND slug = 'person'", o=org
    )
    return row


async def history_changes(engine: AsyncEngine, install_id: Any) -> list[dict[str, Any]]:
    return [
        r.changes
        for r in await rows(
            engine,
            "SELECT changes FROM install_events WHERE install_id = :i ORDER BY created_at",
            i=install_id,
        )
    ]


@pytest.fixture
async def installed(engine: AsyncEngine, owner: Actor) -> tuple[dict[str, Any], InstallResult]:
    doc = small_doc()
    await publish_template(engine, doc)
    return doc, await upgrade(engine, owner)


class TestFieldMerge:
    async def test_org_edit_of_one_field_and_release_edit_of_another_both_land(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, first = installed
        org = first.organization.id
        await execute(
            engine,
            "UPDATE entity_types SET icon = 'local-icon' WHERE organization_id = :o "
            "AND slug = 'person'",
            o=org,
        )
        await publish_template(engine, release(doc, entity_types__0__name="Human"))
        result = await upgrade(engine, owner, dry_run=True)
        [item] = [i for i in result.items or [] if i.slug == "person"]
        assert item.action == "update"
        assert [(f.path, f.outcome) for f in item.fields or []] == [
            ("/icon", "kept_local"),
            ("/name", "merged"),
        ]

        result = await upgrade(engine, owner)
        assert result.action == "upgrade"
        row = await person(engine, org)
        assert (row.name, row.icon) == ("Human", "local-icon")
        # The base moved to the new release: the icon is still the org's own edit (drift).
        async with transaction(engine) as session:
            drift = await repair.drift(session, owner, first.id)
        assert [
            (d.slug, [(f.path, f.mirrored, f.current) for f in d.fields]) for d in drift.drift
        ] == [("person", [("/icon", None, "local-icon")])]

    async def test_nested_schema_edits_merge_path_by_path(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, first = installed
        org = first.organization.id
        await execute(
            engine,
            """UPDATE entity_types SET metadata_schema = jsonb_set(metadata_schema,
                   '{properties,nickname}', '{"type": "string"}')
               WHERE organization_id = :o AND slug = 'person'""",
            o=org,
        )
        schema = {
            "type": "object",
            "properties": {"age": {"type": "integer", "description": "Years"}},
        }
        await publish_template(engine, release(doc, entity_types__0__metadata_schema=schema))
        await upgrade(engine, owner)
        row = await person(engine, org)
        assert row.metadata_schema == {
            "type": "object",
            "properties": {
                "age": {"type": "integer", "description": "Years"},
                "nickname": {"type": "string"},
            },
        }

    async def test_same_field_changed_differently_is_a_conflict_naming_the_path(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, first = installed
        org = first.organization.id
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Mine', icon = 'i' WHERE organization_id = :o "
            "AND slug = 'person'",
            o=org,
        )
        await publish_template(engine, release(doc, entity_types__0__name="Human"))
        before = await dump(engine)
        with pytest.raises(InstallConflict) as info:
            await upgrade(engine, owner)
        assert info.value.conflicts == [
            {
                "kind": "entity_types",
                "slug": "person",
                "reason": "locally_modified",
                "fields": ["/name"],
            }
        ]
        assert await dump(engine) == before

    async def test_take_local_keeps_the_org_value_and_never_conflicts_again(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, first = installed
        org = first.organization.id
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Mine' WHERE organization_id = :o AND slug = 'person'",
            o=org,
        )
        await publish_template(engine, release(doc, entity_types__0__name="Human"))
        keep = Resolution(kind="entity_types", slug="person", path="/name", take="local")
        result = await upgrade(engine, owner, resolutions=[keep])
        assert result.version == 2
        row = await person(engine, org)
        assert row.name == "Mine"
        v2 = await scalar(
            engine,
            """SELECT r.id FROM template_releases r JOIN agents a ON a.id = r.template_agent_id
               JOIN organizations o ON o.id = a.organization_id
               WHERE o.slug = 'starter' AND r.version = 2""",
        )
        assert row.mirrored_release_id == v2
        # The same upgrade again: nothing to do, no conflict.
        again = await upgrade(engine, owner)
        assert again.action == "none"

    async def test_take_template_overwrites_and_keeps_the_local_value_in_history(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, first = installed
        org = first.organization.id
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Mine' WHERE organization_id = :o AND slug = 'person'",
            o=org,
        )
        await publish_template(engine, release(doc, entity_types__0__name="Human"))
        take = Resolution(kind="entity_types", slug="person", take="template")
        result = await upgrade(engine, owner, resolutions=[take])
        assert [(o.slug, o.path, o.local) for o in result.overwritten or []] == [
            ("person", "/name", "Mine")
        ]
        assert (await person(engine, org)).name == "Human"
        changes = await history_changes(engine, first.id)
        assert changes[-1]["overwritten"] == [
            {"kind": "entity_types", "slug": "person", "path": "/name", "local": "Mine"}
        ]

    async def test_take_template_for_the_whole_item_overwrites_every_local_field(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        """The item's whole-item resolution reaches the fields only the org changed too,
        not just the conflicting one."""
        doc, first = installed
        org = first.organization.id
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Mine', icon = 'mine' WHERE organization_id = :o "
            "AND slug = 'person'",
            o=org,
        )
        await publish_template(engine, release(doc, entity_types__0__name="Human"))
        take = Resolution(kind="entity_types", slug="person", take="template")
        result = await upgrade(engine, owner, resolutions=[take])
        assert sorted((o.path, o.local) for o in result.overwritten or []) == [
            ("/icon", "mine"),
            ("/name", "Mine"),
        ]
        row = await person(engine, org)
        assert (row.name, row.icon) == ("Human", None)

    async def test_unknown_resolution_or_adoption_items_are_refused(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        before = await dump(engine)
        for kw in (
            {"resolutions": [Resolution(kind="entity_types", slug="ghost", take="local")]},
            {"adopt": [ItemRef(kind="watchers", slug="ghost")]},
        ):
            with pytest.raises(Invalid) as info:
                await upgrade(engine, owner, **kw)
            assert info.value.code == "unknown_item"
        assert await dump(engine) == before

    async def test_rules_merge_as_a_set(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, first = installed
        org = first.organization.id
        # The org adds its own rule person -> person to employed_by; the release adds
        # company -> company to it.
        await execute(
            engine,
            """INSERT INTO entity_relationship_type_rules
                   (organization_id, relationship_type_id, source_entity_type_id,
                    target_entity_type_id)
               SELECT :o, t.id, p.id, p.id FROM entity_relationship_types t, entity_types p
               WHERE t.organization_id = :o AND t.slug = 'employed_by'
                 AND p.organization_id = :o AND p.slug = 'person'""",
            o=org,
        )
        rules = [
            {"source": "person", "target": "company"},
            {"source": "company", "target": "company"},
        ]
        await publish_template(engine, release(doc, relationship_types__0__rules=rules))
        await upgrade(engine, owner)
        pairs = await rows(
            engine,
            """SELECT s.slug AS source, g.slug AS target FROM entity_relationship_type_rules r
               JOIN entity_relationship_types t ON t.id = r.relationship_type_id
               JOIN entity_types s ON s.id = r.source_entity_type_id
               JOIN entity_types g ON g.id = r.target_entity_type_id
               WHERE t.organization_id = :o AND t.slug = 'employed_by' ORDER BY 1, 2""",
            o=org,
        )
        assert [(p.source, p.target) for p in pairs] == [
            ("company", "company"),
            ("person", "company"),
            ("person", "person"),
        ]

    async def test_watcher_versions_append_the_merged_content_and_rollback_merges_too(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, first = installed
        org = first.organization.id
        # The org writes its own prompt as a new version of the managed watcher.
        await execute(
            engine,
            """WITH w AS (SELECT id FROM watchers WHERE organization_id = :o AND slug = 'inbox'),
               v AS (INSERT INTO watcher_versions (organization_id, watcher_id, version, name,
                         prompt, extraction_schema, sources_schema, reactions_guidance)
                     SELECT :o, w.id, 2, 'Inbox', 'My prompt', '{"type": "object"}',
                            '{"type": "object"}', 'Link people to companies.' FROM w
                     RETURNING id, watcher_id)
               UPDATE watchers SET current_version_id = v.id FROM v WHERE watchers.id = v.watcher_id""",
            o=org,
        )
        await publish_template(engine, release(doc, watchers__0__description="Reads the inbox"))
        await upgrade(engine, owner)
        versions = await rows(
            engine,
            """SELECT v.version, v.prompt, w.current_version_id = v.id AS current, w.description
               FROM watcher_versions v JOIN watchers w ON w.id = v.watcher_id
               WHERE w.organization_id = :o ORDER BY v.version""",
            o=org,
        )
        # Only the description changed (a row field): no new version; the prompt stays the org's.
        assert [(v.version, v.prompt, v.current) for v in versions] == [
            (1, "Find people and companies.", False),
            (2, "My prompt", True),
        ]
        assert versions[0].description == "Reads the inbox"

        await publish_template(
            engine,
            release(
                doc,
                watchers__0__description="Reads the inbox",
                watchers__0__reactions_guidance="v3",
            ),
        )
        await upgrade(engine, owner)
        latest = await rows(
            engine,
            """SELECT v.version, v.prompt, v.reactions_guidance FROM watcher_versions v
               JOIN watchers w ON w.current_version_id = v.id WHERE w.organization_id = :o""",
            o=org,
        )
        assert [(v.version, v.prompt, v.reactions_guidance) for v in latest] == [
            (3, "My prompt", "v3")
        ]
        # Rolling back to release 1 goes through the same merge: the org's prompt stays.
        back = await upgrade(engine, owner, version=1)
        assert back.action == "rollback"
        latest = await rows(
            engine,
            """SELECT v.version, v.prompt, v.reactions_guidance, w.description
               FROM watcher_versions v JOIN watchers w ON w.current_version_id = v.id
               WHERE w.organization_id = :o""",
            o=org,
        )
        assert [(v.version, v.prompt, v.reactions_guidance, v.description) for v in latest] == [
            (4, "My prompt", "Link people to companies.", None)
        ]

    async def test_an_item_archived_by_the_org_that_the_release_changes_conflicts(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, first = installed
        org = first.organization.id
        await execute(
            engine,
            "UPDATE entity_types SET status = 'archived' WHERE organization_id = :o "
            "AND slug = 'person'",
            o=org,
        )
        await publish_template(engine, release(doc, entity_types__0__name="Human"))
        with pytest.raises(InstallConflict) as info:
            await upgrade(engine, owner)
        assert info.value.conflicts[0]["fields"] == [""]
        take = Resolution(kind="entity_types", slug="person", take="template")
        await upgrade(engine, owner, resolutions=[take])
        row = await person(engine, org)
        assert (row.status, row.name) == ("active", "Human")


class TestPolicies:
    async def test_tenant_field_keeps_the_org_value_and_template_field_always_wins(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc(policies={"entity_types": {"icon": "tenant", "color": "template"}})
        await publish_template(engine, doc)
        first = await upgrade(engine, owner)
        org = first.organization.id
        await execute(
            engine,
            """UPDATE entity_types SET icon = 'my-icon', color = '#000000'
               WHERE organization_id = :o AND slug = 'company'""",
            o=org,
        )
        # The release changes the icon (tenant: the org's stays) and only the name otherwise;
        # the org's color is a template field: overwritten at this upgrade.
        await publish_template(
            engine, release(doc, entity_types__1__icon="factory", entity_types__1__name="Firm")
        )
        result = await upgrade(engine, owner)
        [row] = await rows(
            engine,
            "SELECT * FROM entity_types WHERE organization_id = :o AND slug = 'company'",
            o=org,
        )
        assert (row.name, row.icon, row.color) == ("Firm", "my-icon", "#123456")
        assert [(o.path, o.local) for o in result.overwritten or []] == [("/color", "#000000")]

    async def test_a_template_field_is_restored_at_an_upgrade_that_leaves_its_item_alone(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc(policies={"entity_types": {"color": "template"}})
        await publish_template(engine, doc)
        first = await upgrade(engine, owner)
        org = first.organization.id
        await execute(
            engine,
            "UPDATE entity_types SET color = '#000000' WHERE organization_id = :o "
            "AND slug = 'company'",
            o=org,
        )
        # Re-installing the same release leaves the edit (a no-op writes nothing) ...
        assert (await upgrade(engine, owner)).action == "none"
        # ... the next release, which changes only the watcher, takes it back.
        await publish_template(engine, release(doc, watchers__0__prompt="v2"))
        result = await upgrade(engine, owner)
        assert (
            await scalar(
                engine,
                "SELECT color FROM entity_types WHERE organization_id = :o AND slug = 'company'",
                o=org,
            )
            == "#123456"
        )
        assert [(o.slug, o.path, o.local) for o in result.overwritten or []] == [
            ("company", "/color", "#000000")
        ]

    async def test_watcher_schedule_is_tenant_by_default(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, first = installed
        org = first.organization.id
        await execute(
            engine,
            "UPDATE watchers SET schedule = '0 * * * *' WHERE organization_id = :o",
            o=org,
        )
        await publish_template(engine, release(doc, watchers__0__schedule="*/5 * * * *"))
        await upgrade(engine, owner)
        assert (
            await scalar(engine, "SELECT schedule FROM watchers WHERE organization_id = :o", o=org)
            == "0 * * * *"
        )

    async def test_a_change_of_policies_alone_cuts_a_release_items_unchanged(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, _first = installed
        hashes = "SELECT content_hash FROM template_release_items ORDER BY kind, slug"
        before = [r.content_hash for r in await rows(engine, hashes)]
        doc["entity_types"][0]["policies"] = {"name": "tenant"}
        published = await publish_template(engine, doc)
        assert (published.created, published.version) == (True, 2)
        items = await rows(
            engine,
            """SELECT i.kind, i.slug, i.content_hash, i.policies FROM template_release_items i
               WHERE i.release_id = :r ORDER BY i.kind, i.slug""",
            r=published.release_id,
        )
        assert sorted(i.content_hash for i in items) == sorted(before)
        policies = {(i.kind, i.slug): i.policies for i in items}
        assert policies[("entity_types", "person")] == {"name": "tenant"}
        assert policies[("watchers", "inbox")] == {"schedule": "tenant"}
        result = await upgrade(engine, owner)
        assert result.changes["entity_types"].updated == 0

    async def test_policies_on_unknown_fields_are_listed_and_refused(
        self, engine: AsyncEngine
    ) -> None:
        from install_service.errors import TemplateDocumentInvalid
        from install_service.templates.documents import parse

        doc = small_doc(policies={"watchers": {"slug": "tenant", "nope": "template"}})
        doc["entity_types"][0]["policies"] = {"prompt": "tenant"}
        with pytest.raises(TemplateDocumentInvalid) as info:
            parse(doc)
        assert sorted(p["path"] for p in info.value.problems) == [
            "$.entity_types[0].policies.prompt",
            "$.policies.watchers.nope",
            "$.policies.watchers.slug",
        ]


class TestForce:
    async def test_force_takes_the_template_at_conflicts_but_not_over_tenant_fields(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc(policies={"entity_types": {"icon": "tenant"}})
        await publish_template(engine, doc)
        first = await upgrade(engine, owner)
        org = first.organization.id
        await execute(
            engine,
            """UPDATE entity_types SET name = 'Mine', icon = 'my-icon'
               WHERE organization_id = :o AND slug = 'person'""",
            o=org,
        )
        await publish_template(
            engine, release(doc, entity_types__0__name="Human", entity_types__0__icon="new")
        )
        result = await upgrade(engine, owner, force=True)
        row = await person(engine, org)
        assert (row.name, row.icon) == ("Human", "my-icon")
        [item] = [i for i in result.items or [] if i.slug == "person"]
        assert item.reason == "forced"


class TestAdopt:
    async def test_adopting_an_org_row_keeps_its_previous_content_in_history(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc(policies={"entity_types": {"icon": "tenant"}})
        await publish_template(engine, doc)
        org = await scalar(
            engine, "SELECT id FROM organizations WHERE personal_owner_id = :u", u=owner.user_id
        )
        await execute(
            engine,
            """INSERT INTO entity_types (organization_id, slug, name, icon)
               VALUES (:o, 'person', 'Our person', 'our-icon')""",
            o=org,
        )
        with pytest.raises(InstallConflict):
            await upgrade(engine, owner)
        result = await upgrade(engine, owner, adopt=[ItemRef(kind="entity_types", slug="person")])
        assert result.changes["entity_types"].adopted == 1
        row = await person(engine, org)
        assert (row.name, row.icon, row.managed_by_template_agent_id is not None) == (
            "Person",
            "our-icon",
            True,
        )
        [changes] = await history_changes(engine, result.id)
        [adopted] = changes["adopted"]
        assert adopted["previous"]["name"] == "Our person"

    async def test_adopting_a_watcher_keeps_its_old_content_as_an_older_version(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        org = await scalar(
            engine, "SELECT id FROM organizations WHERE personal_owner_id = :u", u=owner.user_id
        )
        await execute(
            engine,
            """WITH w AS (INSERT INTO watchers (organization_id, slug, name)
                          VALUES (:o, 'inbox', 'Ours') RETURNING id),
               v AS (INSERT INTO watcher_versions (organization_id, watcher_id, version, name,
                         prompt, extraction_schema, sources_schema)
                     SELECT :o, id, 1, 'Ours', 'Our prompt', '{}', '{}' FROM w RETURNING id)
               UPDATE watchers SET current_version_id = (SELECT id FROM v)
               WHERE id = (SELECT id FROM w)""",
            o=org,
        )
        await upgrade(engine, owner, adopt=True)
        versions = await rows(
            engine,
            """SELECT v.version, v.prompt FROM watcher_versions v JOIN watchers w
               ON w.id = v.watcher_id WHERE w.organization_id = :o ORDER BY v.version""",
            o=org,
        )
        assert [(v.version, v.prompt) for v in versions] == [
            (1, "Our prompt"),
            (2, "Find people and companies."),
        ]


class TestDetach:
    async def test_a_detached_row_is_left_alone_until_adopted(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        doc, first = installed
        org = first.organization.id
        assert first.id is not None
        async with transaction(engine) as session:
            detached = await repair.detach(
                session, owner, first.id, kind="entity_types", slug="person"
            )
        assert detached.action == "detach"
        row = await person(engine, org)
        assert row.managed_by_template_agent_id is None
        assert row.detached_from_template_agent_ids == [row.detached_from_template_agent_ids[0]]
        async with transaction(engine) as session:
            again = await repair.detach(
                session, owner, first.id, kind="entity_types", slug="person"
            )
        assert again.action == "none"
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Ours' WHERE organization_id = :o AND slug = 'person'",
            o=org,
        )

        await publish_template(engine, release(doc, entity_types__0__name="Human"))
        plan = await upgrade(engine, owner, dry_run=True)
        assert [i.action for i in plan.items or [] if i.slug == "person"] == ["detached"]
        result = await upgrade(engine, owner)
        assert result.changes["entity_types"].detached == 1
        assert (await person(engine, org)).name == "Ours"
        async with transaction(engine) as session:
            assert (await repair.drift(session, owner, first.id)).drift == []

        await upgrade(engine, owner, adopt=[ItemRef(kind="entity_types", slug="person")])
        row = await person(engine, org)
        assert (row.name, row.detached_from_template_agent_ids) == ("Human", [])

    async def test_a_row_detached_from_one_template_and_adopted_by_another_stays_the_others(
        self,
        engine: AsyncEngine,
        owner: Actor,
        installed: tuple[dict[str, Any], InstallResult],
        install_service_database_url: URL,
    ) -> None:
        """The org takes `person` over from the starter install, then hands it to another
        template that has a `person` too. The starter install leaves that slug alone from then
        on (its plans say `detached`, its drift is clean, detaching again changes nothing),
        whoever manages the row, until the starter install itself adopts it back."""
        doc, first = installed
        org = first.organization.id
        assert first.id is not None
        database_url = install_service_database_url.render_as_string(hide_password=False)
        other = {
            "slug": "other",
            "name": "Other template",
            "entity_types": [{"slug": "person", "name": "Their person"}],
        }
        await publish_template(engine, other)
        async with transaction(engine) as session:
            await repair.detach(session, owner, first.id, kind="entity_types", slug="person")
        adopted = await install_template(
            engine, owner, "other", adopt=[ItemRef(kind="entity_types", slug="person")]
        )
        assert adopted.id is not None
        agent_sql = "SELECT template_agent_id FROM agents WHERE id = :i"
        other_agent = await scalar(engine, agent_sql, i=adopted.id)
        starter_agent = await scalar(engine, agent_sql, i=first.id)
        row = await person(engine, org)
        assert (row.name, row.managed_by_template_agent_id) == ("Their person", other_agent)

        async def starter_is_consistent() -> None:
            async with transaction(engine) as session:
                assert (await repair.drift(session, owner, first.id)).drift == []
                again = await repair.detach(
                    session, owner, first.id, kind="entity_types", slug="person"
                )
                assert again.action == "none"
                reconcile = await repair.reconcile(session, owner, first.id, dry_run=True)
            assert [i.action for i in reconcile.items or [] if i.slug == "person"] in (
                [],
                ["detached"],
            )
            async with transaction(engine) as session:
                assert await invariants.check(session) == []

        await starter_is_consistent()
        await publish_template(engine, release(doc, entity_types__0__name="Human"))
        plan = await upgrade(engine, owner, dry_run=True)
        assert [i.action for i in plan.items or [] if i.slug == "person"] == ["detached"]
        # Asking the starter install to adopt a row another template manages is a conflict.
        with pytest.raises(InstallConflict) as refused:
            await upgrade(engine, owner, adopt=[ItemRef(kind="entity_types", slug="person")])
        assert [(c["slug"], c["reason"]) for c in refused.value.conflicts] == [
            ("person", "managed_by_other_template")
        ]
        await upgrade(engine, owner)
        assert (await person(engine, org)).name == "Their person"
        await starter_is_consistent()

        # The other template lets it go too: it is the org's own, detached from both.
        async with transaction(engine) as session:
            await repair.detach(session, owner, adopted.id, kind="entity_types", slug="person")
        await starter_is_consistent()
        other_plan = await install_template(engine, owner, "other", dry_run=True)
        assert [i.action for i in other_plan.items or []] == ["detached"]

        # The starter install takes it back; the other template still leaves it alone.
        await upgrade(engine, owner, adopt=[ItemRef(kind="entity_types", slug="person")])
        row = await person(engine, org)
        assert (row.name, row.managed_by_template_agent_id) == ("Human", starter_agent)
        other_plan = await install_template(engine, owner, "other", dry_run=True)
        assert [i.action for i in other_plan.items or []] == ["detached"]
        async with transaction(engine) as session:
            assert (await repair.drift(session, owner, adopted.id)).drift == []
        # And the operator's own check says so.
        checked = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "install_service",
            "db",
            "check",
            env={**os.environ, "INSTALL_SERVICE_DATABASE_URL": database_url},
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await checked.communicate()
        assert checked.returncode == 0, out

    async def test_a_row_detached_from_one_template_is_not_detached_from_another(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        """Two templates share the slug `person`. The org detaches it from the starter
        install: to the other template it is simply the org's own row, a conflict to adopt,
        never an item to leave alone."""
        _doc, first = installed
        assert first.id is not None
        await publish_template(
            engine,
            {"slug": "other", "name": "Other", "entity_types": [{"slug": "person", "name": "P"}]},
        )
        async with transaction(engine) as session:
            await repair.detach(session, owner, first.id, kind="entity_types", slug="person")
        plan = await install_template(engine, owner, "other", dry_run=True)
        assert [(i.slug, i.action, i.reason) for i in plan.items or []] == [
            ("person", "conflict", "user_authored")
        ]
        with pytest.raises(InstallConflict) as refused:
            await install_template(engine, owner, "other")
        assert [(c["slug"], c["reason"]) for c in refused.value.conflicts] == [
            ("person", "user_authored")
        ]
        assert await scalar(engine, "SELECT count(*) FROM agents WHERE slug = 'other' "
                            "AND template_agent_id IS NOT NULL") == 0  # fmt: skip

    async def test_detaching_what_the_install_does_not_manage_is_not_found(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        _doc, first = installed
        assert first.id is not None
        with pytest.raises(NotFound):
            async with transaction(engine) as session:
                await repair.detach(session, owner, first.id, kind="watchers", slug="nope")


class TestRebase:
    async def test_a_rebase_takes_the_base_of_its_own_kind_when_kinds_share_a_slug(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        """An entity type and a watcher share a slug; the org keeps its own edit of each
        against the next release (`take: local`): both rows stay as they are and each records,
        as its new base, the release item of its own kind."""
        watcher = {
            "slug": "shared",
            "name": "Shared watcher",
            "schedule": "0 * * * *",
            "prompt": "Look.",
            "extraction_schema": {"type": "object"},
            "sources_schema": {"type": "object"},
            "reactions_guidance": "",
        }
        doc = {
            "slug": "starter",
            "name": "Starter",
            "entity_types": [{"slug": "shared", "name": "Shared"}],
            "watchers": [watcher],
        }
        await publish_template(engine, doc)
        first = await upgrade(engine, owner)
        assert first.id is not None
        org = first.organization.id
        await execute(
            engine, "UPDATE entity_types SET name = 'Mine' WHERE organization_id = :o", o=org
        )
        await execute(
            engine, "UPDATE watchers SET description = 'Ours' WHERE organization_id = :o", o=org
        )
        await publish_template(
            engine,
            {
                **doc,
                "entity_types": [{"slug": "shared", "name": "Theirs"}],
                "watchers": [{**watcher, "description": "Theirs"}],
            },
        )
        keep = [
            Resolution(kind=kind, slug="shared", take="local")
            for kind in ("entity_types", "watchers")
        ]
        plan = await upgrade(engine, owner, dry_run=True, resolutions=keep)
        assert [(i.kind, i.action) for i in plan.items or []] == [
            ("entity_types", "unchanged"),
            ("watchers", "unchanged"),
        ]
        assert (await upgrade(engine, owner, resolutions=keep)).version == 2
        bases = await rows(
            engine,
            """SELECT t.kind, t.content_kept, t.mirrored_hash = i.content_hash AS own_base
               FROM (SELECT 'entity_types' AS kind, name = 'Mine' AS content_kept,
                            mirrored_hash, mirrored_release_id
                     FROM entity_types WHERE organization_id = :o
                     UNION ALL
                     SELECT 'watchers', description = 'Ours', mirrored_hash, mirrored_release_id
                     FROM watchers WHERE organization_id = :o) t
               JOIN template_releases r ON r.id = t.mirrored_release_id AND r.version = 2
               JOIN template_release_items i ON i.release_id = r.id
                                            AND i.kind = t.kind AND i.slug = 'shared'
               ORDER BY 1""",
            o=org,
        )
        assert [tuple(b) for b in bases] == [("entity_types", True, True), ("watchers", True, True)]
        # Based on their own items, the kept edits show as drift of exactly their own paths.
        async with transaction(engine) as session:
            drift = (await repair.drift(session, owner, first.id)).drift
        assert [(d.kind, [f.path for f in d.fields]) for d in drift] == [
            ("entity_types", ["/name"]),
            ("watchers", ["/description"]),
        ]


class TestReconcile:
    async def test_drift_is_repaired_tenant_fields_stay_and_overwrites_are_listed(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc(policies={"entity_types": {"icon": "tenant"}})
        await publish_template(engine, doc)
        first = await upgrade(engine, owner)
        assert first.id is not None
        org = first.organization.id
        await execute(
            engine,
            """UPDATE entity_types SET name = 'Mine', icon = 'my-icon'
               WHERE organization_id = :o AND slug = 'person'""",
            o=org,
        )
        await execute(
            engine, "UPDATE watchers SET status = 'archived' WHERE organization_id = :o", o=org
        )
        # A rule re-pointed at another org's entity type, by hand.
        other, _, _ = await make_user(engine)
        await upgrade(engine, other)
        await execute(
            engine,
            """UPDATE entity_relationship_type_rules r SET target_entity_type_id = (
                   SELECT e.id FROM entity_types e WHERE e.slug = 'company'
                     AND e.organization_id <> :o LIMIT 1)
               FROM entity_relationship_types t
               WHERE t.id = r.relationship_type_id AND t.organization_id = :o
                 AND t.slug = 'employed_by'""",
            o=org,
        )
        before = await dump(engine)
        async with transaction(engine) as session:
            planned = await repair.reconcile(session, owner, first.id, dry_run=True)
        assert await dump(engine) == before
        assert sorted(
            (i.kind, i.slug, i.action) for i in planned.items or [] if i.action != "unchanged"
        ) == [
            ("entity_types", "person", "update"),
            ("relationship_types", "employed_by", "update"),
            ("watchers", "inbox", "update"),
        ]

        async with transaction(engine) as session:
            done = await repair.reconcile(session, owner, first.id)
        assert done.action == "reconcile"
        assert ("entity_types", "person", "/name", "Mine") in [
            (o.kind, o.slug, o.path, o.local) for o in done.overwritten or []
        ]
        row = await person(engine, org)
        assert (row.name, row.icon) == ("Person", "my-icon")
        assert (
            await scalar(engine, "SELECT status FROM watchers WHERE organization_id = :o", o=org)
            == "active"
        )
        async with transaction(engine) as session:
            drift = await repair.drift(session, owner, first.id)
        assert [(d.slug, [f.path for f in d.fields]) for d in drift.drift] == [
            ("person", ["/icon"])
        ]
        [*_, last] = await history_changes(engine, first.id)
        assert {"kind": "entity_types", "slug": "person", "path": "/name", "local": "Mine"} in last[
            "overwritten"
        ]
        # Nothing left to repair: a no-op.
        async with transaction(engine) as session:
            again = await repair.reconcile(session, owner, first.id)
        assert again.action == "none"

    async def test_a_deleted_managed_row_comes_back(
        self, engine: AsyncEngine, owner: Actor, installed: tuple[dict[str, Any], InstallResult]
    ) -> None:
        _doc, first = installed
        assert first.id is not None
        org = first.organization.id
        await execute(
            engine,
            """DELETE FROM entity_relationship_type_rules r USING entity_relationship_types t
               WHERE t.id = r.relationship_type_id AND t.organization_id = :o AND t.slug = 'knows'""",
            o=org,
        )
        await execute(
            engine,
            "DELETE FROM entity_relationship_types WHERE organization_id = :o AND slug = 'knows'",
            o=org,
        )
        async with transaction(engine) as session:
            done = await repair.reconcile(session, owner, first.id)
        assert done.changes["relationship_types"].created == 1
        assert (
            await scalar(
                engine,
                "SELECT count(*) FROM entity_relationship_types WHERE organization_id = :o "
                "AND slug = 'knows' AND managed_by_template_agent_id IS NOT NULL",
                o=org,
            )
            == 1
        )


class TestReleaseDiff:
    async def test_items_and_paths_between_two_releases(
        self, engine: AsyncEngine, install_service_client: AsyncTestClient[Litestar]
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        new = release(doc, entity_types__0__name="Human")
        new["entity_types"][0]["metadata_schema"]["properties"]["a/b~c"] = {"type": "string"}
        new["watchers"] = []
        new["classifiers"][0]["watcher"] = None
        await publish_template(engine, new)
        response = await install_service_client.get("/api/v1/templates/starter/releases/1/diff/2")
        assert response.status_code == 200
        body = response.json()
        assert (body["from"], body["to"]) == (1, 2)
        summary = [
            (i["kind"], i["slug"], i["change"], [p["path"] for p in i["paths"]])
            for i in body["items"]
        ]
        assert summary == [
            (
                "entity_types",
                "person",
                "changed",
                ["/metadata_schema/properties/a~1b~0c", "/name"],
            ),
            ("classifiers", "seniority", "changed", ["/watcher"]),
            ("watchers", "inbox", "removed", [""]),
        ]
        name = body["items"][0]["paths"][1]
        assert (name["old"], name["new"]) == ("Person", "Human")
        assert body["template_paths"] == []
        missing = await install_service_client.get("/api/v1/templates/starter/releases/1/diff/9")
        assert missing.status_code == 404

    async def test_a_release_that_changes_only_the_template_itself(
        self, engine: AsyncEngine, install_service_client: AsyncTestClient[Litestar]
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        await publish_template(
            engine, {**doc, "name": "Renamed", "policies": {"entity_types": {"icon": "tenant"}}}
        )
        body = (
            await install_service_client.get("/api/v1/templates/starter/releases/1/diff/2")
        ).json()
        assert body["items"] == []
        assert body["template_paths"] == [
            {"path": "/name", "old": "Starter template", "new": "Renamed"},
            {"path": "/policies", "old": None, "new": {"entity_types": {"icon": "tenant"}}},
        ]


class TestOverHttp:
    async def test_resolutions_and_adopt_through_the_api(
        self, engine: AsyncEngine, install_service_client: AsyncTestClient[Litestar]
    ) -> None:
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN)
        doc = small_doc()
        await publish_template(engine, doc)
        _, user, token = await make_user(engine)
        client = install_service_client
        created = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
        )
        install_id = created.json()["id"]
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Mine' WHERE organization_id = :o AND slug = 'person'",
            o=user.personal_organization.id,
        )
        await publish_template(engine, release(doc, entity_types__0__name="Human"))
        conflict = await client.post(
            f"/api/v1/installs/{install_id}/upgrade", json={}, headers=bearer(token)
        )
        assert conflict.status_code == 409
        assert conflict.json()["conflicts"] == [
            {
                "kind": "entity_types",
                "slug": "person",
                "reason": "locally_modified",
                "fields": ["/name"],
            }
        ]
        bad = await client.post(
            f"/api/v1/installs/{install_id}/upgrade",
            json={
                "resolutions": [
                    {"kind": "entity_types", "slug": "person", "path": "name", "take": "local"}
                ]
            },
            headers=bearer(token),
        )
        assert bad.status_code == 400  # a path is a JSON Pointer
        ok = await client.post(
            f"/api/v1/installs/{install_id}/upgrade",
            json={
                "resolutions": [
                    {"kind": "entity_types", "slug": "person", "path": "/name", "take": "local"}
                ]
            },
            headers=bearer(token),
        )
        assert ok.status_code == 200, ok.text
        drift = await client.get(f"/api/v1/installs/{install_id}/drift", headers=bearer(token))
        assert drift.json()["drift"][0]["fields"] == [
            {"path": "/name", "mirrored": "Human", "current": "Mine"}
        ]
        reconciled = await client.post(
            f"/api/v1/installs/{install_id}/reconcile", json={}, headers=bearer(token)
        )
        assert reconciled.json()["overwritten"] == [
            {"kind": "entity_types", "slug": "person", "path": "/name", "local": "Mine"}
        ]
        detached = await client.post(
            f"/api/v1/installs/{install_id}/detach",
            json={"kind": "watchers", "slug": "inbox"},
            headers=bearer(token),
        )
        assert (detached.status_code, detached.json()["action"]) == (200, "detach")


Outcomes = dict[Any, tuple[bool, list[dict[str, Any]]]]


async def fleet_and_alone(engine: AsyncEngine, actor: Actor) -> tuple[Outcomes, Outcomes]:
    """Every install of starter's latest release planned at once (`plan_many`), and each
    planned alone: per org, whether it writes, and its conflicts."""
    async with transaction(engine) as session:
        latest = await get_release(session, actor, "starter")
        installed = await rows(
            engine,
            """SELECT organization_id, installed_release_id, status = 'active' AS active
               FROM agents WHERE template_agent_id = :t""",
            t=latest["template_agent_id"],
        )
        scope = [(i.organization_id, i.installed_release_id, i.active) for i in installed]
        fleet = await install_engine.plan_many(
            session, latest["id"], latest["template_agent_id"], scope
        )
        alone: Outcomes = {}
        for org, prev, active in scope:
            target = install_engine.Target(
                organization_id=org,
                release_id=latest["id"],
                owner=latest["template_agent_id"],
                agent_id=None,
                previous_release_id=prev,
                install_active=active,
            )
            planned = await install_engine.plan(session, target)
            try:
                planned.raise_conflicts()
                conflicts: list[dict[str, Any]] = []
            except InstallConflict as exc:
                conflicts = exc.conflicts
            alone[org] = (planned.writes, conflicts)
    return {org: (org in fleet.writing, fleet.conflicts.get(org, [])) for org, _, _ in scope}, alone


class TestFleetPlan:
    async def test_many_installs_planned_at_once_equal_each_planned_alone(
        self, engine: AsyncEngine
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        actors = [(await make_user(engine))[0] for _ in range(6)]
        results = [await upgrade(engine, actor) for actor in actors]
        orgs = [r.organization.id for r in results]
        await execute(
            engine, "UPDATE entity_types SET icon = 'x' WHERE organization_id = :o", o=orgs[1]
        )
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Mine' WHERE organization_id = :o AND slug = 'person'",
            o=orgs[2],
        )
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'project', 'P')",
            o=orgs[3],
        )
        async with transaction(engine) as session:
            assert results[4].id is not None
            await installs.uninstall(session, actors[4], results[4].id)
        new = release(doc, entity_types__0__name="Human")
        new["entity_types"].append({"slug": "project", "name": "Project"})
        await publish_template(engine, new)
        await upgrade(engine, actors[5])

        fleet, alone = await fleet_and_alone(engine, actors[0])
        assert fleet == alone
        assert alone[orgs[0]] == (True, [])
        assert alone[orgs[1]] == (True, [])
        assert alone[orgs[2]][1][0]["fields"] == ["/name"]
        assert alone[orgs[3]][1][0]["reason"] == "user_authored"
        assert alone[orgs[5]] == (False, [])

    async def test_a_release_that_only_enforces_a_template_field_plans_alike(
        self, engine: AsyncEngine
    ) -> None:
        """The fleet plan leaves out rows that can only stay as they are; a row whose
        `template` field the next release enforces is not one of them."""
        doc = small_doc(policies={"entity_types": {"color": "template"}})
        await publish_template(engine, doc)
        actors = [(await make_user(engine))[0] for _ in range(2)]
        results = [await upgrade(engine, actor) for actor in actors]
        await execute(
            engine,
            "UPDATE entity_types SET color = '#000000' WHERE organization_id = :o "
            "AND slug = 'company'",
            o=results[0].organization.id,
        )
        # Only policies change: the same items, a new release.
        await publish_template(
            engine, small_doc(policies={"entity_types": {"color": "template", "icon": "tenant"}})
        )
        fleet, alone = await fleet_and_alone(engine, actors[0])
        assert fleet == alone
        assert alone[results[0].organization.id] == (True, [])
        assert alone[results[1].organization.id] == (False, [])
