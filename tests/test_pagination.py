"""Every paginated endpoint: walking the cursors while rows are added sees each row that existed
at the start exactly once; limits and cursors are validated."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import SYSTEM, Actor
from install_service.config import WebhookSettings
from install_service.db.session import transaction
from install_service.events import webhooks
from install_service.events.schemas import WebhookCreate
from install_service.installs import service as installs
from install_service.orgs import service as orgs
from install_service.orgs import tokens
from install_service.orgs.service import ensure_admin
from install_service.testing import (
    Seeded,
    bearer,
    install_template,
    make_org,
    make_user,
    publish_template,
    seeded_database,
)
from tests.conftest import dump, emit_event, small_doc

Client = AsyncTestClient[Litestar]
ADMIN = "pagination-admin-token"
_numbers = itertools.count()


@dataclass
class World:
    engine: AsyncEngine
    owner: Actor
    token: str
    install_id: uuid.UUID
    webhook_id: uuid.UUID


async def _template(world: World) -> None:
    await publish_template(world.engine, small_doc(f"t{uuid.uuid4().hex[:8]}"))


async def _release(world: World) -> None:
    await publish_template(world.engine, small_doc(description=f"release {next(_numbers)}"))


async def _org_install(world: World) -> None:
    slug = f"t{uuid.uuid4().hex[:8]}"
    doc = {"slug": slug, "name": slug, "entity_types": [{"slug": slug, "name": slug}]}
    await publish_template(world.engine, doc)
    await install_template(world.engine, world.owner, slug, "acme")


async def _history(world: World) -> None:
    async with transaction(world.engine) as session:
        await installs.uninstall(session, world.owner, world.install_id)
    await install_template(world.engine, world.owner, "starter", "acme")


async def _member(world: World) -> None:
    _, user, _ = await make_user(world.engine, f"{uuid.uuid4().hex[:8]}@example.com")
    async with transaction(world.engine) as session:
        org = await orgs.resolve_org(session, SYSTEM, "acme")
        await orgs.add_member(session, organization_id=org.id, user_id=user.id, role="member")


async def _user(world: World) -> None:
    await make_user(world.engine, f"{uuid.uuid4().hex[:8]}@example.com")


async def _org(world: World) -> None:
    await make_org(world.engine, slug=f"o{uuid.uuid4().hex[:8]}")


async def _token(world: World) -> None:
    async with transaction(world.engine) as session:
        await tokens.create_token(session, world.owner, name=f"n{next(_numbers)}")


async def _webhook(world: World) -> None:
    async with transaction(world.engine) as session:
        await webhooks.create_endpoint(
            session, SYSTEM, WebhookCreate(url="https://93.184.216.34/hooks"), WebhookSettings()
        )


async def _delivery(world: World) -> None:
    async with transaction(world.engine) as session:
        org = await orgs.resolve_org(session, SYSTEM, "acme")
        for _ in range(2):
            await emit_event(session, org.id)


async def _watcher(world: World) -> None:
    async with transaction(world.engine) as session:
        org = await orgs.resolve_org(session, SYSTEM, "acme")
        await session.execute(
            text("INSERT INTO watchers (organization_id, slug, name) VALUES (:o, :s, 'W')"),
            {"o": org.id, "s": f"w{uuid.uuid4().hex[:8]}"},
        )


# (path, whose token reads it, what adds a row to it, the field that identifies a row)
LISTS: list[tuple[str, str, Callable[[World], Awaitable[None]], str]] = [
    ("/api/v1/templates", "owner", _template, "slug"),
    ("/api/v1/templates/starter/releases", "owner", _release, "version"),
    ("/api/v1/organizations/acme/installs", "owner", _org_install, "id"),
    ("/api/v1/installs/{install}/history", "owner", _history, "id"),
    ("/api/v1/organizations/acme/members", "owner", _member, "email"),
    ("/api/v1/admin/users", "admin", _user, "email"),
    ("/api/v1/admin/organizations", "admin", _org, "slug"),
    ("/api/v1/tokens", "owner", _token, "id"),
    ("/api/v1/admin/users/{owner_email}/tokens", "admin", _token, "id"),
    ("/api/v1/admin/audit", "admin", _org, "id"),
    ("/api/v1/admin/webhooks", "admin", _webhook, "id"),
    ("/api/v1/admin/webhooks/{webhook}/deliveries", "admin", _delivery, "id"),
    ("/api/v1/organizations/acme/watchers", "owner", _watcher, "slug"),
]


async def build_world(engine: AsyncEngine) -> World:
    async with transaction(engine) as session:
        await ensure_admin(session, ADMIN)
    await publish_template(engine, small_doc())
    owner, _, token = await make_user(engine, "owner@example.com")
    await make_org(engine, owner=owner, slug="acme")
    installed = await install_template(engine, owner, "starter", "acme")
    assert installed.id is not None
    async with transaction(engine) as session:
        webhook = await webhooks.create_endpoint(
            session, SYSTEM, WebhookCreate(url="https://93.184.216.34/x"), WebhookSettings()
        )
    return World(
        engine=engine, owner=owner, token=token, install_id=installed.id, webhook_id=webhook.id
    )


@pytest.fixture(scope="module")
def install_service_template_database(
    install_service_server_url: URL, install_service_template_database: str
) -> Iterator[Seeded[World]]:
    """Every test starts from its own copy of the world, built once for the module."""
    server, template = install_service_server_url, install_service_template_database
    with seeded_database(server, template, build_world) as seeded:
        yield seeded


@pytest.fixture
def world(engine: AsyncEngine, install_service_template_database: Seeded[World]) -> World:
    return dataclasses.replace(install_service_template_database.value, engine=engine)


def _fill(path: str, world: World) -> str:
    return (
        path.replace("{install}", str(world.install_id))
        .replace("{owner_email}", "owner@example.com")
        .replace("{webhook}", str(world.webhook_id))
    )


class TestWalkingWhileRowsAreAdded:
    @pytest.mark.parametrize(("path", "reader", "add", "key"), LISTS, ids=[e[0] for e in LISTS])
    async def test_every_row_that_existed_is_seen_exactly_once(
        self,
        install_service_client: Client,
        world: World,
        path: str,
        reader: str,
        add: Callable[[World], Awaitable[None]],
        key: str,
    ) -> None:
        client = install_service_client
        headers = bearer(world.token if reader == "owner" else ADMIN)
        url = _fill(path, world)
        for _ in range(3):  # several pages' worth at limit=2
            await add(world)
        at_start = (await client.get(url, params={"limit": 200}, headers=headers)).json()
        assert at_start["next_cursor"] is None
        existing = [item[key] for item in at_start["items"]]
        assert len(existing) >= 4

        seen: list[Any] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = await client.get(url, params=params, headers=headers)
            assert page.status_code == 200, page.text
            body = page.json()
            assert len(body["items"]) <= 2
            seen += [item[key] for item in body["items"]]
            pages += 1
            if pages <= len(existing):  # rows land while the caller is between pages
                await add(world)
            cursor = body["next_cursor"]
            if cursor is None:
                break
            assert pages < 10 * len(existing), "the walk does not end"
        assert pages >= 2
        counts = Counter(seen)
        assert [k for k in existing if counts[k] != 1] == []
        assert max(counts.values()) == 1


class TestBadPageParameters:
    @pytest.mark.parametrize(
        "params",
        [{"limit": 201}, {"limit": 0}, {"limit": -1}, {"limit": "many"}],
        ids=["over", "zero", "negative", "text"],
    )
    async def test_limit_out_of_range_is_400(
        self, install_service_client: Client, world: World, params: dict[str, Any]
    ) -> None:
        response = await install_service_client.get(
            "/api/v1/admin/users", params=params, headers=bearer(ADMIN)
        )
        assert (response.status_code, response.json()["code"]) == (400, "invalid_request")

    @pytest.mark.parametrize(
        "cursor",
        ["garbage", "!!!", "éé", "W10", "x" * 1001],
        ids=["text", "symbols", "utf8", "empty", "long"],
    )
    async def test_malformed_cursor_is_400(
        self, install_service_client: Client, world: World, cursor: str
    ) -> None:
        before = await dump(world.engine)
        response = await install_service_client.get(
            "/api/v1/admin/users", params={"cursor": cursor}, headers=bearer(ADMIN)
        )
        assert response.status_code == 400
        assert response.json()["code"] in ("invalid_cursor", "invalid_request")
        assert await dump(world.engine) == before

    async def test_a_cursor_of_another_list_is_400(
        self, install_service_client: Client, world: World
    ) -> None:
        client = install_service_client
        orgs_page = await client.get(
            "/api/v1/admin/organizations", params={"limit": 1}, headers=bearer(ADMIN)
        )
        cursor = orgs_page.json()["next_cursor"]
        assert cursor
        response = await client.get(
            "/api/v1/admin/users", params={"cursor": cursor}, headers=bearer(ADMIN)
        )
        assert (response.status_code, response.json()["code"]) == (400, "invalid_cursor")


def _forge(cursor: str, position: int, value: Any) -> str:
    """A cursor of the same list with one value of its key replaced."""
    name, values = json.loads(base64.urlsafe_b64decode(cursor + "=="))
    values[position] = value
    return base64.urlsafe_b64encode(json.dumps([name, values]).encode()).decode().rstrip("=")


def _unrepresentable(value: Any) -> list[Any]:
    """Values of the same JSON type that the database could not compare with the key."""
    if isinstance(value, int):
        return [2**63, -(2**63) - 1, 10**30]
    if isinstance(value, str) and "T" in value and value[:4].isdigit():  # a time
        return ["2026-01-01T00:00:00", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]
    if isinstance(value, str):
        try:
            uuid.UUID(value)
        except ValueError:
            return ["with\x00nul"]
        return [12345, "not-an-id"]  # an id is an id, or malformed
    return []


class TestForgedCursors:
    """A cursor made by hand, well-formed JSON of the right list and shape but holding a value
    the database cannot take, is a 400 `invalid_cursor` on every list, never a 422 or 500."""

    @pytest.mark.parametrize(
        ("path", "reader", "add", "field"), LISTS, ids=[row[0] for row in LISTS]
    )
    async def test_lists(
        self,
        install_service_client: Client,
        world: World,
        path: str,
        reader: str,
        add: Callable[[World], Awaitable[None]],
        field: str,
    ) -> None:
        for _ in range(2):
            await add(world)
        headers = bearer(ADMIN if reader == "admin" else world.token)
        url = _fill(path, world)
        first = await install_service_client.get(url, params={"limit": 1}, headers=headers)
        cursor = first.json()["next_cursor"]
        assert cursor, first.text
        await self._refused_everywhere(install_service_client, world, url, headers, cursor)

    @pytest.mark.parametrize("path", ["/api/v1/organizations/acme/events", "/api/v1/admin/events"])
    async def test_feeds(self, install_service_client: Client, world: World, path: str) -> None:
        headers = bearer(ADMIN if "admin" in path else world.token)
        cursor = (await install_service_client.get(path, headers=headers)).json()["next_cursor"]
        await self._refused_everywhere(install_service_client, world, path, headers, cursor)

    async def test_an_integer_past_a_32_bit_column(
        self, install_service_client: Client, world: World
    ) -> None:
        await _release(world)
        url = "/api/v1/templates/starter/releases"
        headers = bearer(world.token)
        cursor = await install_service_client.get(url, params={"limit": 1}, headers=headers)
        forged = _forge(cursor.json()["next_cursor"], 0, 2**31)
        response = await install_service_client.get(url, params={"cursor": forged}, headers=headers)
        assert (response.status_code, response.json()["code"]) == (400, "invalid_cursor")

    async def _refused_everywhere(
        self, client: Client, world: World, url: str, headers: dict[str, str], cursor: str
    ) -> None:
        _, values = json.loads(base64.urlsafe_b64decode(cursor + "=="))
        forged = [
            _forge(cursor, i, bad)
            for i, value in enumerate(values)
            for bad in _unrepresentable(value)
        ]
        assert forged, values
        before = await dump(world.engine)
        for bad in forged:
            response = await client.get(url, params={"cursor": bad}, headers=headers)
            assert (response.status_code, response.json().get("code")) == (400, "invalid_cursor"), (
                url,
                base64.urlsafe_b64decode(bad + "=="),
                response.text,
            )
        assert await dump(world.engine) == before
