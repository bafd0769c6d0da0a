"""What another service's integration tests look like with the install_service plugin."""

from __future__ import annotations

from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.testing import (
    add_membership,
    bearer,
    install_template,
    make_org,
    make_user,
    publish_template,
)

# The template this service depends on, kept next to its tests.
CRM = {
    "slug": "crm-lite",
    "name": "CRM lite",
    "entity_types": [
        {"slug": "contact", "name": "Contact"},
        {"slug": "company", "name": "Company"},
    ],
    "relationship_types": [
        {
            "slug": "works_at",
            "name": "Works at",
            "rules": [{"source": "contact", "target": "company"}],
        }
    ],
    "watchers": [
        {"slug": "inbox", "name": "Inbox", "prompt": "Find contacts in email signatures."}
    ],
}


async def test_an_org_with_the_template_installed(install_service_engine: AsyncEngine) -> None:
    await publish_template(install_service_engine, CRM)
    owner, _, _ = await make_user(install_service_engine)
    org = await make_org(install_service_engine, owner=owner, slug="acme")

    result = await install_template(install_service_engine, owner, "crm-lite", "acme")

    assert result.created
    async with install_service_engine.connect() as conn:
        slugs = await conn.scalars(
            text("SELECT slug FROM entity_types WHERE organization_id = :org ORDER BY slug"),
            {"org": org.id},
        )
        assert list(slugs) == ["company", "contact"]


async def test_members_use_the_http_api(
    install_service_engine: AsyncEngine, install_service_client: AsyncTestClient[Litestar]
) -> None:
    await publish_template(install_service_engine, CRM)
    owner, _, _ = await make_user(install_service_engine)
    member, _, member_token = await make_user(install_service_engine)
    org = await make_org(install_service_engine, owner=owner)
    await add_membership(install_service_engine, org, member, role="member")
    installed = await install_template(install_service_engine, owner, "crm-lite", org.slug)

    listed = await install_service_client.get(
        f"/api/v1/organizations/{org.slug}/installs", headers=bearer(member_token)
    )
    assert listed.status_code == 200
    assert [i["id"] for i in listed.json()["items"]] == [str(installed.id)]

    refused = await install_service_client.post(
        "/api/v1/installs",
        json={"template": "crm-lite", "organization": org.slug},
        headers=bearer(member_token),
    )
    assert refused.status_code == 403


async def test_each_test_gets_a_fresh_database(install_service_engine: AsyncEngine) -> None:
    async with install_service_engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM organizations")) == 0
