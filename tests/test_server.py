"""The real server process (`install-service serve`) driven over loopback HTTP."""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.testing import bearer
from tests.conftest import SERVER_TOKEN, scalar


class TestRealServer:
    async def test_fifty_concurrent_identical_installs(
        self, server: str, install_service_engine: AsyncEngine
    ) -> None:
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            created = await client.post(
                "/api/v1/admin/users",
                json={"email": "ada@example.com"},
                headers=bearer(SERVER_TOKEN),
            )
            assert created.status_code == 201
            token = created.json()["token"]

            responses = await asyncio.gather(
                *(
                    client.post(
                        "/api/v1/installs",
                        json={"template": "personal-finance", "with_requirements": True},
                        headers=bearer(token),
                    )
                    for _ in range(50)
                )
            )
            statuses = sorted(r.status_code for r in responses)
            assert statuses == [200] * 49 + [201]
            assert len({r.json()["id"] for r in responses}) == 1

            install_id = responses[0].json()["id"]
            history = await client.get(
                f"/api/v1/installs/{install_id}/history", headers=bearer(token)
            )
            assert [e["action"] for e in history.json()["items"]] == ["install"]

        engine = install_service_engine
        org = created.json()["personal_organization"]["id"]
        # One install of personal-finance, and one of business-core that came with it.
        assert (
            await scalar(engine, "SELECT count(*) FROM agents WHERE organization_id=:o", o=org) == 2
        )
        assert (
            await scalar(
                engine, "SELECT count(*) FROM entity_types WHERE organization_id=:o", o=org
            )
            == 17 + 1
        )

    async def test_bundled_templates_are_published_at_start(self, server: str) -> None:
        async with httpx.AsyncClient(base_url=server) as client:
            listed = (await client.get("/api/v1/templates")).json()["items"]
        assert {t["slug"] for t in listed} >= {
            "business-core",
            "personal-finance",
            "sales-crm",
            "hiring-pipeline",
        }
