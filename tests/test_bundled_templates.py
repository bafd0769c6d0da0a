"""Every bundled template publishes (after what it requires), installs into a fresh org with its
requirements, and re-installs as a no-op; all of them install together into one org."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import Actor
from install_service.db.session import transaction
from install_service.errors import Conflict, TemplateDocumentInvalid
from install_service.installs import service as installs
from install_service.templates import documents
from install_service.templates.schemas import PublishResult, TemplateDocument
from install_service.testing import install_template, make_org, make_user, publish_template
from tests.conftest import TEMPLATES, dump, install_ids, rows, scalar

BUNDLED = sorted(p.name for p in TEMPLATES.iterdir() if (p / "template.yaml").is_file())
# In the order `serve` seeds them: requirements first.
ORDERED = [document for _, document in documents.load_directory(TEMPLATES)]


def test_all_four_are_bundled() -> None:
    assert BUNDLED == ["business-core", "hiring-pipeline", "personal-finance", "sales-crm"]


def test_what_each_requires() -> None:
    requires = {d.slug: [(r.template, r.version) for r in d.requires] for d in ORDERED}
    assert requires == {
        "business-core": [],
        "hiring-pipeline": [("business-core", None)],
        "personal-finance": [("business-core", None)],
        "sales-crm": [("business-core", None)],
    }


def test_requirements_are_published_before_their_dependents() -> None:
    assert ORDERED[0].slug == "business-core"
    position = {d.slug: index for index, d in enumerate(ORDERED)}
    for document in ORDERED:
        for requirement in document.requires:
            assert position[requirement.template] < position[document.slug]


def test_requirement_order_ignores_the_order_given_and_refuses_a_cycle() -> None:
    def doc(slug: str, *requires: str) -> tuple[Path, TemplateDocument]:
        data = {"slug": slug, "name": slug, "requires": [{"template": r} for r in requires]}
        return Path(slug), documents.parse(data)

    given = [doc("zeta", "beta"), doc("alpha"), doc("beta", "alpha"), doc("gamma")]
    ordered = documents.requirement_order(given)
    # Each after what it requires; otherwise as given.
    assert [d.slug for _, d in ordered] == ["alpha", "beta", "zeta", "gamma"]
    with pytest.raises(TemplateDocumentInvalid) as refused:
        documents.requirement_order([doc("a", "b"), doc("b", "a")])
    assert "requirements make a cycle" in refused.value.problems[0]["message"]


def with_requirements(name: str) -> list[TemplateDocument]:
    """The bundled template `name` and every bundled template it requires, requirements first."""
    needed = {name}
    for document in reversed(ORDERED):
        if document.slug in needed:
            needed |= {r.template for r in document.requires}
    return [d for d in ORDERED if d.slug in needed]


async def publish_all(engine: AsyncEngine, found: list[TemplateDocument]) -> PublishResult:
    """Publish `found` in its order; the last one's result."""
    for document in found:
        published = await publish_template(engine, document)
        assert (published.created, published.version) == (True, 1)
    return published


@pytest.mark.parametrize("name", BUNDLED)
async def test_publish_install_reinstall(engine: AsyncEngine, name: str) -> None:
    published = await publish_all(engine, with_requirements(name))
    actor, user, _ = await make_user(engine)

    first = await install_template(engine, actor, name, with_requirements=True)
    assert first.created
    for kind, counts in published.changes.items():
        assert first.changes[kind].created == counts["created"]
    assert sum(c.created for c in first.changes.values()) > 0

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


async def test_every_bundled_template_installs_into_one_org(
    engine: AsyncEngine, owner: Actor
) -> None:
    await publish_all(engine, ORDERED)
    org = await make_org(engine, owner=owner)
    # The first dependent brings business-core with it; the others find it installed.
    await install_template(engine, owner, "sales-crm", org.slug, with_requirements=True)
    await install_template(engine, owner, "hiring-pipeline", org.slug, with_requirements=True)
    await install_template(engine, owner, "personal-finance", org.slug)
    again = await install_template(engine, owner, "business-core", org.slug)
    assert again.action == "none"

    installed = await rows(
        engine,
        """SELECT q.slug, a.status, r.version FROM agents a
           JOIN agents t ON t.id = a.template_agent_id
           JOIN organizations q ON q.id = t.organization_id
           JOIN template_releases r ON r.id = a.installed_release_id
           WHERE a.organization_id = :org ORDER BY q.slug""",
        org=org.id,
    )
    assert [(r.slug, r.status, r.version) for r in installed] == [
        (slug, "active", 1) for slug in BUNDLED
    ]

    # One company for the whole org, managed by business-core's install; every dependent's
    # rules that name it point at that row.
    targets = await rows(
        engine,
        """SELECT t.slug AS rel, e.id, e.organization_id = :org AS same_org, e.status,
                  q.slug AS managed_by, i.status AS install_status
           FROM entity_relationship_type_rules x
           JOIN entity_relationship_types t ON t.id = x.relationship_type_id
           JOIN entity_types e ON e.id = x.target_entity_type_id
           JOIN agents i ON i.organization_id = e.organization_id
                        AND i.template_agent_id = e.managed_by_template_agent_id
           JOIN agents m ON m.id = e.managed_by_template_agent_id
           JOIN organizations q ON q.id = m.organization_id
           WHERE t.organization_id = :org
             AND t.slug IN ('works_at', 'employed_by', 'employed_at')""",
        org=org.id,
    )
    assert sorted(r.rel for r in targets) == ["employed_at", "employed_by", "works_at"]
    company = await scalar(
        engine,
        "SELECT id FROM entity_types WHERE organization_id = :org AND slug = 'company'",
        org=org.id,
    )
    for target in targets:
        assert (target.id, target.same_org, target.status) == (company, True, "active")
        assert (target.managed_by, target.install_status) == ("business-core", "active")
    # The renamed stage link: sales-crm's in_stage and hiring-pipeline's at_stage side by side.
    stages = await rows(
        engine,
        """SELECT t.slug, q.slug AS template FROM entity_relationship_types t
           JOIN agents m ON m.id = t.managed_by_template_agent_id
           JOIN organizations q ON q.id = m.organization_id
           WHERE t.organization_id = :org AND t.slug IN ('in_stage', 'at_stage')
           ORDER BY t.slug""",
        org=org.id,
    )
    assert [(r.slug, r.template) for r in stages] == [
        ("at_stage", "hiring-pipeline"),
        ("in_stage", "sales-crm"),
    ]

    # business-core stays while the others require it.
    core_install = (await install_ids(engine, org.id))["business-core"]
    before = await dump(engine)
    with pytest.raises(Conflict) as refused:
        async with transaction(engine) as session:
            await installs.uninstall(session, owner, core_install)
    assert refused.value.code == "required_by"
    assert sorted(d["template"] for d in refused.value.extra["required_by"]) == [
        "hiring-pipeline",
        "personal-finance",
        "sales-crm",
    ]
    assert await dump(engine) == before
