"""The install engine against real PostgreSQL: every outcome asserted in the database."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service import engine as engine_module
from install_service.actor import Actor
from install_service.db.engine import create_engine
from install_service.db.session import transaction
from install_service.errors import Forbidden, InstallConflict, Invalid, NotFound
from install_service.installs import repair
from install_service.installs import service as installs
from install_service.installs.schemas import Resolution
from install_service.installs.service import InstallResult
from install_service.orgs.service import add_member
from install_service.testing import make_org, make_user, publish_template
from tests.conftest import TEMPLATES, dump, execute, rows, scalar, scaled_doc, small_doc

MIRRORED = ("entity_types", "entity_relationship_types", "event_classifiers", "watchers")


async def install(engine: AsyncEngine, actor: Actor, **kw: Any) -> InstallResult:
    kw.setdefault("template", "starter")
    async with transaction(engine) as session:
        return await installs.install(session, actor, **kw)


async def org_of(engine: AsyncEngine, result: InstallResult) -> uuid.UUID:
    return result.organization.id


async def watcher_versions(engine: AsyncEngine, org: uuid.UUID, slug: str) -> list[Any]:
    return await rows(
        engine,
        """SELECT v.version, v.prompt, v.id, v.xmin::text AS xmin, w.current_version_id = v.id
                  AS is_current
           FROM watcher_versions v JOIN watchers w ON w.id = v.watcher_id
           WHERE w.organization_id = :org AND w.slug = :slug ORDER BY v.version""",
        org=org,
        slug=slug,
    )


def changed(doc: dict[str, Any], **edits: Any) -> dict[str, Any]:
    new = copy.deepcopy(doc)
    for path, value in edits.items():
        kind, index, field = path.split("__")
        new[kind][int(index)][field] = value
    return new


class TestFirstInstall:
    async def test_mirrors_every_row_with_provenance(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        published = await publish_template(engine, small_doc())
        result = await install(engine, owner)

        assert result.created
        assert result.action == "install"
        assert result.version == 1
        org = result.organization.id
        template_org = await scalar(engine, "SELECT id FROM organizations WHERE slug='starter'")
        template_agent = await scalar(
            engine,
            "SELECT id FROM agents WHERE organization_id = :o AND is_template",
            o=template_org,
        )
        for table in MIRRORED:
            mirrored = await rows(
                engine, f"SELECT * FROM {table} WHERE organization_id = :o", o=org
            )
            source = await rows(
                engine, f"SELECT id, slug FROM {table} WHERE organization_id = :o", o=template_org
            )
            assert len(mirrored) == len(source) > 0
            source_ids = {r.slug: r.id for r in source}
            for row in mirrored:
                assert row.managed_by_template_agent_id == template_agent
                assert row.source_template_org_id == template_org
                assert row.source_row_id == source_ids[row.slug]
                assert row.mirrored_release_id == published.release_id
                assert row.mirrored_at is not None
                assert len(row.mirrored_hash) == 64
                assert row.status == "active"
        watcher = (await rows(engine, "SELECT * FROM watchers WHERE organization_id=:o", o=org))[0]
        assert watcher.agent_id == result.id
        assert watcher.current_version_id is not None

    async def test_every_reference_points_at_the_target_org(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        result = await install(engine, owner)
        org = result.organization.id

        foreign = await rows(
            engine,
            """
            SELECT 'rule' FROM entity_relationship_type_rules r
              JOIN entity_relationship_types t ON t.id = r.relationship_type_id
              JOIN entity_types s ON s.id = r.source_entity_type_id
              JOIN entity_types g ON g.id = r.target_entity_type_id
             WHERE t.organization_id = :o
               AND (r.organization_id <> :o OR s.organization_id <> :o OR g.organization_id <> :o)
            UNION ALL
            SELECT 'inverse' FROM entity_relationship_types t
              JOIN entity_relationship_types i ON i.id = t.inverse_type_id
             WHERE t.organization_id = :o AND i.organization_id <> :o
            UNION ALL
            SELECT 'classifier' FROM event_classifiers c
              LEFT JOIN entity_types e ON e.id = c.entity_type_id
              LEFT JOIN watchers w ON w.id = c.watcher_id
              JOIN event_classifier_versions v ON v.id = c.current_version_id
             WHERE c.organization_id = :o
               AND (e.organization_id <> :o OR w.organization_id <> :o OR v.organization_id <> :o
                    OR v.classifier_id <> c.id)
            UNION ALL
            SELECT 'watcher' FROM watchers w
              JOIN watcher_versions v ON v.id = w.current_version_id
              JOIN agents a ON a.id = w.agent_id
             WHERE w.organization_id = :o
               AND (v.organization_id <> :o OR v.watcher_id <> w.id OR a.organization_id <> :o)
            """,
            o=org,
        )
        assert foreign == []
        # And nothing was dropped: every reference is set where the template sets it.
        counts = (
            await rows(
                engine,
                """SELECT
                (SELECT count(*) FROM entity_relationship_type_rules WHERE organization_id = :o),
                (SELECT count(*) FROM entity_relationship_types
                  WHERE organization_id = :o AND inverse_type_id IS NOT NULL),
                (SELECT count(*) FROM event_classifiers WHERE organization_id = :o
                  AND entity_type_id IS NOT NULL AND watcher_id IS NOT NULL)""",
                o=org,
            )
        )[0]
        assert tuple(counts) == (3, 2, 1)

    async def test_personal_finance_rules_point_at_own_entity_types(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        # Its rules name business-core's company too: the org's own row, once installed.
        await publish_template(engine, TEMPLATES / "business-core")
        await publish_template(engine, TEMPLATES / "personal-finance")
        result = await install(engine, owner, template="personal-finance", with_requirements=True)
        org = result.organization.id
        total, own = (
            await rows(
                engine,
                """SELECT count(*), count(*) FILTER (WHERE s.organization_id = :o
                                                     AND g.organization_id = :o)
                   FROM entity_relationship_type_rules r
                   JOIN entity_relationship_types t ON t.id = r.relationship_type_id
                   JOIN entity_types s ON s.id = r.source_entity_type_id
                   JOIN entity_types g ON g.id = r.target_entity_type_id
                   WHERE t.organization_id = :o""",
                o=org,
            )
        )[0]
        template_rules = await scalar(
            engine,
            """SELECT count(*) FROM entity_relationship_type_rules r
               JOIN organizations o ON o.id = r.organization_id WHERE o.slug = 'personal-finance'""",
        )
        assert total == own == template_rules > 0


class TestIdempotency:
    async def test_reinstall_of_same_release_writes_nothing(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        before = await dump(engine)

        async with transaction(engine) as session:
            again = await installs.install(session, owner, template="starter")
            xid = (await session.execute(text("SELECT txid_current_if_assigned()"))).scalar()

        assert xid is None  # no transaction id: nothing at all was written
        assert again.id == first.id
        assert not again.created
        assert again.action == "none"
        assert await dump(engine) == before

    async def test_twenty_concurrent_identical_installs_make_one(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        results = await asyncio.gather(*(install(engine, owner) for _ in range(20)))

        assert sum(r.created for r in results) == 1
        assert len({r.id for r in results}) == 1
        org = results[0].organization.id
        assert (
            await scalar(engine, "SELECT count(*) FROM agents WHERE organization_id = :o", o=org)
            == 1
        )
        assert (
            await scalar(
                engine, "SELECT count(*) FROM entity_types WHERE organization_id = :o", o=org
            )
            == 2
        )
        assert (
            await scalar(
                engine, "SELECT count(*) FROM watcher_versions WHERE organization_id = :o", o=org
            )
            == 1
        )
        assert (
            await scalar(
                engine, "SELECT count(*) FROM install_events WHERE organization_id = :o", o=org
            )
            == 1
        )

    async def test_twenty_concurrent_installs_into_twenty_orgs(self, engine: AsyncEngine) -> None:
        await publish_template(engine, small_doc())
        actors = [(await make_user(engine))[0] for _ in range(20)]
        results = await asyncio.gather(*(install(engine, a) for a in actors))

        assert all(r.created for r in results)
        assert len({r.organization.id for r in results}) == 20
        per_org = await rows(
            engine,
            """SELECT organization_id, count(*) FROM entity_types
               WHERE managed_by_template_agent_id IS NOT NULL GROUP BY 1""",
        )
        assert sorted(n for _, n in per_org) == [2] * 20

    async def test_reinstall_after_an_upgrade_that_dropped_an_item_writes_nothing(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        first = await install(engine, owner)
        without_knows = copy.deepcopy(doc)
        without_knows["relationship_types"] = doc["relationship_types"][:2]
        await publish_template(engine, without_knows)
        upgraded = await install(engine, owner)
        assert upgraded.changes["relationship_types"].archived == 1
        before = await dump(engine)

        again = await install(engine, owner)

        assert (again.id, again.created, again.action) == (first.id, False, "none")
        assert sum(c.archived for c in again.changes.values()) == 0
        # Planned (a dry run), the row the release dropped is neither archived again nor
        # counted: the release has two relationship types, and both are unchanged.
        planned = await install(engine, owner, dry_run=True)
        assert planned.action == "none"
        counts = planned.changes["relationship_types"]
        assert (counts.unchanged, counts.archived, counts.updated) == (2, 0, 0)
        assert [i.slug for i in planned.items or [] if i.kind == "relationship_types"] == [
            r["slug"] for r in without_knows["relationship_types"]
        ]
        assert await dump(engine) == before  # no history event, no row touched
        assert (
            await scalar(
                engine, "SELECT count(*) FROM install_events WHERE install_id = :i", i=first.id
            )
            == 2
        )


class TestNoopWithoutPlan:
    """Re-installing the installed release is decided without a plan only when the release
    still matches every row it mirrors; any other state is planned, and repaired."""

    async def test_noop_takes_one_statement_after_the_first(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        statements: list[str] = []

        def record(*args: Any) -> None:
            statements.append(args[2])

        event.listen(engine.sync_engine, "before_cursor_execute", record)
        try:
            again = await install(engine, owner)
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", record)

        assert (again.id, again.action) == (first.id, "none")
        assert len(statements) == 1
        assert sum(c.unchanged for c in again.changes.values()) == sum(
            c.created for c in first.changes.values()
        )

    async def test_noop_is_answered_by_one_statement_outside_a_transaction(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        answered = await install(engine, owner)
        before = await dump(engine)
        seen: list[tuple[str, Any]] = []

        def statement(conn: Any, *args: Any) -> None:
            seen.append(("statement", conn.get_execution_options().get("isolation_level")))

        def began(conn: Any) -> None:
            seen.append(("begin", conn.get_execution_options().get("isolation_level")))

        event.listen(engine.sync_engine, "before_cursor_execute", statement)
        event.listen(engine.sync_engine, "begin", began)
        try:
            noop = await installs.noop(engine, owner, template="starter")
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", statement)
            event.remove(engine.sync_engine, "begin", began)

        # One statement, on a connection that sends no BEGIN or COMMIT; the answer is the one
        # `install` gives in a transaction, and nothing was written.
        assert seen == [("begin", "AUTOCOMMIT"), ("statement", "AUTOCOMMIT")]
        assert noop == answered
        assert noop is not None
        assert (noop.id, noop.action) == (first.id, "none")
        assert await dump(engine) == before

    @pytest.mark.parametrize(
        "state",
        [
            "new org",
            "row deleted",
            "newer release",
            "uninstalled",
            "dry run",
            "pin",
            "adopt",
            "resolutions",
        ],
    )
    async def test_noop_declines_whatever_may_change_something(
        self, engine: AsyncEngine, owner: Actor, state: str
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        arguments: dict[str, Any] = {"template": "starter"}
        if state != "new org":
            first = await install(engine, owner)
            org = first.organization.id
        if state == "row deleted":
            for table in ("entity_relationship_type_rules", "entity_relationship_types"):
                await execute(engine, f"DELETE FROM {table} WHERE organization_id = :o", o=org)
        elif state == "newer release":
            await publish_template(engine, changed(doc, watchers__0__prompt="Changed."))
        elif state == "uninstalled":
            async with transaction(engine) as session:
                await installs.uninstall(session, owner, first.id)
        elif state == "dry run":
            arguments["dry_run"] = True
        elif state == "pin":
            arguments["pin"] = True
        elif state == "adopt":
            arguments["adopt"] = True
        elif state == "resolutions":
            arguments["resolutions"] = [Resolution(kind="watchers", slug="inbox", take="local")]
        before = await dump(engine)

        assert await installs.noop(engine, owner, **arguments) is None
        assert await dump(engine) == before
        # `install` then answers it, in a transaction, and it is not a bare no-op.
        result = await install(engine, owner, **arguments)
        assert result.action != "none" or state in ("dry run", "pin", "adopt", "resolutions")
        if state == "pin":
            assert await scalar(
                engine, "SELECT pinned_at IS NOT NULL FROM agents WHERE id = :i", i=result.id
            )

    async def test_an_uninstalled_empty_release_is_reinstalled(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        empty = small_doc(entity_types=[], relationship_types=[], classifiers=[], watchers=[])
        await publish_template(engine, empty)
        first = await install(engine, owner)
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, first.id)

        # Every item (there are none) is mirrored by an active row, yet it is not a no-op.
        assert await installs.noop(engine, owner, template="starter") is None
        again = await install(engine, owner)

        assert again.action == "reinstall"
        assert await scalar(engine, "SELECT status FROM agents WHERE id = :i", i=first.id) == (
            "active"
        )

    async def test_a_deleted_row_is_created_again(self, engine: AsyncEngine, owner: Actor) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        org = first.organization.id
        await execute(
            engine,
            """DELETE FROM entity_relationship_type_rules r USING entity_relationship_types t
               WHERE r.relationship_type_id = t.id AND t.organization_id = :o AND t.slug = 'knows'""",
            o=org,
        )
        await execute(
            engine,
            "DELETE FROM entity_relationship_types WHERE organization_id = :o AND slug = 'knows'",
            o=org,
        )

        again = await install(engine, owner)

        assert again.action == "reinstall"
        assert again.changes["relationship_types"].created == 1

    async def test_a_row_whose_mirrored_hash_differs_is_written_again(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        org = first.organization.id
        await execute(
            engine,
            "UPDATE entity_types SET mirrored_hash = 'stale' WHERE organization_id = :o",
            o=org,
        )

        again = await install(engine, owner)

        assert again.action == "reinstall"
        assert (
            await scalar(
                engine,
                "SELECT count(*) FROM entity_types WHERE organization_id = :o "
                "AND mirrored_hash = 'stale'",
                o=org,
            )
            == 0
        )

    async def test_a_managed_row_the_release_lacks_is_archived(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        org = first.organization.id
        await execute(
            engine,
            """INSERT INTO entity_types (organization_id, slug, name,
                                         managed_by_template_agent_id, status)
               SELECT organization_id, 'stray', 'Stray', managed_by_template_agent_id, 'active'
               FROM entity_types WHERE organization_id = :o LIMIT 1""",
            o=org,
        )

        again = await install(engine, owner)

        assert again.changes["entity_types"].archived == 1
        assert (
            await scalar(
                engine,
                "SELECT status FROM entity_types WHERE organization_id = :o AND slug = 'stray'",
                o=org,
            )
            == "archived"
        )

    async def test_a_release_with_the_installed_content_is_still_an_upgrade(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        first = await install(engine, owner)
        await publish_template(engine, changed(doc, watchers__0__prompt="Changed."))
        await publish_template(engine, doc)  # release 3: release 1's content again

        again = await install(engine, owner)

        assert (again.action, again.version) == ("upgrade", 3)
        assert (
            await scalar(
                engine,
                """SELECT r.version FROM agents a
                   JOIN template_releases r ON r.id = a.installed_release_id
                   WHERE a.id = :i""",
                i=first.id,
            )
            == 3
        )


class TestVersions:
    async def test_upgrade_appends_and_rollback_appends_old_content(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        first = await install(engine, owner)
        org = first.organization.id
        v1 = await watcher_versions(engine, org, "inbox")

        await publish_template(engine, changed(doc, watchers__0__prompt="Find people, v2."))
        upgraded = await install(engine, owner)
        assert upgraded.action == "upgrade"
        assert upgraded.version == 2
        assert upgraded.changes["watchers"].updated == 1
        v2 = await watcher_versions(engine, org, "inbox")
        assert [(r.version, r.prompt) for r in v2] == [
            (1, "Find people and companies."),
            (2, "Find people, v2."),
        ]
        assert tuple(v2[0])[:4] == tuple(v1[0])[:4]  # byte-identical, same xmin: untouched
        assert not v2[0].is_current
        assert v2[1].is_current

        rolled = await install(engine, owner, version=1)
        assert rolled.action == "rollback"
        assert rolled.version == 1
        v3 = await watcher_versions(engine, org, "inbox")
        assert [(r.version, r.prompt) for r in v3][2] == (3, "Find people and companies.")
        assert v3[2].is_current
        assert [tuple(r)[:4] for r in v3[:2]] == [tuple(r)[:4] for r in v2]

        history = await rows(
            engine,
            """SELECT e.action, f.version, t.version FROM install_events e
               LEFT JOIN template_releases f ON f.id = e.from_release_id
               JOIN template_releases t ON t.id = e.to_release_id
               WHERE e.install_id = :i ORDER BY e.created_at""",
            i=first.id,
        )
        assert [tuple(h) for h in history] == [
            ("install", None, 1),
            ("upgrade", 1, 2),
            ("rollback", 2, 1),
        ]

    async def test_upgrade_to_a_release_that_changes_no_item_moves_the_install(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        reworded = await publish_template(engine, small_doc(description="Reworded."))
        assert reworded.created

        result = await install(engine, owner)

        assert (result.action, result.version) == ("upgrade", 2)
        assert sum(c.created + c.updated + c.archived for c in result.changes.values()) == 0
        installed = await scalar(
            engine, "SELECT installed_release_id FROM agents WHERE id = :i", i=first.id
        )
        assert installed == reworded.release_id
        actions = await rows(
            engine, "SELECT action FROM install_events WHERE install_id = :i ORDER BY 1", i=first.id
        )
        assert [a for (a,) in actions] == ["install", "upgrade"]

    async def test_classifier_versions_append_the_same_way(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        org = (await install(engine, owner)).organization.id
        new_values = {"junior": "Early career", "senior": "Experienced", "lead": "Leads"}
        await publish_template(engine, changed(doc, classifiers__0__attribute_values=new_values))
        await install(engine, owner)
        await install(engine, owner, version=1)

        versions = await rows(
            engine,
            """SELECT v.version, v.attribute_values, c.current_version_id = v.id AS current
               FROM event_classifier_versions v JOIN event_classifiers c ON c.id = v.classifier_id
               WHERE c.organization_id = :o ORDER BY v.version""",
            o=org,
        )
        assert [(v.version, len(v.attribute_values), v.current) for v in versions] == [
            (1, 2, False),
            (2, 3, False),
            (3, 2, True),
        ]

    async def test_unchanged_watcher_gets_no_new_version(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        org = (await install(engine, owner)).organization.id
        await publish_template(engine, changed(doc, entity_types__0__name="Human"))
        result = await install(engine, owner)
        assert result.changes["entity_types"].updated == 1
        assert result.changes["watchers"].unchanged == 1
        assert len(await watcher_versions(engine, org, "inbox")) == 1

    async def test_database_refuses_to_rewrite_versions(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        await install(engine, owner)
        for sql in (
            "UPDATE watcher_versions SET prompt = 'rewritten'",
            "DELETE FROM watcher_versions",
            "UPDATE event_classifier_versions SET fallback_value = 'x'",
            "DELETE FROM event_classifier_versions",
            "TRUNCATE watcher_versions CASCADE",
            "UPDATE template_releases SET notes = 'x'",
        ):
            with pytest.raises(DBAPIError, match="append-only"):
                await execute(engine, sql)
        assert await scalar(engine, "SELECT count(*) FROM watcher_versions") == 2

    async def test_tenant_local_watcher_fields_survive_upgrade(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        org = (await install(engine, owner)).organization.id
        connection = uuid.uuid4()
        # The runner's own next run, and the org's connection.
        await execute(
            engine,
            """UPDATE watchers SET connection_id = :c, next_run_at = '2030-01-01T00:00:00Z'
               WHERE organization_id = :o""",
            c=connection,
            o=org,
        )
        await publish_template(engine, changed(doc, watchers__0__prompt="New prompt."))
        await install(engine, owner)
        row = (await rows(engine, "SELECT * FROM watchers WHERE organization_id = :o", o=org))[0]
        assert (row.connection_id, row.next_run_at.year) == (connection, 2030)

        # The org turns the schedule off: no next run, whatever the release's schedule.
        await execute(
            engine,
            "UPDATE watchers SET schedule_enabled = false WHERE organization_id = :o",
            o=org,
        )
        await publish_template(
            engine,
            changed(doc, watchers__0__prompt="New prompt.", watchers__0__schedule="0 * * * *"),
        )
        await install(engine, owner)
        row = (await rows(engine, "SELECT * FROM watchers WHERE organization_id = :o", o=org))[0]
        assert row.schedule == "0 * * * *"
        assert (row.schedule_enabled, row.connection_id, row.next_run_at) == (
            False,
            connection,
            None,
        )


class TestRules:
    async def test_changed_rule_endpoints_leave_exactly_the_releases_rules(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        org = (await install(engine, owner)).organization.id
        # employed_by keeps its source and changes its target; employs the other way round.
        new = changed(
            doc,
            relationship_types__0__rules=[{"source": "person", "target": "person"}],
            relationship_types__1__rules=[{"source": "person", "target": "person"}],
        )
        await publish_template(engine, new)
        result = await install(engine, owner)

        assert result.changes["relationship_types"].updated == 2
        rules = await rows(
            engine,
            """SELECT t.slug, s.slug AS source, g.slug AS target
               FROM entity_relationship_type_rules r
               JOIN entity_relationship_types t ON t.id = r.relationship_type_id
               JOIN entity_types s ON s.id = r.source_entity_type_id
               JOIN entity_types g ON g.id = r.target_entity_type_id
               WHERE r.organization_id = :o ORDER BY 1, 2, 3""",
            o=org,
        )
        assert [tuple(r) for r in rules] == [
            ("employed_by", "person", "person"),
            ("employs", "person", "person"),
            ("knows", "person", "person"),
        ]


class TestArchive:
    async def test_removed_item_is_archived_and_reactivated_on_return(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        org = (await install(engine, owner)).organization.id
        company_id = await scalar(
            engine, "SELECT id FROM entity_types WHERE organization_id=:o AND slug='company'", o=org
        )
        without = copy.deepcopy(doc)
        without["entity_types"] = [e for e in doc["entity_types"] if e["slug"] != "company"]
        without["relationship_types"] = [doc["relationship_types"][2]]
        await publish_template(engine, without)
        result = await install(engine, owner)
        assert result.changes["entity_types"].archived == 1
        assert result.changes["relationship_types"].archived == 2
        status = await scalar(engine, "SELECT status FROM entity_types WHERE id = :i", i=company_id)
        assert status == "archived"

        await publish_template(engine, doc)  # release 3 brings it back
        back = await install(engine, owner)
        assert back.changes["entity_types"].updated == 1
        assert (
            await scalar(engine, "SELECT status FROM entity_types WHERE id = :i", i=company_id)
            == "active"
        )
        assert (
            await scalar(
                engine,
                "SELECT count(*) FROM entity_types WHERE organization_id=:o AND status='active'",
                o=org,
            )
            == 2
        )


class TestConflicts:
    async def test_every_collision_in_one_error_and_nothing_written(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        other = small_doc("other")
        other["entity_types"] = [{"slug": "company", "name": "Other company"}]
        other["relationship_types"] = other["classifiers"] = other["watchers"] = []
        await publish_template(engine, other)
        await install(engine, owner, template="other")  # manages `company` in the org
        org = await scalar(
            engine,
            "SELECT organization_id FROM memberships WHERE user_id = :u",
            u=owner.user_id,
        )
        await execute(
            engine,
            """INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'person', 'Mine');
            """,
            o=org,
        )
        await execute(
            engine,
            """INSERT INTO watchers (organization_id, slug, name, status)
               VALUES (:o, 'inbox', 'Old inbox', 'archived')""",
            o=org,
        )
        before = await dump(engine)

        with pytest.raises(InstallConflict) as info:
            await install(engine, owner)

        assert sorted((c["kind"], c["slug"], c["reason"]) for c in info.value.conflicts) == [
            ("entity_types", "company", "managed_by_other_template"),
            ("entity_types", "person", "user_authored"),
            ("watchers", "inbox", "user_authored"),
        ]
        assert await dump(engine) == before

    async def test_dry_run_lists_conflicts_and_writes_nothing(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        org = await scalar(
            engine, "SELECT organization_id FROM memberships WHERE user_id=:u", u=owner.user_id
        )
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o,'person','x')",
            o=org,
        )
        before = await dump(engine)
        plan = await install(engine, owner, dry_run=True)
        assert plan.dry_run
        assert plan.id is None
        assert {(i.kind, i.slug, i.action, i.reason) for i in plan.items or []} >= {
            ("entity_types", "person", "conflict", "user_authored"),
            ("entity_types", "company", "create", None),
        }
        assert await dump(engine) == before


class TestLocalEdits:
    async def _installed_then_edited(self, engine: AsyncEngine, owner: Actor) -> tuple[Any, Any]:
        doc = small_doc()
        await publish_template(engine, doc)
        result = await install(engine, owner)
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Local name' WHERE organization_id=:o AND slug='person'",
            o=result.organization.id,
        )
        return doc, result

    async def test_edit_kept_when_release_leaves_item_alone(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc, first = await self._installed_then_edited(engine, owner)
        await publish_template(engine, changed(doc, entity_types__1__name="Firm"))
        result = await install(engine, owner)
        assert result.action == "upgrade"
        names = dict(
            await rows(
                engine,
                "SELECT slug, name FROM entity_types WHERE organization_id=:o",
                o=first.organization.id,
            )
        )
        assert names == {"person": "Local name", "company": "Firm"}
        async with transaction(engine) as session:
            drift = await repair.drift(session, owner, first.id)
        assert [(d.kind, d.slug, d.drift) for d in drift.drift] == [
            ("entity_types", "person", "modified")
        ]

    async def test_edit_conflicts_when_release_changes_item_and_force_wins(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc, first = await self._installed_then_edited(engine, owner)
        await publish_template(engine, changed(doc, entity_types__0__name="Human"))
        before = await dump(engine)
        with pytest.raises(InstallConflict) as info:
            await install(engine, owner)
        assert info.value.conflicts == [
            {
                "kind": "entity_types",
                "slug": "person",
                "reason": "locally_modified",
                "fields": ["/name"],
            }
        ]
        assert await dump(engine) == before

        forced = await install(engine, owner, force=True)
        assert forced.changes["entity_types"].updated == 1
        assert (
            await scalar(
                engine,
                "SELECT name FROM entity_types WHERE organization_id=:o AND slug='person'",
                o=first.organization.id,
            )
            == "Human"
        )
        async with transaction(engine) as session:
            assert (await repair.drift(session, owner, first.id)).drift == []

    # The org's archive of a managed row is drift the checker reports; it stays, by design.
    @pytest.mark.allow_violations
    async def test_row_archived_by_the_org_conflicts_when_release_changes_it(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        first = await install(engine, owner)
        await execute(
            engine,
            "UPDATE entity_types SET status = 'archived' WHERE organization_id=:o AND slug='person'",
            o=first.organization.id,
        )
        await publish_template(engine, changed(doc, entity_types__0__name="Human"))
        before = await dump(engine)

        with pytest.raises(InstallConflict) as info:
            await install(engine, owner)

        assert info.value.conflicts == [
            {"kind": "entity_types", "slug": "person", "reason": "locally_modified", "fields": [""]}
        ]
        assert await dump(engine) == before  # still archived, still the old name

    async def test_force_does_not_override_user_authored(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        org = await scalar(
            engine, "SELECT organization_id FROM memberships WHERE user_id=:u", u=owner.user_id
        )
        await execute(
            engine,
            "INSERT INTO watchers (organization_id, slug, name) VALUES (:o,'inbox','x')",
            o=org,
        )
        with pytest.raises(InstallConflict):
            await install(engine, owner, force=True)


class TestUninstall:
    async def test_uninstall_archives_and_reinstall_reactivates_same_rows(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        org = first.organization.id
        ids_before = await rows(
            engine, "SELECT id FROM entity_types WHERE organization_id=:o ORDER BY id", o=org
        )

        async with transaction(engine) as session:
            gone = await installs.uninstall(session, owner, first.id)
        assert gone.status == "uninstalled"
        assert gone.changes["entity_types"].archived == 2
        active = await scalar(
            engine,
            """SELECT count(*) FROM (SELECT status FROM entity_types WHERE organization_id=:o
               UNION ALL SELECT status FROM watchers WHERE organization_id=:o) s
               WHERE status = 'active'""",
            o=org,
        )
        assert active == 0
        assert (
            await scalar(engine, "SELECT status FROM agents WHERE id=:i", i=first.id)
            == "uninstalled"
        )
        assert (
            await scalar(
                engine, "SELECT count(*) FROM watcher_versions WHERE organization_id=:o", o=org
            )
            == 1
        )

        again = await install(engine, owner)
        assert again.id == first.id
        assert not again.created
        assert again.action == "reinstall"
        ids_after = await rows(
            engine, "SELECT id FROM entity_types WHERE organization_id=:o ORDER BY id", o=org
        )
        assert ids_after == ids_before
        assert (
            await scalar(
                engine,
                "SELECT count(*) FROM entity_types WHERE organization_id=:o AND status='active'",
                o=org,
            )
            == 2
        )
        assert (
            await scalar(
                engine, "SELECT count(*) FROM watcher_versions WHERE organization_id=:o", o=org
            )
            == 1
        )
        actions = await rows(
            engine,
            "SELECT action FROM install_events WHERE install_id=:i ORDER BY created_at",
            i=first.id,
        )
        assert [a for (a,) in actions] == ["install", "uninstall", "reinstall"]

    async def test_reinstall_keeps_what_the_org_edited_before_the_uninstall(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        org = first.organization.id
        await execute(
            engine,
            "UPDATE entity_types SET icon = 'local' WHERE organization_id = :o AND slug = 'person'",
            o=org,
        )
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, first.id)

        again = await install(engine, owner)

        assert again.action == "reinstall"
        person = await rows(
            engine,
            "SELECT icon, status FROM entity_types WHERE organization_id = :o AND slug = 'person'",
            o=org,
        )
        assert [(r.icon, r.status) for r in person] == [("local", "active")]

    async def test_uninstalling_twice_writes_nothing_the_second_time(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, first.id)
        before = await dump(engine)

        async with transaction(engine) as session:
            again = await installs.uninstall(session, owner, first.id)

        assert (again.action, again.status) == ("none", "uninstalled")
        assert sum(c.archived for c in again.changes.values()) == 0
        assert await dump(engine) == before  # no second history event

    async def test_uninstall_leaves_rows_a_release_archived_as_they_were(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        first = await install(engine, owner)
        without_knows = copy.deepcopy(doc)
        without_knows["relationship_types"] = doc["relationship_types"][:2]
        await publish_template(engine, without_knows)
        await install(engine, owner)
        knows = """SELECT xmin::text, status, updated_at FROM entity_relationship_types
                   WHERE organization_id = :o AND slug = 'knows'"""
        before = await rows(engine, knows, o=first.organization.id)

        async with transaction(engine) as session:
            gone = await installs.uninstall(session, owner, first.id)

        assert gone.changes["relationship_types"].archived == 2
        assert await rows(engine, knows, o=first.organization.id) == before
        recorded = await scalar(
            engine,
            "SELECT changes FROM install_events WHERE install_id = :i AND action = 'uninstall'",
            i=first.id,
        )
        assert recorded["relationship_types"]["archived"] == 2

    # A managed system row is outside every release, which the checker reports.
    @pytest.mark.allow_violations
    async def test_uninstall_leaves_system_rows_alone(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        org = first.organization.id
        await execute(
            engine,
            """INSERT INTO entity_types (organization_id, slug, name, managed_by_template_agent_id)
               SELECT :o, '$member', 'Member', managed_by_template_agent_id FROM entity_types
               WHERE organization_id = :o AND slug = 'person'""",
            o=org,
        )

        async with transaction(engine) as session:
            gone = await installs.uninstall(session, owner, first.id)

        assert gone.changes["entity_types"].archived == 2
        statuses = dict(
            await rows(
                engine, "SELECT slug, status FROM entity_types WHERE organization_id=:o", o=org
            )
        )
        assert statuses == {"person": "archived", "company": "archived", "$member": "active"}


class TestDrift:
    # Rows archived and deleted behind the service's back, which the checker reports.
    @pytest.mark.allow_violations
    async def test_archived_and_deleted_managed_rows_are_reported_as_such(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        org = first.organization.id
        company = await scalar(
            engine, "SELECT id FROM entity_types WHERE organization_id=:o AND slug='company'", o=org
        )
        await execute(
            engine, "UPDATE entity_types SET status = 'archived' WHERE id = :i", i=company
        )
        await execute(
            engine,
            """DELETE FROM entity_relationship_type_rules r USING entity_relationship_types t
               WHERE r.relationship_type_id = t.id AND t.organization_id = :o AND t.slug = 'knows'""",
            o=org,
        )
        await execute(
            engine,
            "DELETE FROM entity_relationship_types WHERE organization_id=:o AND slug='knows'",
            o=org,
        )

        async with transaction(engine) as session:
            report = await repair.drift(session, owner, first.id)

        assert [(d.kind, d.slug, d.id, d.drift) for d in report.drift] == [
            ("entity_types", "company", company, "archived"),
            ("relationship_types", "knows", None, "deleted"),
        ]

    async def test_uninstalled_install_has_no_drift(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        """Its rows were archived by the uninstall, not by the org."""
        await publish_template(engine, small_doc())
        first = await install(engine, owner)
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, first.id)

        async with transaction(engine) as session:
            report = await repair.drift(session, owner, first.id)

        assert report.install.status == "uninstalled"
        assert report.drift == []
        assert (
            await scalar(
                engine,
                "SELECT count(*) FROM entity_types WHERE organization_id = :o AND status = 'archived'",
                o=first.organization.id,
            )
            == 2
        )


class TestAuthorization:
    async def test_member_is_forbidden_non_member_not_found(self, engine: AsyncEngine) -> None:
        await publish_template(engine, small_doc())
        boss, _, _ = await make_user(engine)
        member, _, _ = await make_user(engine)
        stranger, _, _ = await make_user(engine)
        org = await make_org(engine, owner=boss)
        async with transaction(engine) as session:
            await add_member(session, organization_id=org.id, user_id=member.user_id, role="member")
        before = await dump(engine)

        with pytest.raises(Forbidden):
            await install(engine, member, organization=org.slug)
        with pytest.raises(NotFound):
            await install(engine, stranger, organization=org.slug)
        with pytest.raises(NotFound):
            await install(engine, stranger, organization=str(org.id))
        with pytest.raises(NotFound):
            await install(engine, boss, organization="no-such-org")
        assert await dump(engine) == before
        assert (await install(engine, boss, organization=org.slug)).created
        # The no-op, asked of the installed org, refuses alike.
        installed = await dump(engine)
        for actor, ref, error in (
            (member, org.slug, Forbidden),
            (stranger, org.slug, NotFound),
            (stranger, str(org.id), NotFound),
        ):
            with pytest.raises(error):
                await installs.noop(engine, actor, template="starter", organization=ref)
        assert await dump(engine) == installed

    async def test_an_org_whose_slug_reads_as_an_id_is_found_by_it(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        org = await make_org(engine, owner=owner, slug=str(uuid.uuid4()))

        result = await install(engine, owner, organization=org.slug)

        assert (result.organization.id, result.created) == (org.id, True)
        again = await installs.noop(engine, owner, template="starter", organization=org.slug)
        assert again is not None
        assert again.id == result.id

    async def test_private_template_is_invisible_to_outsiders(self, engine: AsyncEngine) -> None:
        await publish_template(engine, small_doc("secret", visibility="private"))
        outsider, _, _ = await make_user(engine)
        with pytest.raises(NotFound):
            await install(engine, outsider, template="secret")
        insider, _, _ = await make_user(engine)
        template_org = await scalar(engine, "SELECT id FROM organizations WHERE slug='secret'")
        async with transaction(engine) as session:
            await add_member(
                session, organization_id=template_org, user_id=insider.user_id, role="member"
            )
        assert (await install(engine, insider, template="secret")).created

    async def test_cannot_install_into_the_template_org(self, engine: AsyncEngine) -> None:
        await publish_template(engine, small_doc())
        admin, _, _ = await make_user(engine, admin=True)
        with pytest.raises(Invalid):
            await install(engine, admin, organization="starter")
        with pytest.raises(Invalid):
            await installs.noop(engine, admin, template="starter", organization="starter")

    async def test_unknown_release_is_not_found(self, engine: AsyncEngine, owner: Actor) -> None:
        await publish_template(engine, small_doc())
        with pytest.raises(NotFound):
            await install(engine, owner, version=7)
        await install(engine, owner)
        with pytest.raises(NotFound):
            await installs.noop(engine, owner, template="starter", version=7)
        with pytest.raises(NotFound):
            await install(engine, owner, template="nope")


class TestVerification:
    async def test_written_row_unequal_to_its_item_rolls_the_install_back(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        await publish_template(engine, small_doc())
        # Something outside the service rewrites a row as it is written (here a trigger): the
        # apply statement writes every planned row, so only the check after it can notice.
        await execute(
            engine,
            """CREATE FUNCTION rename_person() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN NEW.name := NEW.name || ' (renamed)'; RETURN NEW; END $$""",
        )
        await execute(
            engine,
            """CREATE TRIGGER rename_person BEFORE INSERT ON entity_types
               FOR EACH ROW WHEN (NEW.slug = 'person') EXECUTE FUNCTION rename_person()""",
        )
        before = await dump(engine)

        with pytest.raises(engine_module.ConcurrentChange) as info:
            await install(engine, owner)

        assert "entity_types:person" in info.value.detail
        assert await dump(engine) == before


class TestSetBasedCost:
    async def _count_statements(self, engine: AsyncEngine, actor: Actor, template: str) -> int:
        statements: list[str] = []

        def record(*args: Any) -> None:
            statements.append(args[2])

        event.listen(engine.sync_engine, "before_cursor_execute", record)
        try:
            await install(engine, actor, template=template)
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", record)
        return len(statements)

    async def test_statement_count_does_not_grow_with_template_size(
        self, engine: AsyncEngine
    ) -> None:
        await publish_template(engine, scaled_doc(1, "size-1"))
        await publish_template(engine, scaled_doc(10, "size-10"))
        small, _, _ = await make_user(engine)
        large, _, _ = await make_user(engine)
        n_small = await self._count_statements(engine, small, "size-1")
        n_large = await self._count_statements(engine, large, "size-10")
        assert n_small == n_large
        assert await scalar(engine, "SELECT count(*) FROM entity_types WHERE slug LIKE '%-9'") == 4
        # upgrades with one changed watcher cost the same at both sizes as well
        for slug, factor in (("size-1", 1), ("size-10", 10)):
            doc = scaled_doc(factor, slug)
            doc["watchers"][0]["prompt"] = "changed"
            await publish_template(engine, doc)
        assert await self._count_statements(
            engine, small, "size-1"
        ) == await self._count_statements(engine, large, "size-10")

    async def test_statement_count_does_not_grow_with_the_rows_that_merge(
        self, engine: AsyncEngine
    ) -> None:
        """An upgrade where one row of the org needs merging costs as many statements as one
        where every row does, at 1x and 10x the template."""
        counts = []
        for factor, edited in ((1, "person-0"), (10, "person-0"), (10, "%")):
            slug = f"merge-{factor}-{len(counts)}"
            doc = scaled_doc(factor, slug)
            await publish_template(engine, doc)
            actor, user, _ = await make_user(engine)
            await install(engine, actor, template=slug)
            await execute(
                engine,
                """UPDATE entity_types SET icon = 'local' WHERE organization_id = :o
                   AND slug LIKE :edited AND managed_by_template_agent_id IS NOT NULL""",
                o=user.personal_organization.id,
                edited=edited,
            )
            for item in doc["entity_types"]:
                item["name"] += " v2"
            await publish_template(engine, doc)
            counts.append(await self._count_statements(engine, actor, slug))
            icons = await rows(
                engine,
                "SELECT DISTINCT icon, name LIKE '% v2' AS upgraded FROM entity_types "
                "WHERE organization_id = :o AND slug LIKE :edited",
                o=user.personal_organization.id,
                edited=edited,
            )
            assert [(r.icon, r.upgraded) for r in icons] == [("local", True)]  # merged
        assert len(set(counts)) == 1, counts

    async def test_a_generic_plan_reads_only_the_planned_orgs_rows(
        self, engine: AsyncEngine
    ) -> None:
        """An install plans with generic plans (planned once per connection, not knowing the
        org): the plan must still find the org's rows through their index, whether the
        tables' statistics are stale or fresh. Read every org's rows instead, it made each
        install's and each resync item's cost grow with the fleet (a plan took 28.6 ms at
        1,000 orgs, against 2.3)."""
        await publish_template(engine, small_doc("fleet-cost"))
        actor, user, _ = await make_user(engine)
        result = await install(engine, actor, template="fleet-cost")
        org = user.personal_organization.id
        # A fleet: 2,000 more orgs holding rows with the same slugs (their own, no references).
        await execute(
            engine,
            "INSERT INTO organizations (slug, name) "
            "SELECT 'member-of-fleet-' || g, 'Fleet ' || g FROM generate_series(1, 2000) g",
        )
        unreferenced = {
            column: None
            for column in (
                "managed_by_template_agent_id", "source_template_org_id", "source_row_id",
                "mirrored_release_id", "mirrored_at", "mirrored_hash", "inverse_type_id",
                "current_version_id", "agent_id", "entity_type_id", "watcher_id",
            )
        }  # fmt: skip
        tables = list(engine_module.TABLES.values())
        for table in tables:
            # Every column but the generated ones.
            columns = await scalar(
                engine,
                "SELECT string_agg(column_name, ', ' ORDER BY ordinal_position) "
                "FROM information_schema.columns "
                "WHERE table_name = :t AND is_generated = 'NEVER'",
                t=table,
            )
            await execute(
                engine,
                f"""INSERT INTO {table} ({columns})
                    SELECT {", ".join(f"r.{c}" for c in columns.split(", "))} FROM {table} t
                    JOIN organizations o ON o.slug LIKE 'member-of-fleet-%'
                    CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, to_jsonb(t)
                        || CAST(:unreferenced AS jsonb)
                        || jsonb_build_object('id', gen_random_uuid(), 'organization_id', o.id)) r
                    WHERE t.organization_id = :org""",
                org=org,
                unreferenced=json.dumps(unreferenced),
            )
        release = await scalar(
            engine, "SELECT installed_release_id FROM agents WHERE id = :i", i=result.id
        )
        owner = await scalar(
            engine, "SELECT template_agent_id FROM agents WHERE id = :i", i=result.id
        )
        target = engine_module.Target(
            organization_id=org, release_id=release, owner=owner, agent_id=result.id,
            previous_release_id=release, install_active=True,
        )  # fmt: skip

        async def sequential_scans() -> dict[str, int]:
            """Plan on a new connection (a new generic plan); the org tables it scanned."""
            fresh = create_engine(engine.url, pool_size=1)
            try:
                async with transaction(fresh) as session:
                    await session.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
                    planned = await engine_module.plan(session, target)
                    assert not planned.writes
                    scanned = await session.execute(
                        text("SELECT relname, seq_scan FROM pg_stat_xact_user_tables "
                             "WHERE relname = ANY(:tables)"),
                        {"tables": tables},
                    )  # fmt: skip
                    return {r.relname: r.seq_scan for r in scanned}
            finally:
                await fresh.dispose()

        assert await sequential_scans() == dict.fromkeys(tables, 0)  # statistics stale
        for table in tables:
            await execute(engine, f"ANALYZE {table}")
        assert await sequential_scans() == dict.fromkeys(tables, 0)  # and fresh

    @pytest.mark.parametrize("sql", ["PLAN_SQL", "FLEET_PLAN_SQL"])
    async def test_the_plan_merges_and_rebuilds_each_row_once(
        self, engine: AsyncEngine, sql: str
    ) -> None:
        """`install_merge` appears once in the executed plan: inlined into the steps that
        read its result, it was called again at each of them (a 10x upgrade with every entity
        type edited took 20 times longer)."""
        params = engine_module._plan_params(
            uuid.uuid4(), uuid.uuid4(), [(uuid.uuid4(), None, True)], engine_module.Options()
        )
        async with transaction(engine) as session:
            explained = await session.execute(
                text("EXPLAIN (VERBOSE) " + getattr(engine_module, sql)), params
            )
            plan_text = "\n".join(row[0] for row in explained)
        assert plan_text.count("install_merge(") == 1, plan_text
        # A row's content, where it is rebuilt at all, is rebuilt once, not at every step
        # that reads it.
        assert "CTE content" in plan_text, plan_text
