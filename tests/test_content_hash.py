"""The stored content hash: every row of the mirrored tables keeps the hash of its content as
it is now, kept true by the database whoever writes the row (the engine, or SQL by hand), so
drift, plans and checks can compare hashes instead of rebuilding content."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.installs import repair
from install_service.installs import service as installs
from install_service.testing import install_template, publish_template
from tests.conftest import execute, rows, scalar, small_doc

TABLES = ("entity_types", "entity_relationship_types", "event_classifiers", "watchers")

# Every row whose stored hash is not the hash of its content: must always be none.
STALE = " UNION ALL ".join(
    f"SELECT '{table}' AS kind, t.slug FROM {table} t "
    "WHERE t.content_hash IS DISTINCT FROM install_content_hash(install_content(t))"
    for table in TABLES
)


async def stale(engine: AsyncEngine) -> list[tuple[str, str]]:
    return [(r.kind, r.slug) for r in await rows(engine, STALE)]


async def stored(engine: AsyncEngine, table: str, org: Any, slug: str) -> str:
    found: str = await scalar(
        engine,
        f"SELECT content_hash FROM {table} WHERE organization_id = :o AND slug = :s",
        o=org,
        s=slug,
    )
    return found


@pytest.fixture
async def installed(engine: AsyncEngine, owner: Actor) -> Any:
    await publish_template(engine, small_doc())
    return await install_template(engine, owner, "starter")


class TestWhatTheEngineWrites:
    async def test_every_mirrored_row_holds_its_release_items_hash(
        self, engine: AsyncEngine, installed: Any
    ) -> None:
        mismatched = await rows(
            engine,
            " UNION ALL ".join(
                f"SELECT t.slug FROM {table} t WHERE t.organization_id = :o "
                "AND t.content_hash IS DISTINCT FROM t.mirrored_hash"
                for table in TABLES
            ),
            o=installed.organization.id,
        )
        assert mismatched == []
        counted = await scalar(
            engine,
            "SELECT "
            + " + ".join(
                f"(SELECT count(*) FROM {t} WHERE organization_id = :o AND content_hash IS NOT NULL)"
                for t in TABLES
            ),
            o=installed.organization.id,
        )
        assert counted == 7  # two entity types, three relationship types, a watcher, a classifier
        assert await stale(engine) == []


class TestEditsByHand:
    async def test_a_field_edit_is_seen_as_drift_and_as_a_local_edit(
        self, engine: AsyncEngine, owner: Actor, installed: Any
    ) -> None:
        org = installed.organization.id
        before = await stored(engine, "entity_types", org, "person")
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Human' WHERE organization_id = :o AND slug = 'person'",
            o=org,
        )
        after = await stored(engine, "entity_types", org, "person")
        assert after != before
        assert await stale(engine) == []
        async with transaction(engine) as session:
            report = await repair.drift(session, owner, installed.id)
        assert [(d.kind, d.slug, d.drift) for d in report.drift] == [
            ("entity_types", "person", "modified")
        ]
        # The release renames the same field: a conflict, not an overwrite.
        doc = small_doc()
        doc["entity_types"][0]["name"] = "Individual"
        await publish_template(engine, doc)
        async with transaction(engine) as session:
            planned = await installs.install(session, owner, template="starter", dry_run=True)
        assert [
            (i.slug, i.action, i.reason) for i in planned.items or [] if i.action != "unchanged"
        ] == [("person", "conflict", "locally_modified")]

    async def test_a_new_watcher_version_by_hand_is_a_change(
        self, engine: AsyncEngine, installed: Any
    ) -> None:
        org = installed.organization.id
        before = await stored(engine, "watchers", org, "inbox")
        # In two statements: the version, then the watcher pointed at it.
        await execute(
            engine,
            """INSERT INTO watcher_versions (id, organization_id, watcher_id, version, name,
                                             prompt, extraction_schema, sources_schema)
               SELECT gen_random_uuid(), w.organization_id, w.id, 2, w.name, 'Edited prompt',
                      '{}', '{}'
               FROM watchers w WHERE w.organization_id = :o AND w.slug = 'inbox'""",
            o=org,
        )
        assert await stored(engine, "watchers", org, "inbox") == before  # not current yet
        await execute(
            engine,
            """UPDATE watchers w SET current_version_id = v.id FROM watcher_versions v
               WHERE v.watcher_id = w.id AND v.version = 2 AND w.organization_id = :o""",
            o=org,
        )
        assert await stored(engine, "watchers", org, "inbox") != before
        # In one statement: a third version and the pointer together.
        edited = await stored(engine, "watchers", org, "inbox")
        await execute(
            engine,
            """WITH v AS (
                   INSERT INTO watcher_versions (id, organization_id, watcher_id, version, name,
                                                 prompt, extraction_schema, sources_schema)
                   SELECT gen_random_uuid(), w.organization_id, w.id, 3, w.name, 'Third',
                          '{}', '{}'
                   FROM watchers w WHERE w.organization_id = :o AND w.slug = 'inbox'
                   RETURNING id, watcher_id)
               UPDATE watchers w SET current_version_id = v.id FROM v WHERE w.id = v.watcher_id""",
            o=org,
        )
        assert await stored(engine, "watchers", org, "inbox") != edited
        assert await stale(engine) == []

    async def test_rules_added_and_removed_change_their_relationship_type(
        self, engine: AsyncEngine, installed: Any
    ) -> None:
        org = installed.organization.id
        before = await stored(engine, "entity_relationship_types", org, "knows")
        await execute(
            engine,
            """INSERT INTO entity_relationship_type_rules (organization_id, relationship_type_id,
                   source_entity_type_id, target_entity_type_id)
               SELECT :o, r.id, c.id, c.id FROM entity_relationship_types r, entity_types c
               WHERE r.organization_id = :o AND r.slug = 'knows'
                 AND c.organization_id = :o AND c.slug = 'company'""",
            o=org,
        )
        added = await stored(engine, "entity_relationship_types", org, "knows")
        assert added != before
        await execute(
            engine,
            """DELETE FROM entity_relationship_type_rules x USING entity_types c
               WHERE x.source_entity_type_id = c.id AND c.slug = 'company'
                 AND x.target_entity_type_id = c.id AND x.organization_id = :o""",
            o=org,
        )
        assert await stored(engine, "entity_relationship_types", org, "knows") == before
        assert await stale(engine) == []

    @pytest.mark.allow_violations  # renamed managed rows: their items are missing
    async def test_renames_follow_to_every_row_that_shows_the_slug(
        self, engine: AsyncEngine, installed: Any
    ) -> None:
        org = installed.organization.id
        hashes = {
            (t, s): await stored(engine, t, org, s)
            for t, s in [
                ("entity_relationship_types", "employed_by"),
                ("entity_relationship_types", "employs"),
                ("entity_relationship_types", "knows"),
                ("event_classifiers", "seniority"),
            ]
        }
        await execute(
            engine,
            "UPDATE entity_types SET slug = 'human' WHERE organization_id = :o AND slug = 'person'",
            o=org,
        )
        # Every relationship type has a rule with person, the classifier's entity type is it.
        for (table, slug), before in hashes.items():
            assert await stored(engine, table, org, slug) != before, (table, slug)
        assert await stale(engine) == []
        employs = await stored(engine, "entity_relationship_types", org, "employs")
        await execute(
            engine,
            "UPDATE entity_relationship_types SET slug = 'works_for' "
            "WHERE organization_id = :o AND slug = 'employed_by'",
            o=org,
        )
        assert await stored(engine, "entity_relationship_types", org, "employs") != employs
        seniority = await stored(engine, "event_classifiers", org, "seniority")
        await execute(engine, "UPDATE watchers SET slug = 'mail' WHERE organization_id = :o", o=org)
        assert await stored(engine, "event_classifiers", org, "seniority") != seniority
        assert await stale(engine) == []

    async def test_a_hash_written_by_hand_is_put_right(
        self, engine: AsyncEngine, installed: Any
    ) -> None:
        org = installed.organization.id
        true_hash = await stored(engine, "entity_types", org, "company")
        await execute(
            engine,
            "UPDATE entity_types SET content_hash = 'forged' "
            "WHERE organization_id = :o AND slug = 'company'",
            o=org,
        )
        assert await stored(engine, "entity_types", org, "company") == true_hash
        await execute(
            engine,
            "INSERT INTO entity_types (organization_id, slug, name, content_hash) "
            "VALUES (:o, 'mine', 'Mine', 'forged')",
            o=org,
        )
        assert await stored(engine, "entity_types", org, "mine") != "forged"
        assert await stale(engine) == []

    async def test_fields_outside_the_content_leave_the_hash_alone(
        self, engine: AsyncEngine, installed: Any
    ) -> None:
        org = installed.organization.id
        before = await stored(engine, "watchers", org, "inbox")
        await execute(
            engine,
            "UPDATE watchers SET updated_at = now(), mirrored_at = now(), next_run_at = NULL "
            "WHERE organization_id = :o",
            o=org,
        )
        assert await stored(engine, "watchers", org, "inbox") == before


# Edits an organization (or an operator with SQL) could make, each one statement.
EDITS = {
    "rename a type": "UPDATE entity_types SET name = name || '!' WHERE organization_id = :o AND slug = 'company'",
    "describe a type": "UPDATE entity_types SET description = md5(random()::text) WHERE organization_id = :o",
    "new schema": """UPDATE entity_types SET metadata_schema = '{"type": "object", "x": 1}'
                     WHERE organization_id = :o AND slug = 'person'""",
    "reslug a type": """UPDATE entity_types SET slug = CASE slug WHEN 'person' THEN 'human'
                            WHEN 'human' THEN 'person' ELSE slug END
                        WHERE organization_id = :o AND slug IN ('person', 'human')""",
    "drop a rule": """DELETE FROM entity_relationship_type_rules
                      WHERE id = (SELECT min(id::text)::uuid FROM entity_relationship_type_rules
                                  WHERE organization_id = :o)""",
    "add a rule": """INSERT INTO entity_relationship_type_rules (organization_id,
                         relationship_type_id, source_entity_type_id, target_entity_type_id)
                     SELECT :o, r.id, e.id, e.id FROM entity_relationship_types r
                     JOIN entity_types e ON e.organization_id = r.organization_id
                     WHERE r.organization_id = :o ORDER BY random() LIMIT 1
                     ON CONFLICT DO NOTHING""",
    "unset an inverse": """UPDATE entity_relationship_types SET inverse_type_id = NULL
                           WHERE organization_id = :o AND slug = 'employs'""",
    "reslug a watcher": """UPDATE watchers SET slug = CASE slug WHEN 'inbox' THEN 'mail'
                               ELSE 'inbox' END WHERE organization_id = :o""",
    "new watcher version": """WITH v AS (
                                  INSERT INTO watcher_versions (id, organization_id, watcher_id,
                                      version, name, prompt, extraction_schema,
                                      sources_schema)
                                  SELECT gen_random_uuid(), w.organization_id, w.id,
                                         (SELECT max(version) + 1 FROM watcher_versions
                                          WHERE watcher_id = w.id), w.name, md5(random()::text),
                                         '{}', '{}'
                                  FROM watchers w WHERE w.organization_id = :o
                                  RETURNING id, watcher_id)
                              UPDATE watchers w SET current_version_id = v.id FROM v
                              WHERE w.id = v.watcher_id""",
    "classifier without type": """UPDATE event_classifiers SET entity_type_id = NULL
                                  WHERE organization_id = :o""",
    "archive everything": "UPDATE entity_types SET status = 'archived' WHERE organization_id = :o",
}


class TestAnySequenceOfEdits:
    @pytest.mark.allow_violations  # renames and archives break the install on purpose
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(edits=st.lists(st.sampled_from(sorted(EDITS)), min_size=1, max_size=6))
    async def test_the_stored_hash_is_always_the_contents(
        self, engine: AsyncEngine, installed: Any, edits: list[str]
    ) -> None:
        org = installed.organization.id
        for name in edits:
            await execute(engine, EDITS[name], o=org)
            assert await stale(engine) == [], name


class TestTheEngineWritesEachRowOnce:
    async def test_the_hash_the_engine_writes_is_already_true(
        self, engine: AsyncEngine, owner: Actor
    ) -> None:
        """The engine writes each row with the hash it will have, so the database's check
        finds nothing to put right: an install inserts its rows and updates none, an upgrade
        updates only the rows it changes, each once."""
        await publish_template(engine, small_doc())
        counts = """SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables
                    WHERE relname = ANY(:tables)"""

        async def written_by_an_install() -> dict[str, tuple[int, int]]:
            # Counted as a difference: the view also holds counts of the connection's earlier
            # transactions that are not yet flushed.
            async with transaction(engine) as session:
                before = {
                    r.relname: (r.n_tup_ins, r.n_tup_upd)
                    for r in await session.execute(text(counts), {"tables": list(TABLES)})
                }
                await installs.install(session, owner, template="starter")
                return {
                    r.relname: (r.n_tup_ins - before[r.relname][0],
                                r.n_tup_upd - before[r.relname][1])
                    for r in await session.execute(text(counts), {"tables": list(TABLES)})
                }  # fmt: skip

        assert await written_by_an_install() == {
            "entity_types": (2, 0),
            "entity_relationship_types": (3, 0),
            "event_classifiers": (1, 0),
            "watchers": (1, 1),  # its next run time, set after the write
        }
        # The org edits person's description; the release renames it: merged, written once.
        await execute(
            engine,
            "UPDATE entity_types SET description = 'Ours' WHERE slug = 'person' "
            "AND organization_id = (SELECT organization_id FROM agents "
            "                       WHERE template_agent_id IS NOT NULL)",
        )
        doc = small_doc()
        doc["entity_types"][0]["name"] = "Human"
        doc["watchers"][0]["prompt"] = "A new prompt."
        doc["relationship_types"][2]["rules"].append({"source": "company", "target": "company"})
        await publish_template(engine, doc)
        assert await written_by_an_install() == {
            "entity_types": (0, 1),  # person, merged
            "entity_relationship_types": (0, 1),  # knows, with its new rule
            "event_classifiers": (0, 0),
            "watchers": (0, 1),  # its new version (its schedule is the same)
        }
        assert await scalar(
            engine, "SELECT name || ' / ' || description FROM entity_types "
            "WHERE slug = 'person' AND managed_by_template_agent_id IS NOT NULL",
        ) == "Human / Ours"  # fmt: skip
