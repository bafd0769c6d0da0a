"""Pins: an org's owner or admin holds its install at its release against resyncs, never
against the org's own upgrades."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.testing import (
    add_membership,
    bearer,
    make_org,
    make_user,
    publish_template,
)
from tests.conftest import dump, execute, rows, scalar, small_doc

Client = AsyncTestClient[Litestar]


def v2() -> dict[str, Any]:
    doc = small_doc()
    doc["entity_types"][0]["name"] = "Human"
    return doc


async def pin_actions(engine: AsyncEngine) -> list[str]:
    found = await rows(
        engine, "SELECT action FROM audit_log WHERE action LIKE 'install.%pinned' ORDER BY id"
    )
    return sorted(r.action for r in found)


class TestPinning:
    async def test_owners_and_admins_pin_and_unpin_members_and_strangers_cannot(
        self, engine: AsyncEngine, install_service_client: Client
    ) -> None:
        client = install_service_client
        await publish_template(engine, small_doc())
        owner, _, owner_token = await make_user(engine)
        member, _, member_token = await make_user(engine)
        _, _, stranger_token = await make_user(engine)
        org = await make_org(engine, owner=owner)
        await add_membership(engine, org, member, "member")
        installed = await client.post(
            "/api/v1/installs",
            json={"template": "starter", "organization": org.slug},
            headers=bearer(owner_token),
        )
        install = installed.json()["id"]
        until = (datetime.now(UTC) + timedelta(days=7)).replace(microsecond=0)
        body = {"until": until.isoformat(), "reason": "quarter close"}

        before = await dump(engine)
        for token, status in ((member_token, 403), (stranger_token, 404)):
            refused = await client.post(
                f"/api/v1/installs/{install}/pin", json=body, headers=bearer(token)
            )
            assert refused.status_code == status
        past = await client.post(
            f"/api/v1/installs/{install}/pin",
            json={"until": "2000-01-01T00:00:00Z"},
            headers=bearer(owner_token),
        )
        assert (past.status_code, past.json()["code"]) == (422, "pin_until_in_past")
        for bad in ({"until": "2030-01-01T00:00:00"}, {"reason": "two\nlines"}, {"x": 1}):
            malformed = await client.post(
                f"/api/v1/installs/{install}/pin", json=bad, headers=bearer(owner_token)
            )
            assert malformed.status_code == 400, bad
        assert await dump(engine) == before

        pinned = await client.post(
            f"/api/v1/installs/{install}/pin", json=body, headers=bearer(owner_token)
        )
        assert pinned.status_code == 200
        assert (pinned.json()["pinned"], pinned.json()["pin_reason"]) == (True, "quarter close")
        assert datetime.fromisoformat(pinned.json()["pinned_until"]) == until
        again = await client.post(
            f"/api/v1/installs/{install}/pin", json=body, headers=bearer(owner_token)
        )
        assert again.json() == pinned.json()
        shown = await client.get(f"/api/v1/installs/{install}", headers=bearer(owner_token))
        assert shown.json()["pinned"] is True
        email = await scalar(engine, "SELECT email FROM users WHERE id = :u", u=owner.user_id)
        pinned_at = await scalar(engine, "SELECT pinned_at FROM agents WHERE id = :i", i=install)
        assert shown.json()["pinned_by"] == email
        assert datetime.fromisoformat(shown.json()["pinned_at"]) == pinned_at
        # A plain member sees that it is pinned, when and why, but not whose address pinned it.
        seen = (
            await client.get(f"/api/v1/installs/{install}", headers=bearer(member_token))
        ).json()
        assert (seen["pinned"], seen["pin_reason"], seen["pinned_by"]) == (
            True,
            "quarter close",
            None,
        )
        assert await pin_actions(engine) == ["install.pinned"]  # the repeat wrote nothing

        unpinned = await client.delete(
            f"/api/v1/installs/{install}/pin", headers=bearer(owner_token)
        )
        assert unpinned.status_code == 200
        assert (unpinned.json()["pinned"], unpinned.json()["pinned_until"]) == (False, None)
        assert (unpinned.json()["pinned_by"], unpinned.json()["pinned_at"]) == (None, None)
        await client.delete(f"/api/v1/installs/{install}/pin", headers=bearer(owner_token))
        assert await pin_actions(engine) == ["install.pinned", "install.unpinned"]

    async def test_an_expired_pin_no_longer_holds(
        self, engine: AsyncEngine, install_service_client: Client
    ) -> None:
        client = install_service_client
        await publish_template(engine, small_doc())
        _, _, token = await make_user(engine)
        installed = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
        )
        install = installed.json()["id"]
        await client.post(
            f"/api/v1/installs/{install}/pin",
            json={"until": (datetime.now(UTC) + timedelta(hours=1)).isoformat()},
            headers=bearer(token),
        )
        await execute(
            engine,
            "UPDATE agents SET pinned_until = now() - interval '1 second' WHERE id = :i",
            i=install,
        )
        shown = await client.get(f"/api/v1/installs/{install}", headers=bearer(token))
        assert (shown.json()["pinned"], shown.json()["pinned_until"]) == (False, None)
        # Unpinning what no longer holds changes nothing.
        await client.delete(f"/api/v1/installs/{install}/pin", headers=bearer(token))
        assert await pin_actions(engine) == ["install.pinned"]

    async def test_an_upgrade_can_pin_where_it_lands_and_a_pin_never_holds_the_org_back(
        self, engine: AsyncEngine, install_service_client: Client
    ) -> None:
        client = install_service_client
        await publish_template(engine, small_doc())
        _, _, token = await make_user(engine)
        installed = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
        )
        install = installed.json()["id"]
        await publish_template(engine, v2())
        up = await client.post(
            f"/api/v1/installs/{install}/upgrade", json={}, headers=bearer(token)
        )
        assert up.json()["version"] == 2
        # A deliberate rollback, pinned where it lands.
        back = await client.post(
            f"/api/v1/installs/{install}/upgrade",
            json={"version": 1, "pin": True},
            headers=bearer(token),
        )
        assert (back.status_code, back.json()["action"]) == (200, "rollback")
        shown = await client.get(f"/api/v1/installs/{install}", headers=bearer(token))
        assert (shown.json()["version"], shown.json()["pinned"]) == (1, True)
        # A dry run with `pin` pins nothing.
        await client.post(f"/api/v1/installs/{install}/pin", headers=bearer(token), json={})
        await client.delete(f"/api/v1/installs/{install}/pin", headers=bearer(token))
        await client.post(
            f"/api/v1/installs/{install}/upgrade",
            json={"dry_run": True, "pin": True},
            headers=bearer(token),
        )
        assert (await client.get(f"/api/v1/installs/{install}", headers=bearer(token))).json()[
            "pinned"
        ] is False
        await client.post(f"/api/v1/installs/{install}/pin", headers=bearer(token), json={})
        own = await client.post(
            f"/api/v1/installs/{install}/upgrade", json={}, headers=bearer(token)
        )
        assert (own.status_code, own.json()["version"]) == (200, 2)
        still = await client.get(f"/api/v1/installs/{install}", headers=bearer(token))
        assert still.json()["pinned"] is True
        assert (
            await scalar(engine, "SELECT count(*) FROM audit_log WHERE action = 'install.pinned'")
            == 2
        )
