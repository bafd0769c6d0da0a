"""The HTTP API through the ASGI app: success paths, every documented error, authorization."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.db.session import transaction
from install_service.orgs.service import add_member, ensure_admin
from install_service.testing import (
    Seeded,
    bearer,
    make_org,
    make_user,
    publish_template,
    seeded_database,
)
from tests.conftest import dump, scalar, small_doc

Client = AsyncTestClient[Litestar]
ADMIN_TOKEN = "test-admin-token"  # noqa: S105


@pytest.fixture
def client(install_service_client: Client) -> Client:
    return install_service_client


@dataclass
class World:
    tokens: dict[str, str | None]
    install_id: str
    extra_email: str


async def build_world(engine: AsyncEngine) -> World:
    """starter (public) installed in acme; secret (private); one user per role."""
    await publish_template(engine, small_doc())
    await publish_template(engine, small_doc("secret", visibility="private"))
    async with transaction(engine) as session:
        await ensure_admin(session, ADMIN_TOKEN)
    owner, _, owner_token = await make_user(engine)
    admin, _, admin_token = await make_user(engine)
    member, _, member_token = await make_user(engine)
    _, _, stranger_token = await make_user(engine)
    _, extra, _ = await make_user(engine)
    org = await make_org(engine, owner=owner, slug="acme")
    async with transaction(engine) as session:
        await add_member(session, organization_id=org.id, user_id=admin.user_id, role="admin")
        await add_member(session, organization_id=org.id, user_id=member.user_id, role="member")
        from install_service.installs.service import install

        result = await install(session, owner, template="starter", organization="acme")
    return World(
        tokens={
            "anonymous": None,
            "non_member": stranger_token,
            "member": member_token,
            "admin": admin_token,
            "owner": owner_token,
            "platform_admin": ADMIN_TOKEN,
        },
        install_id=str(result.id),
        extra_email=extra.email,
    )


ROLES = ("anonymous", "non_member", "member", "admin", "owner", "platform_admin")
PUBLIC = dict.fromkeys(ROLES, 200)
MEMBERS = {"anonymous": 401, "non_member": 404, "member": 200, "admin": 200, "owner": 200}
MEMBERS["platform_admin"] = 200
MANAGERS = {**MEMBERS, "member": 403}
ADMINS = {role: 403 for role in ROLES} | {"anonymous": 401}

# (method, path, body, expected status per role). DELETE goes last: it changes the install.
MATRIX: list[tuple[str, str, Any, dict[str, int]]] = [
    ("GET", "/healthz", None, PUBLIC),
    ("GET", "/readyz", None, PUBLIC),
    ("GET", "/api/v1/templates", None, PUBLIC),
    ("GET", "/api/v1/templates/starter", None, PUBLIC),
    ("GET", "/api/v1/templates/starter/releases", None, PUBLIC),
    ("GET", "/api/v1/templates/starter/releases/1", None, PUBLIC),
    (
        "GET",
        "/api/v1/templates/secret",
        None,
        dict.fromkeys(ROLES, 404) | {"platform_admin": 200},
    ),
    ("POST", "/api/v1/installs", {"template": "starter", "organization": "acme"}, MANAGERS),
    (
        "POST",
        "/api/v1/installs",
        {"template": "starter", "organization": "acme", "dry_run": True},
        MANAGERS,
    ),
    ("GET", "/api/v1/installs/{install}", None, MEMBERS),
    ("GET", "/api/v1/installs/{install}/history", None, MEMBERS),
    ("GET", "/api/v1/installs/{install}/drift", None, MEMBERS),
    ("GET", "/api/v1/organizations/acme/installs", None, MEMBERS),
    ("POST", "/api/v1/installs/{install}/upgrade", {}, MANAGERS),
    (
        "POST",
        "/api/v1/admin/organizations",
        {"slug": "{unique}", "name": "New org"},
        ADMINS | {"platform_admin": 201},
    ),
    (
        "POST",
        "/api/v1/admin/users",
        {"email": "{unique}@example.com"},
        ADMINS | {"platform_admin": 201},
    ),
    (
        "POST",
        "/api/v1/admin/organizations/acme/members",
        {"email": "{extra}", "role": "member"},
        ADMINS | {"platform_admin": 201},
    ),
    ("PUT", "/api/v1/admin/templates/starter", small_doc(), ADMINS | {"platform_admin": 200}),
    (
        "POST",
        "/api/v1/admin/templates/starter/resync",
        {"dry_run": True},
        ADMINS | {"platform_admin": 200},
    ),
    ("POST", "/api/v1/admin/templates/starter/resync", {}, ADMINS | {"platform_admin": 202}),
    ("GET", "/api/v1/admin/resync-runs", None, ADMINS | {"platform_admin": 200}),
    ("POST", "/api/v1/installs/{install}/pin", {"reason": "hold"}, MANAGERS),
    ("DELETE", "/api/v1/installs/{install}/pin", None, MANAGERS),
    ("DELETE", "/api/v1/installs/{install}", None, MANAGERS),
]


def _fill(value: Any, world: World) -> Any:
    if isinstance(value, str):
        return (
            value.replace("{install}", world.install_id)
            .replace("{unique}", f"u-{uuid.uuid4().hex[:8]}")
            .replace("{extra}", world.extra_email)
        )
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    return value


class TestAuthorizationMatrix:
    @pytest.fixture(scope="class")
    @classmethod
    def install_service_template_database(
        cls, install_service_server_url: URL, install_service_template_database: str
    ) -> Iterator[Seeded[World]]:
        """Every case starts from its own copy of the world, built once for the class."""
        server, template = install_service_server_url, install_service_template_database
        with seeded_database(server, template, build_world) as seeded:
            yield seeded

    @pytest.fixture
    def world(self, install_service_template_database: Seeded[World]) -> World:
        return install_service_template_database.value

    @pytest.mark.parametrize(
        ("method", "path", "body", "expected"),
        MATRIX,
        ids=[f"{m} {p}" + (" dry_run" if b and b.get("dry_run") else "") for m, p, b, _ in MATRIX],
    )
    async def test_each_role_gets_its_status_and_refusals_change_nothing(
        self,
        engine: AsyncEngine,
        client: Client,
        world: World,
        method: str,
        path: str,
        body: Any,
        expected: dict[str, int],
    ) -> None:
        seen = {}
        for role in ROLES:
            token = world.tokens[role]
            before = await dump(engine)
            response = await client.request(
                method,
                _fill(path, world),
                json=_fill(body, world),
                headers=bearer(token) if token else {},
            )
            seen[role] = response.status_code
            if response.status_code >= 400:
                assert response.headers["content-type"] == "application/problem+json"
                assert response.json()["status"] == response.status_code
                assert response.json()["code"]
                assert await dump(engine) == before, f"{role} was refused but data changed"
        assert seen == expected


class TestInstallEndpoint:
    async def test_created_then_existing(self, engine: AsyncEngine, client: Client) -> None:
        await publish_template(engine, small_doc())
        _, user, token = await make_user(engine)
        first = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
        )
        assert first.status_code == 201
        body = first.json()
        assert body["created"] is True
        assert body["organization"]["slug"] == user.personal_organization.slug
        assert body["changes"]["entity_types"] == {
            "created": 2,
            "updated": 0,
            "unchanged": 0,
            "archived": 0,
            "adopted": 0,
            "detached": 0,
            "conflict": 0,
        }
        again = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
        )
        assert again.status_code == 200
        assert (again.json()["id"], again.json()["created"]) == (body["id"], False)
        assert (
            await scalar(engine, "SELECT count(*) FROM agents WHERE template_agent_id IS NOT NULL")
            == 1
        )

    async def test_conflict_is_409_listing_every_conflict(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        await publish_template(engine, small_doc())
        _, user, token = await make_user(engine)
        from tests.conftest import execute

        await execute(
            engine,
            """INSERT INTO entity_types (organization_id, slug, name) VALUES (:o, 'person', 'x'),
               (:o, 'company', 'y')""",
            o=user.personal_organization.id,
        )
        before = await dump(engine)
        response = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
        )
        assert response.status_code == 409
        body = response.json()
        assert body["code"] == "install_conflict"
        assert sorted(c["slug"] for c in body["conflicts"]) == ["company", "person"]
        assert await dump(engine) == before

    async def test_dry_run_upgrade_history_and_uninstall(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        _, _, token = await make_user(engine)
        install_id = (
            await client.post(
                "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
            )
        ).json()["id"]
        doc["watchers"][0]["prompt"] = "v2 prompt"
        await publish_template(engine, doc)

        plan = await client.post(
            f"/api/v1/installs/{install_id}/upgrade",
            json={"dry_run": True},
            headers=bearer(token),
        )
        assert plan.status_code == 200
        assert plan.json()["dry_run"] is True
        assert {
            "kind": "watchers",
            "slug": "inbox",
            "action": "update",
            "fields": [{"path": "/prompt", "outcome": "merged"}],
        } in plan.json()["items"]
        installed_versions = """SELECT count(*) FROM watcher_versions v
            JOIN agents a ON a.organization_id = v.organization_id WHERE a.id = :i"""
        assert await scalar(engine, installed_versions, i=install_id) == 1  # dry run wrote none

        upgraded = await client.post(
            f"/api/v1/installs/{install_id}/upgrade", json={}, headers=bearer(token)
        )
        assert upgraded.json()["action"] == "upgrade"
        assert upgraded.json()["version"] == 2
        assert await scalar(engine, installed_versions, i=install_id) == 2
        history = await client.get(f"/api/v1/installs/{install_id}/history", headers=bearer(token))
        assert [
            (e["action"], e["from_version"], e["to_version"]) for e in history.json()["items"]
        ] == [
            ("install", None, 1),
            ("upgrade", 1, 2),
        ]
        gone = await client.delete(f"/api/v1/installs/{install_id}", headers=bearer(token))
        assert gone.json()["status"] == "uninstalled"
        assert await scalar(engine, "SELECT status FROM agents WHERE id = :i", i=install_id) == (
            "uninstalled"
        )


class TestPeople:
    async def test_emails_are_one_address_whatever_their_case(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN_TOKEN)
        created = await client.post(
            "/api/v1/admin/users", json={"email": "Ada@Example.COM"}, headers=bearer(ADMIN_TOKEN)
        )
        assert created.json()["email"] == "ada@example.com"
        again = await client.post(
            "/api/v1/admin/users", json={"email": "ada@example.com"}, headers=bearer(ADMIN_TOKEN)
        )
        assert again.status_code == 409
        await make_org(engine, slug="acme")
        member = await client.post(
            "/api/v1/admin/organizations/acme/members",
            json={"email": "ADA@example.com", "role": "member"},
            headers=bearer(ADMIN_TOKEN),
        )
        assert member.status_code == 201
        assert await scalar(
            engine, "SELECT array_agg(email) FROM users WHERE email ILIKE 'ada@%'"
        ) == ["ada@example.com"]

    async def test_adding_a_member_again_changes_their_role(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        await publish_template(engine, small_doc())
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN_TOKEN)
        _, user, token = await make_user(engine)
        await make_org(engine, slug="acme")
        install = {"template": "starter", "organization": "acme"}
        for role, can_install in (("member", 403), ("admin", 201)):
            added = await client.post(
                "/api/v1/admin/organizations/acme/members",
                json={"user_id": str(user.id), "role": role},
                headers=bearer(ADMIN_TOKEN),
            )
            assert (added.status_code, added.json()["role"]) == (201, role)
            assert (
                await scalar(
                    engine,
                    "SELECT role FROM memberships WHERE user_id = :u AND organization_id = "
                    "(SELECT id FROM organizations WHERE slug = 'acme')",
                    u=user.id,
                )
                == role
            )
            installed = await client.post("/api/v1/installs", json=install, headers=bearer(token))
            assert installed.status_code == can_install


class TestErrors:
    async def test_malformed_json_and_unknown_fields_are_400(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        _, _, token = await make_user(engine)
        raw = await client.post(
            "/api/v1/installs",
            content=b"{not json",
            headers={**bearer(token), "content-type": "application/json"},
        )
        assert raw.status_code == 400
        unknown = await client.post(
            "/api/v1/installs", json={"template": "starter", "colour": 1}, headers=bearer(token)
        )
        assert unknown.status_code == 400
        assert unknown.json()["code"] == "invalid_request"
        assert "colour" in str(unknown.json()["errors"])
        wrong_type = await client.post(
            "/api/v1/installs",
            json={"template": "starter", "version": "two"},
            headers=bearer(token),
        )
        assert wrong_type.status_code == 400
        # Strings that read as a number or a boolean are still strings: refused, not coerced.
        await publish_template(engine, small_doc())
        before = await dump(engine)
        for body in (
            {"template": "starter", "version": "1"},
            {"template": "starter", "dry_run": "false"},
            {"template": 1},
        ):
            coerced = await client.post("/api/v1/installs", json=body, headers=bearer(token))
            assert (coerced.status_code, coerced.json()["code"]) == (400, "invalid_request"), body
            assert "Expected" in str(coerced.json()["errors"]), coerced.text
        assert await dump(engine) == before

    async def test_pattern_refusals_say_what_is_expected_in_words(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        """A slug, an email or a name that does not fit is explained, never shown as the
        regular expression it failed."""
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN_TOKEN)
        admin = bearer(ADMIN_TOKEN)
        before = await dump(engine)
        cases = [
            (
                "/api/v1/admin/organizations",
                {"slug": "Bad Slug", "name": "x"},
                "a slug (lower-case",
            ),
            ("/api/v1/admin/organizations", {"slug": "ok", "name": "a\nb"}, "without control"),
            ("/api/v1/admin/users", {"email": "not-an-email"}, "an email address"),
        ]
        for path, body, words in cases:
            refused = await client.post(path, json=body, headers=admin)
            assert refused.status_code == 400, refused.text
            messages = " ".join(e["message"] for e in refused.json()["errors"])
            assert words in messages, messages
            assert "regex" not in refused.text, refused.text
            assert "\\x00" not in refused.text, refused.text
        document = await client.put(
            "/api/v1/admin/templates/starter",
            json=small_doc(entity_types=[{"slug": "Not A Slug", "name": "X"}]),
            headers=admin,
        )
        assert document.status_code == 422, document.text
        assert "a slug (lower-case" in document.text
        assert "regex" not in document.text
        assert await dump(engine) == before

    async def test_bad_tokens_are_401(self, client: Client) -> None:
        for headers in (
            {"Authorization": "Bearer nope"},
            {"Authorization": "Basic abc"},
            {"Authorization": "Bearer "},
        ):
            response = await client.post("/api/v1/installs", json={}, headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"

    async def test_unknown_things_are_404(self, engine: AsyncEngine, client: Client) -> None:
        await publish_template(engine, small_doc())
        _, _, token = await make_user(engine)
        for method, path, body in (
            ("POST", "/api/v1/installs", {"template": "nope"}),
            ("POST", "/api/v1/installs", {"template": "starter", "organization": "nope"}),
            ("POST", "/api/v1/installs", {"template": "starter", "version": 99}),
            ("GET", f"/api/v1/installs/{uuid.uuid4()}", None),
            ("GET", "/api/v1/organizations/nope/installs", None),
            ("GET", "/api/v1/templates/nope", None),
            ("GET", "/api/v1/templates/starter/releases/5", None),
        ):
            response = await client.request(method, path, json=body, headers=bearer(token))
            assert response.status_code == 404, path
        bad_id = await client.get("/api/v1/installs/not-a-uuid", headers=bearer(token))
        assert bad_id.status_code in (400, 404)

    async def test_semantic_errors_are_422(self, engine: AsyncEngine, client: Client) -> None:
        await publish_template(engine, small_doc())
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN_TOKEN)
        into_template_org = await client.post(
            "/api/v1/installs",
            json={"template": "starter", "organization": "starter"},
            headers=bearer(ADMIN_TOKEN),
        )
        assert into_template_org.status_code == 422
        assert into_template_org.json()["code"] == "install_into_template_org"

        bad = small_doc()
        bad["relationship_types"][0]["rules"][0]["target"] = "ghost"
        bad["classifiers"][0]["watcher"] = "nowhere"
        before = await dump(engine)
        response = await client.put(
            "/api/v1/admin/templates/starter", json=bad, headers=bearer(ADMIN_TOKEN)
        )
        assert response.status_code == 422
        assert response.json()["code"] == "invalid_template_document"
        assert len(response.json()["problems"]) == 2
        mismatch = await client.put(
            "/api/v1/admin/templates/other", json=small_doc(), headers=bearer(ADMIN_TOKEN)
        )
        assert mismatch.status_code == 422
        assert await dump(engine) == before

    async def test_publish_new_release_is_201(self, engine: AsyncEngine, client: Client) -> None:
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN_TOKEN)
        first = await client.put(
            "/api/v1/admin/templates/starter", json=small_doc(), headers=bearer(ADMIN_TOKEN)
        )
        assert (first.status_code, first.json()["version"]) == (201, 1)
        same = await client.put(
            "/api/v1/admin/templates/starter", json=small_doc(), headers=bearer(ADMIN_TOKEN)
        )
        assert (same.status_code, same.json()["created"]) == (200, False)

    async def test_taken_slugs_and_emails_are_409(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN_TOKEN)
        for path, body in (
            ("/api/v1/admin/organizations", {"slug": "dup", "name": "Dup"}),
            ("/api/v1/admin/users", {"email": "dup@example.com"}),
        ):
            assert (
                await client.post(path, json=body, headers=bearer(ADMIN_TOKEN))
            ).status_code == 201
            again = await client.post(path, json=body, headers=bearer(ADMIN_TOKEN))
            assert again.status_code == 409

    async def test_body_over_the_limit_is_413(self, engine: AsyncEngine, client: Client) -> None:
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN_TOKEN)
        huge = small_doc(description="x" * (2 * 1024 * 1024))
        response = await client.put(
            "/api/v1/admin/templates/starter", json=huge, headers=bearer(ADMIN_TOKEN)
        )
        assert response.status_code == 413
        assert response.json()["code"] == "request_too_large"

    async def test_every_response_has_a_request_id(self, client: Client) -> None:
        response = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
        assert response.headers["x-request-id"] == "abc-123"
        generated = await client.get("/healthz")
        assert len(generated.headers["x-request-id"]) == 32


class TestResyncEndpoints:
    async def test_start_join_read_and_retry(self, engine: AsyncEngine, client: Client) -> None:
        await publish_template(engine, small_doc())
        async with transaction(engine) as session:
            await ensure_admin(session, ADMIN_TOKEN)
        _, _, token = await make_user(engine)
        await client.post("/api/v1/installs", json={"template": "starter"}, headers=bearer(token))

        started = await client.post(
            "/api/v1/admin/templates/starter/resync", json={}, headers=bearer(ADMIN_TOKEN)
        )
        assert started.status_code == 202
        run = started.json()
        assert (run["status"], run["created"], run["counts"]["pending"]) == ("queued", True, 1)
        assert (
            await scalar(engine, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo'")
            >= 1
        )

        joined = await client.post(
            "/api/v1/admin/templates/starter/resync", json={}, headers=bearer(ADMIN_TOKEN)
        )
        assert (joined.json()["id"], joined.json()["created"]) == (run["id"], False)
        different = await client.post(
            "/api/v1/admin/templates/starter/resync",
            json={"force": True},
            headers=bearer(ADMIN_TOKEN),
        )
        assert different.status_code == 409
        assert (different.json()["code"], different.json()["run_id"]) == (
            "resync_run_in_progress",
            run["id"],
        )

        read = await client.get(
            f"/api/v1/admin/resync-runs/{run['id']}", headers=bearer(ADMIN_TOKEN)
        )
        assert read.status_code == 200
        assert [(w["wave"], w["pending"]) for w in read.json()["waves"]] == [(1, 1)]
        assert "items" not in read.json()
        listed = await client.get(
            f"/api/v1/admin/resync-runs/{run['id']}/items", headers=bearer(ADMIN_TOKEN)
        )
        assert [i["status"] for i in listed.json()["items"]] == ["pending"]

        busy = await client.post(
            f"/api/v1/admin/resync-runs/{run['id']}/retry", headers=bearer(ADMIN_TOKEN)
        )
        assert (busy.status_code, busy.json()["code"]) == (409, "resync_run_in_progress")
        missing = await client.get(
            f"/api/v1/admin/resync-runs/{uuid.uuid4()}", headers=bearer(ADMIN_TOKEN)
        )
        assert missing.status_code == 404
        refused = await client.get(f"/api/v1/admin/resync-runs/{run['id']}", headers=bearer(token))
        assert refused.status_code == 403
        unknown_release = await client.post(
            "/api/v1/admin/templates/starter/resync",
            json={"version": 9},
            headers=bearer(ADMIN_TOKEN),
        )
        assert unknown_release.status_code == 404


class TestOperability:
    async def test_docs_page_is_served_with_local_assets(self, client: Client) -> None:
        page = await client.get("/docs")
        assert page.status_code == 200
        assert "/docs/assets/swagger-ui-bundle.js" in page.text
        assert "https://" not in page.text.split("<body")[0]
        asset = await client.get("/docs/assets/swagger-ui-bundle.js")
        assert asset.status_code == 200
        assert len(asset.content) > 100_000
        schema = (await client.get("/docs/openapi.json")).json()
        assert "/api/v1/installs" in schema["paths"]

    async def test_metrics_count_installs_by_outcome(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        await publish_template(engine, small_doc())
        _, _, token = await make_user(engine)
        await client.post("/api/v1/installs", json={"template": "starter"}, headers=bearer(token))
        text = (await client.get("/metrics")).text
        assert 'install_service_installs_total{action="install",outcome="ok"}' in text
        assert "install_service_install_seconds_bucket" in text
