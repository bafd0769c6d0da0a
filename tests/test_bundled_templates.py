"""Every bundled template publishes, installs into a fresh org, and re-installs as a no-op."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.testing import install_template, make_user, publish_template
from tests.conftest import TEMPLATES, dump

BUNDLED = sorted(p.name for p in TEMPLATES.iterdir() if (p / "template.yaml").is_file())


def test_all_three_are_bundled() -> None:
    assert BUNDLED == ["hiring-pipeline", "personal-finance", "sales-crm"]


@pytest.mark.parametrize("name", BUNDLED)
async def test_publish_install_reinstall(engine: AsyncEngine, name: str) -> None:
    published = await publish_template(engine, TEMPLATES / name)
    assert (published.created, published.version) == (True, 1)
    actor, user, _ = await make_user(engine)

    first = await install_template(engine, actor, name)
    assert first.created
    for kind, counts in published.changes.items():
        assert first.changes[kind].created == counts["created"] > 0

    before = await dump(engine)
    again = await install_template(engine, actor, name)
    assert (again.id, again.created, again.action) == (first.id, False, "none")
    assert await dump(engine) == before

    async with engine.connect() as conn:
        drifted = await conn.scalar(
            text("""SELECT count(*) FROM entity_types WHERE organization_id = :o
                    AND mirrored_hash IS NULL"""),
            {"o": user.personal_organization.id},
        )
    assert drifted == 0
