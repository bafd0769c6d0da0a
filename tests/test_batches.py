"""Batches: the engine moves many orgs per statement, and each org's outcome is its own.

The law: whatever the batch, every org ends exactly as a sync of that org alone would leave
it (rows, versions, provenance, history, events, conflicts); a conflicting org is not written
and holds no other back; an org whose write fails is found by writing the batch again in
halves, and only it fails."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service import engine as install_engine
from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.errors import InstallConflict
from install_service.installs import service as installs_service
from install_service.releases import get_release
from install_service.testing import install_template, make_org, publish_template
from tests.conftest import execute, rows, scalar, small_doc

SYSTEM = Actor.system()

V2 = small_doc()
V2["entity_types"][0]["name"] = "Human"  # person renamed
V2["entity_types"][1]["description"] = "A company, v2."
V2["entity_types"].append({"slug": "place", "name": "Place"})
V2["watchers"][0]["prompt"] = "Find people, companies and places."
V2["relationship_types"][2]["rules"].append({"source": "person", "target": "place"})

# What an org may have done to its install before the release, each one statement on `:o`.
EDITS = {
    "nothing": None,
    "renamed person (conflicts)": "UPDATE entity_types SET name = 'Mine' "
    "WHERE organization_id = :o AND slug = 'person'",
    "described person (merges)": "UPDATE entity_types SET description = 'Ours' "
    "WHERE organization_id = :o AND slug = 'person'",
    "renamed company (merges)": "UPDATE entity_types SET name = 'Firm' "
    "WHERE organization_id = :o AND slug = 'company'",
    "archived knows": "UPDATE entity_relationship_types SET status = 'archived' "
    "WHERE organization_id = :o AND slug = 'knows'",
    "own place (user-authored)": "INSERT INTO entity_types (organization_id, slug, name) "
    "VALUES (:o, 'place', 'Our place')",
    "edited prompt (conflicts)": """
        WITH v AS (
            INSERT INTO watcher_versions (id, organization_id, watcher_id, version, name,
                                          prompt, extraction_schema, sources_schema)
            SELECT gen_random_uuid(), w.organization_id, w.id, 2, w.name, 'Our prompt',
                   '{}', '{}'
            FROM watchers w WHERE w.organization_id = :o
            RETURNING id, watcher_id)
        UPDATE watchers w SET current_version_id = v.id FROM v WHERE w.id = v.watcher_id""",
    "dropped a rule": """DELETE FROM entity_relationship_type_rules
                         WHERE organization_id = :o AND relationship_type_id IN (
                             SELECT id FROM entity_relationship_types
                             WHERE organization_id = :o AND slug = 'employed_by')""",
    # Rows of items the release leaves as they were: a batch finds them by their state alone.
    "described employs": "UPDATE entity_relationship_types SET description = 'Ours' "
    "WHERE organization_id = :o AND slug = 'employs'",
    "archived seniority": "UPDATE event_classifiers SET status = 'archived' "
    "WHERE organization_id = :o AND slug = 'seniority'",
    "deleted employs": """
        WITH i AS (UPDATE entity_relationship_types SET inverse_type_id = NULL
                   WHERE organization_id = :o AND slug = 'employed_by'),
        r AS (DELETE FROM entity_relationship_type_rules
              WHERE relationship_type_id IN (
                  SELECT id FROM entity_relationship_types
                  WHERE organization_id = :o AND slug = 'employs'))
        DELETE FROM entity_relationship_types WHERE organization_id = :o AND slug = 'employs'""",
    "stale mirrored hash of employs": "UPDATE entity_relationship_types "
    "SET mirrored_hash = 'stale' WHERE organization_id = :o AND slug = 'employs'",
    "added a managed row": """
        INSERT INTO entity_types (organization_id, slug, name, managed_by_template_agent_id)
        SELECT :o, 'extra', 'Extra', managed_by_template_agent_id FROM entity_types
        WHERE organization_id = :o AND slug = 'person'""",
    "detached seniority": """
        UPDATE event_classifiers
        SET detached_from_template_agent_ids = ARRAY[managed_by_template_agent_id],
            managed_by_template_agent_id = NULL, source_template_org_id = NULL,
            source_row_id = NULL, mirrored_release_id = NULL, mirrored_at = NULL,
            mirrored_hash = NULL
        WHERE organization_id = :o AND slug = 'seniority'""",
}

# An org's state as a sync leaves it, without ids and times: equal for an org moved in a batch
# and its twin moved alone.
STATE = """
SELECT 'row ' || k || ' ' || slug || ' ' || status || ' ' || coalesce(content_hash, '-')
       || ' ' || coalesce(mirrored_hash, '-') || ' ' || coalesce(managed, '-')
