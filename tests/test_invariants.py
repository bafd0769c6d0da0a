"""The invariant checker (`install-service db check`) finds each kind of corruption."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.installs import invariants
from install_service.installs.schemas import InstallResult
from install_service.testing import install_template, publish_template
from tests.conftest import execute, small_doc


async def delete_knows(engine: AsyncEngine, org: object) -> None:
    """Delete the managed relationship type `knows` (and its rules) behind the service's back."""
    await execute(
        engine,
        """WITH gone AS (
               DELETE FROM entity_relationship_type_rules r USING entity_relationship_types t
               WHERE r.relationship_type_id = t.id AND t.organization_id = :o
                 AND t.slug = 'knows' RETURNING 1)
           SELECT count(*) FROM gone""",
        o=org,
    )
    await execute(
        engine,
        "DELETE FROM entity_relationship_types WHERE organization_id = :o AND slug = 'knows'",
        o=org,
    )


async def run_check(env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "install_service",
        "db",
        "check",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    stdout, _ = await process.communicate()
    return process.returncode or 0, stdout.decode()


async def found(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with transaction(engine) as session:
        return [(v.check, v.detail) for v in await invariants.check(session)]


@pytest.fixture
async def installed(engine: AsyncEngine, owner: Actor) -> InstallResult:
    await publish_template(engine, small_doc())
    return await install_template(engine, owner, "starter")


class TestEachCheckFindsItsViolation:
    async def test_healthy_database_has_none(
        self, engine: AsyncEngine, installed: InstallResult
    ) -> None:
        assert await found(engine) == []

    @pytest.mark.allow_violations
    async def test_duplicate_install(self, engine: AsyncEngine, installed: InstallResult) -> None:
        await execute(
            engine,
            "ALTER TABLE agents DROP CONSTRAINT uq_agents_template_agent_id_organization_id",
        )
        await execute(
            engine,
            """INSERT INTO agents (organization_id, slug, name, template_agent_id)
               SELECT organization_id, slug, name, template_agent_id FROM agents WHERE id = :i""",
            i=installed.id,
        )
        checks = {check for check, _ in await found(engine)}
        assert "duplicate_install" in checks

    @pytest.mark.allow_violations
    async def test_current_version_of_another_watcher(
        self, engine: AsyncEngine, installed: InstallResult
    ) -> None:
        await execute(
            engine,
            """UPDATE watchers SET current_version_id = (
                   SELECT v.id FROM watcher_versions v WHERE v.organization_id <> :o LIMIT 1)
               WHERE organization_id = :o""",
            o=installed.organization.id,
        )
        assert await found(engine) == [
            ("current_version_elsewhere", "watcher inbox: current version belongs elsewhere")
        ]

    @pytest.mark.allow_violations
    async def test_version_gap(self, engine: AsyncEngine, installed: InstallResult) -> None:
        await execute(
            engine,
            """INSERT INTO watcher_versions (organization_id, watcher_id, version, name, prompt,
                                             extraction_schema, sources_schema)
               SELECT organization_id, id, 3, name, 'skipped two', '{}', '{}'
               FROM watchers WHERE organization_id = :o""",
            o=installed.organization.id,
        )
        ((check, detail),) = await found(engine)
        assert check == "version_gap"
        assert detail.endswith("versions 1,3 are not 1..n")

    @pytest.mark.allow_violations
    async def test_rows_that_do_not_match_the_release(
        self, engine: AsyncEngine, installed: InstallResult
    ) -> None:
        org = installed.organization.id
        await execute(
            engine,
            """INSERT INTO entity_types (organization_id, slug, name, managed_by_template_agent_id)
               SELECT :o, 'stray', 'Stray', managed_by_template_agent_id FROM entity_types
               WHERE organization_id = :o LIMIT 1""",
            o=org,
        )
        await execute(
            engine,
            "UPDATE watchers SET status = 'archived' WHERE organization_id = :o",
            o=org,
        )
        await delete_knows(engine, org)
        assert sorted(await found(engine)) == [
            ("release_mismatch", "extra entity_types stray"),
            ("release_mismatch", "missing relationship_types knows"),
            ("release_mismatch", "wrong status: watchers inbox is archived in a active install"),
        ]

    @pytest.mark.allow_violations
    async def test_release_items_that_differ_from_the_snapshot(
        self, engine: AsyncEngine, installed: InstallResult
    ) -> None:
        await execute(engine, "ALTER TABLE template_release_items DISABLE TRIGGER USER")
        await execute(
            engine,
            """UPDATE template_release_items SET content_hash = repeat('0', 64)
               WHERE kind = 'watchers' AND slug = 'inbox'""",
        )
        await execute(
            engine,
            "DELETE FROM template_release_items WHERE kind = 'entity_types' AND slug = 'person'",
        )
        violations = await found(engine)
        details = sorted(d.split(": ", 1)[1] for c, d in violations if c == "release_items")
        assert details == [
            "entity_types person has no item",
            "watchers inbox differs from the snapshot",
        ]
        # ... and the disabled triggers that let it happen are violations of their own.
        assert sorted(d for c, d in violations if c == "append_only") == [
            f"template_release_items no longer refuses {op}"
            for op in ("DELETE", "TRUNCATE", "UPDATE")
        ]


class TestCommand:
    @pytest.mark.allow_violations
    async def test_exit_status_tells_healthy_from_broken(
        self,
        engine: AsyncEngine,
        installed: InstallResult,
        install_service_database_url: URL,
    ) -> None:
        env = {
            **os.environ,
            "INSTALL_SERVICE_DATABASE_URL": install_service_database_url.render_as_string(
                hide_password=False
            ),
        }
        status, output = await run_check(env)
        assert (status, output.strip()) == (0, "[]")

        await delete_knows(engine, installed.organization.id)
        status, output = await run_check(env)
        assert status == 1
        assert "missing relationship_types knows" in output
