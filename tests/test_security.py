"""Hostile strings are stored verbatim, never executed; tokens are stored only as hashes."""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.db.session import transaction
from install_service.orgs.service import ensure_admin, hash_token
from install_service.testing import bearer
from tests.conftest import TABLES, execute, rows, scalar, small_doc

SQL = "x'); DROP TABLE entity_types; --"
ADMIN = "security-admin-token"


def poisoned(value: Any) -> Any:
    """Every string of a document (but slugs and keys the schema constrains) gets SQL in it."""
    if isinstance(value, dict):
        return {
            k: v
            if k
            in (
                "slug",
                "source",
                "target",
                "inverse",
                "entity_type",
                "watcher",
                "attribute_key",
                "visibility",
                "fallback_value",
                "type",
                "schedule",  # a cron expression, checked at publish
            )
            else poisoned(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [poisoned(v) for v in value]
    if isinstance(value, str):
        return value + " " + SQL
    return value


class TestHostileStrings:
    async def test_sql_in_every_string_field_is_stored_verbatim(
        self, engine: AsyncEngine, install_service_client: AsyncTestClient[Litestar]
    ) -> None:
        client = install_service_client
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN)
        doc = poisoned(small_doc())
        published = await client.put(
            "/api/v1/admin/templates/starter", json=doc, headers=bearer(ADMIN)
        )
        assert published.status_code == 201, published.text
        user = await client.post(
            "/api/v1/admin/users",
            json={"email": "o'brien@example.com", "name": SQL},
            headers=bearer(ADMIN),
        )
        assert user.status_code == 201
        org = await client.post(
            "/api/v1/admin/organizations",
            json={"slug": "acme", "name": SQL},
            headers=bearer(ADMIN),
        )
        assert org.status_code == 201
        installed = await client.post(
            "/api/v1/installs",
            json={"template": "starter"},
            headers=bearer(user.json()["token"]),
        )
        assert installed.status_code == 201

        org_id = user.json()["personal_organization"]["id"]
        names = dict(
            await rows(
                engine, "SELECT slug, name FROM entity_types WHERE organization_id = :o", o=org_id
            )
        )
        assert names == {"person": f"Person {SQL}", "company": f"Company {SQL}"}
        prompt = await scalar(
            engine, "SELECT prompt FROM watcher_versions WHERE organization_id = :o", o=org_id
        )
        assert prompt == f"Find people and companies. {SQL}"
        assert await scalar(engine, "SELECT name FROM organizations WHERE slug = 'acme'") == SQL
        assert (
            await scalar(engine, "SELECT name FROM users WHERE email = 'o''brien@example.com'")
            == SQL
        )
        for table in TABLES:  # nothing was dropped
            assert await scalar(engine, f"SELECT count(*) >= 0 FROM {table}")

    async def test_sql_in_path_and_query_is_just_a_name(
        self, engine: AsyncEngine, install_service_client: AsyncTestClient[Litestar]
    ) -> None:
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN)
        for path in (
            "/api/v1/templates/x';DROP TABLE agents;--",
            "/api/v1/organizations/x' OR '1'='1/installs",
        ):
            response = await install_service_client.get(path, headers=bearer(ADMIN))
            assert response.status_code == 404
        assert await scalar(engine, "SELECT count(*) FROM agents") == 0


class TestTokens:
    async def test_only_hashes_are_stored(
        self, engine: AsyncEngine, install_service_client: AsyncTestClient[Litestar]
    ) -> None:
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN)
        created = await install_service_client.post(
            "/api/v1/admin/users", json={"email": "ada@example.com"}, headers=bearer(ADMIN)
        )
        token = created.json()["token"]
        stored = [r[0] for r in await rows(engine, "SELECT token_hash FROM api_tokens")]
        assert hash_token(token) in stored
        assert token not in stored
        dumped = await rows(engine, "SELECT to_jsonb(t)::text FROM api_tokens t")
        assert all(token not in r[0] and ADMIN not in r[0] for r in dumped)

    async def test_revoked_token_is_refused_on_the_next_request(
        self, engine: AsyncEngine, install_service_client: AsyncTestClient[Litestar]
    ) -> None:
        client = install_service_client
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN)
        created = await client.post(
            "/api/v1/admin/users", json={"email": "ada@example.com"}, headers=bearer(ADMIN)
        )
        token = created.json()["token"]
        installs = (
            f"/api/v1/organizations/{created.json()['personal_organization']['slug']}/installs"
        )
        assert (await client.get(installs, headers=bearer(token))).status_code == 200

        await execute(
            engine,
            "UPDATE api_tokens SET revoked_at = now() WHERE token_hash = :h",
            h=hash_token(token),
        )

        refused = await client.get(installs, headers=bearer(token))
        assert refused.status_code == 401
        assert refused.json()["code"] == "invalid_token"
        # Only that token: the admin's still works.
        assert (await client.get(installs, headers=bearer(ADMIN))).status_code == 200