FROM (SELECT 'entity_types' k, slug, status, content_hash, mirrored_hash,
             (managed_by_template_agent_id IS NOT NULL)::text AS managed
      FROM entity_types WHERE organization_id = :o
      UNION ALL SELECT 'relationship_types', slug, status, content_hash, mirrored_hash,
             (managed_by_template_agent_id IS NOT NULL)::text
      FROM entity_relationship_types WHERE organization_id = :o
      UNION ALL SELECT 'classifiers', slug, status, content_hash, mirrored_hash,
             (managed_by_template_agent_id IS NOT NULL)::text
      FROM event_classifiers WHERE organization_id = :o
      UNION ALL SELECT 'watchers', slug, status, content_hash, mirrored_hash,
             (managed_by_template_agent_id IS NOT NULL)::text
      FROM watchers WHERE organization_id = :o) r
UNION ALL
SELECT 'versions ' || w.slug || ' ' || string_agg(v.version || ':' || v.prompt, ',' ORDER BY v.version)
FROM watchers w JOIN watcher_versions v ON v.watcher_id = w.id
WHERE w.organization_id = :o GROUP BY w.slug
UNION ALL
SELECT 'install ' || a.status || ' ' || r.version
FROM agents a JOIN template_releases r ON r.id = a.installed_release_id
WHERE a.organization_id = :o AND a.template_agent_id IS NOT NULL
UNION ALL
SELECT 'history ' || e.action || ' ' || e.changes::text
FROM install_events e WHERE e.organization_id = :o
UNION ALL
SELECT 'event ' || e.type || ' '
       || (SELECT jsonb_agg(i - 'version_id') FROM jsonb_array_elements(e.data -> 'items') i)::text
FROM events e WHERE e.organization_id = :o
UNION ALL
SELECT 'next run ' || w.slug || ' ' || (w.next_run_at IS NOT NULL)::text
FROM watchers w WHERE w.organization_id = :o
ORDER BY 1
"""


async def state(engine: AsyncEngine, org: uuid.UUID) -> list[str]:
    return [r[0] for r in await rows(engine, STATE, o=org)]


async def release(engine: AsyncEngine, version: int | None = None) -> install_engine.Release:
    async with transaction(engine) as session:
        found = await get_release(session, SYSTEM, "starter", version)
        counted = await session.execute(
            text(
                "SELECT kind, count(*) AS n FROM template_release_items "
                "WHERE release_id = :r GROUP BY kind"
            ),
            {"r": found["id"]},
        )
        totals = {r.kind: r.n for r in counted}
    return install_engine.Release.of(found, totals)


async def installs(engine: AsyncEngine, orgs: list[uuid.UUID]) -> list[install_engine.Install]:
    found = await rows(
        engine,
        """SELECT a.organization_id, a.id, a.status, a.installed_release_id, r.version
           FROM agents a LEFT JOIN template_releases r ON r.id = a.installed_release_id
           WHERE a.organization_id = ANY(CAST(:orgs AS uuid[]))
             AND a.template_agent_id IS NOT NULL""",
        orgs=orgs,
    )
    by_org = {
        r.organization_id: install_engine.Install(
            organization_id=r.organization_id,
            id=r.id,
            status=r.status,
            installed_release_id=r.installed_release_id,
            installed_version=r.version,
        )
        for r in found
    }
    return [by_org.get(org, install_engine.Install(organization_id=org)) for org in orgs]


async def batch_sync(engine: AsyncEngine, orgs: list[uuid.UUID]) -> list[Any]:
    target = await release(engine)
    async with transaction(engine) as session:
        return await install_engine.sync(
            session, target, await installs(engine, orgs), actor=SYSTEM, batch=True
        )


@pytest.fixture
async def v1(engine: AsyncEngine) -> None:
    await publish_template(engine, small_doc())


async def installed_org(engine: AsyncEngine, edit: str | None = None) -> uuid.UUID:
    org = await make_org(engine)
    await install_template(engine, SYSTEM, "starter", org.slug)
    if edit is not None:
        await execute(engine, edit, o=org.id)
    return org.id


class TestEachOrgAsIfAlone:
    @pytest.mark.allow_violations  # some edits archive a managed row: drift the check reports
    @settings(
        max_examples=8,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(edits=st.lists(st.sampled_from(sorted(EDITS)), min_size=1, max_size=6))
    async def test_a_batch_leaves_each_org_as_a_sync_of_it_alone(
        self, engine: AsyncEngine, edits: list[str]
    ) -> None:
        # Each example starts from v1's content (a release of its own after the first) with
        # fresh orgs, and moves them to v2's.
        await publish_template(engine, small_doc())
        pairs = [
            (await installed_org(engine, EDITS[e]), await installed_org(engine, EDITS[e]))
            for e in edits
        ]
        await publish_template(engine, V2)  # the latest release from here on
        batched = await batch_sync(engine, [a for a, _ in pairs])
        alone = []
        for _, b in pairs:
            alone += await batch_sync(engine, [b])
        for (a, b), in_batch, by_itself, edit in zip(pairs, batched, alone, edits, strict=True):
            assert (in_batch.status, in_batch.action) == (by_itself.status, by_itself.action), edit
            assert await state(engine, a) == await state(engine, b), edit

    @pytest.mark.allow_violations  # as above
    async def test_the_single_install_path_agrees_with_a_batch(
        self, engine: AsyncEngine, v1: None
    ) -> None:
        orgs = [await installed_org(engine, EDITS[e]) for e in sorted(EDITS)]
        twins = [await installed_org(engine, EDITS[e]) for e in sorted(EDITS)]
        await publish_template(engine, V2)
        await batch_sync(engine, orgs)
        for twin in twins:
            slug = await scalar(engine, "SELECT slug FROM organizations WHERE id = :o", o=twin)
            # A conflict is a 409 on its own, an outcome in a batch.
            with contextlib.suppress(InstallConflict):
                await install_template(engine, SYSTEM, "starter", slug)
        for org, twin, edit in zip(orgs, twins, sorted(EDITS), strict=True):
            assert await state(engine, org) == await state(engine, twin), edit


class TestIsolation:
    async def test_a_conflicting_org_is_not_written_and_holds_no_other_back(
        self, engine: AsyncEngine, v1: None
    ) -> None:
        clean = [await installed_org(engine) for _ in range(3)]
        conflicting = await installed_org(engine, EDITS["renamed person (conflicts)"])
        await publish_template(engine, V2)
        before = await state(engine, conflicting)
        outcomes = await batch_sync(engine, [*clean, conflicting])
        assert [o.status for o in outcomes] == ["written"] * 3 + ["conflict"]
        assert [(c.slug, c.reason) for c in outcomes[3].plan.conflicts] == [
            ("person", "locally_modified")
        ]
        assert await state(engine, conflicting) == before
        for org in clean:
            assert "install active 2" in await state(engine, org)

    @pytest.mark.parametrize("position", [0, 3, 6])
    async def test_an_org_failing_to_write_is_found_and_fails_alone(
        self, engine: AsyncEngine, v1: None, position: int
    ) -> None:
        orgs = [await installed_org(engine) for _ in range(7)]
        doomed = orgs[position]
        await publish_template(engine, V2)
        # Something outside the service refuses one org's new row when it is written.
        await execute(
            engine,
            """CREATE FUNCTION refuse_place() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'no places here' USING ERRCODE = 'check_violation';
               END $$""",
        )
        await execute(
            engine,
            f"""CREATE TRIGGER refuse_place BEFORE INSERT ON entity_types FOR EACH ROW
                WHEN (NEW.slug = 'place' AND NEW.organization_id = '{doomed}')
                EXECUTE FUNCTION refuse_place()""",
        )
        before = await state(engine, doomed)
        outcomes = await batch_sync(engine, orgs)
        statuses = {o.install.organization_id: o.status for o in outcomes}
        assert statuses == {org: "failed" if org == doomed else "written" for org in orgs}
        failed = next(o for o in outcomes if o.status == "failed")
        assert "no places here" in str(failed.error)
        assert await state(engine, doomed) == before
        for org in orgs:
            if org != doomed:
                assert "install active 2" in await state(engine, org)

    async def test_an_edit_committed_after_the_plan_is_not_written_over(
        self, engine: AsyncEngine, v1: None, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A batch locks no rows: an owner's edit committed between the batch's plan and its
        write must survive, and its org be planned again (here: a conflict), the others
        written."""
        orgs = [await installed_org(engine) for _ in range(4)]
        edited = orgs[2]
        await publish_template(engine, V2)
        real_apply = install_engine.apply
        edits: list[uuid.UUID] = []

        async def edit_then_apply(session: Any, writes: Any) -> None:
            if not edits:  # the first write only: the plan was made before the edit
                edits.append(edited)
                await execute(engine, EDITS["renamed person (conflicts)"], o=edited)
            await real_apply(session, writes)

        monkeypatch.setattr(install_engine, "apply", edit_then_apply)
        outcomes = await batch_sync(engine, orgs)
        assert edits == [edited]
        statuses = {o.install.organization_id: o.status for o in outcomes}
        assert statuses == {org: "conflict" if org == edited else "written" for org in orgs}
        assert await scalar(
            engine,
            "SELECT name FROM entity_types WHERE organization_id = :o AND slug = 'person'",
            o=edited,
        ) == "Mine"  # fmt: skip
        assert "install active 1" in await state(engine, edited)
        for org in orgs:
            if org != edited:
                assert "install active 2" in await state(engine, org)

    async def test_a_row_detached_after_the_plan_is_not_taken_back(
        self, engine: AsyncEngine, v1: None, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Detaching changes who owns a row, not its content (nor its hash): a row the org
        detaches between the batch's plan and its write must stay the org's, unchanged,
        while the rest of that org is upgraded."""
        orgs = [await installed_org(engine) for _ in range(3)]
        detaching = orgs[1]
        await publish_template(engine, V2)
        real_apply = install_engine.apply
        detached: list[uuid.UUID] = []

        async def detach_then_apply(session: Any, writes: Any) -> None:
            if not detached:
                detached.append(detaching)
                await execute(
                    engine,
                    """UPDATE entity_types SET managed_by_template_agent_id = NULL,
                           source_template_org_id = NULL, source_row_id = NULL,
                           mirrored_release_id = NULL, mirrored_at = NULL, mirrored_hash = NULL,
                           detached_from_template_agent_ids = ARRAY[managed_by_template_agent_id]
                       WHERE organization_id = :o AND slug = 'person'""",
                    o=detaching,
                )
            await real_apply(session, writes)

        monkeypatch.setattr(install_engine, "apply", detach_then_apply)
        outcomes = await batch_sync(engine, orgs)
        assert detached == [detaching]
        assert [o.status for o in outcomes] == ["written"] * 3
        person = (
            await rows(
                engine,
                """SELECT name, managed_by_template_agent_id AS managed_by FROM entity_types
                   WHERE organization_id = :o AND slug = 'person'""",
                o=detaching,
            )
        )[0]
        assert (person.name, person.managed_by) == ("Person", None)
        for org in orgs:
            assert "install active 2" in await state(engine, org)

    async def test_a_new_install_that_conflicts_leaves_no_install_behind(
        self, engine: AsyncEngine, v1: None
    ) -> None:
        fresh = [(await make_org(engine)).id for _ in range(2)]
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'person', 'Mine')",
            o=fresh[1],
        )
        outcomes = await batch_sync(engine, fresh)
        assert [(o.status, o.created) for o in outcomes] == [("written", True), ("conflict", True)]
        assert await scalar(
            engine,
            "SELECT count(*) FROM agents WHERE organization_id = :o AND template_agent_id IS NOT NULL",
            o=fresh[1],
        ) == 0  # fmt: skip
        assert await scalar(
            engine,
            "SELECT count(*) FROM agents WHERE organization_id = :o AND status = 'active'",
            o=fresh[0],
        ) == 1  # fmt: skip


# The first release with a field the template enforces: `employs`' description (which one
# of the edits changes) is the template's.
V1 = small_doc()
V1["relationship_types"][1]["policies"] = {"description": "template"}

# A third release: the classifier dropped, `employs` described, a rule of `knows` dropped.
V3 = small_doc()
V3["entity_types"][0]["name"] = "Human"
V3["classifiers"] = []
V3["relationship_types"][1]["description"] = "Companies employ people."
V3["relationship_types"][2]["rules"] = []
V3["relationship_types"][1]["policies"] = {"description": "template"}

# The plans of a batch with every org paired with every item and every row: what
# `_MOVED_PAIRS` must answer exactly.
_EVERY_PAIR = install_engine._plan_body(
    install_engine._every_pair(
        install_engine._org_rows("organization_id = ANY(CAST(:orgs AS uuid[]))")
    )
)
_MOVED = install_engine.BATCH_BODY


def _listed(result: Any) -> list[tuple[Any, ...]]:
    """A plan's rows without their time, less the items it lists as `unchanged` (which a
    batch may leave out: see `_plan_body`)."""
    return [
        tuple(v for c, v in r._mapping.items() if c != "planned_at")
        for r in result
        if r._mapping.get("action") != "unchanged"
    ]


class TestMovedPairs:
    """A batch plans only the items a release moves away from each org's installed release
    and the rows that are not as the install left them; the law: its plans (each item's and
    the fleet's summary) are those of the plan pairing every org with every item and row,
    whatever the orgs did, whichever releases they are at, and whichever release is planned
    (an upgrade, the same release, a rollback), for orgs installing it anew too."""

    @pytest.mark.allow_violations  # as above
    @settings(
        max_examples=6,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        edits=st.lists(st.sampled_from(sorted(EDITS)), min_size=2, max_size=6),
        moved=st.lists(st.booleans(), min_size=6, max_size=6),
    )
    async def test_a_batch_plan_equals_the_plan_over_every_pair(
        self, engine: AsyncEngine, edits: list[str], moved: list[bool]
    ) -> None:
        await publish_template(engine, V1)
        first = await release(engine)
        orgs = [await installed_org(engine, EDITS[e]) for e in edits]
        # Uninstalled at the first release: the second adds items its rows never had.
        gone = await installed_org(engine)
        await publish_template(engine, V2)
        # Some orgs move to the second release before their edits are planned again.
        await batch_sync(engine, [o for o, m in zip(orgs, moved, strict=False) if m])
        async with transaction(engine) as session:
            uninstalled = await scalar(
                engine,
                "SELECT id FROM agents WHERE organization_id = :o AND template_agent_id "
                "IS NOT NULL",
                o=gone,
            )
            await installs_service.uninstall(session, SYSTEM, uninstalled)
        fresh = (await make_org(engine)).id
        await publish_template(engine, V3)
        scope = [
            (i.organization_id, i.installed_release_id, i.status == "active")
            for i in await installs(engine, [*orgs, gone, fresh])
        ]
        versions = [first.version, first.version + 1, first.version + 2]
        async with transaction(engine) as session:
            for version in versions:
                target = await get_release(session, SYSTEM, "starter", version)
                params = install_engine._plan_params(
                    target["id"],
                    target["template_agent_id"],
                    scope,
                    install_engine.Options(),
                    batch=True,
                )
                for sql in (install_engine.BATCH_PLAN_SQL, install_engine.FLEET_PLAN_SQL):
                    every = sql.replace(_MOVED, _EVERY_PAIR)
                    assert every != sql
                    found = _listed(await session.execute(text(sql), params))
                    expected = _listed(await session.execute(text(every), params))
                    assert sorted(map(repr, found)) == sorted(map(repr, expected)), (
                        version,
                        edits,
                    )
                    # (the fleet's answer is one row: the orgs writing, and the conflicts)
                    assert any(v for row in found for v in row), "every plan has work here"


class TestFleetPlan:
    async def test_the_fleet_plan_is_planned_for_its_parameters_every_time(
        self, engine: AsyncEngine
    ) -> None:
        """After five runs of a prepared statement on a connection PostgreSQL may settle on a
        generic plan; the fleet plan's knows neither how many orgs it plans nor which rows
        they edited (over 10,000 installs it ran 2.4 times longer). `plan_many` has its
        transaction plan each statement for its parameters, and answers alike every time:
        the orgs one release behind write; an org at the release that took an item over
        (planned, as `detached`) writes nothing."""
        await publish_template(engine, V1)
        orgs = [await installed_org(engine) for _ in range(2)]
        await publish_template(engine, V2)
        at_release = await installed_org(engine, EDITS["detached seniority"])
        scope = [
            (i.organization_id, i.installed_release_id, i.status == "active")
            for i in await installs(engine, [*orgs, at_release])
        ]
        answers = []
        for _ in range(7):
            async with transaction(engine) as session:
                target = await get_release(session, SYSTEM, "starter")
                planned = await install_engine.plan_many(
                    session, target["id"], target["template_agent_id"], scope
                )
                mode = await session.scalar(text("SELECT current_setting('plan_cache_mode')"))
            answers.append((planned.writing, planned.conflicts, mode))
        assert answers == [(frozenset(orgs), {}, "force_custom_plan")] * 7


class TestDeletedRows:
    async def test_a_managed_row_deleted_by_hand_is_recorded_and_written_again(
        self, engine: AsyncEngine
    ) -> None:
        """The service archives; a managed row deleted by hand is recorded (per template,
        org, kind and slug) and a batch plans its slug again, though the release left its
        item as it was."""
        await publish_template(engine, small_doc())
        org = await installed_org(engine)
        await execute(
            engine,
            """WITH c AS (SELECT id FROM entity_types WHERE organization_id = :o
                          AND slug = 'company'),
               r AS (DELETE FROM entity_relationship_type_rules
                     WHERE source_entity_type_id IN (SELECT id FROM c)
                        OR target_entity_type_id IN (SELECT id FROM c))
               DELETE FROM entity_types WHERE id IN (SELECT id FROM c)""",
            o=org,
        )
        recorded = await rows(
            engine,
            "SELECT kind, slug FROM mirrored_deletions WHERE organization_id = :o",
            o=org,
        )
        assert [(r.kind, r.slug) for r in recorded] == [("entity_types", "company")]
        # A release that leaves `company` (and every rule) as it was.
        changed = small_doc()
        changed["watchers"][0]["prompt"] = "Another prompt."
        await publish_template(engine, changed)
        (outcome,) = await batch_sync(engine, [org])
        assert outcome.status == "written"
        company = await rows(
            engine,
            """SELECT status, managed_by_template_agent_id IS NOT NULL AS managed
               FROM entity_types WHERE organization_id = :o AND slug = 'company'""",
            o=org,
        )
        assert [(c.status, c.managed) for c in company] == [("active", True)]
