"""Access lifecycle over the HTTP API: tokens, people, personal orgs, the audit log.

Every change is checked in the database, and every refusal is checked to change nothing.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.actor import SYSTEM
from install_service.db.session import transaction
from install_service.errors import Conflict
from install_service.orgs import service as orgs
from install_service.orgs.service import ensure_admin
from install_service.testing import bearer, install_template, make_org, make_user, publish_template
from tests.conftest import dump, execute, rows, scalar, small_doc, waits_for_a_lock

Client = AsyncTestClient[Litestar]
ADMIN = "access-admin-token"


@pytest.fixture
def client(install_service_client: Client) -> Client:
    return install_service_client


@pytest.fixture
async def admin(engine: AsyncEngine) -> dict[str, str]:
    async with transaction(engine) as session:
        await ensure_admin(session, ADMIN)
    return bearer(ADMIN)


async def audit_actions(engine: AsyncEngine) -> list[str]:
    return [r.action for r in await rows(engine, "SELECT action FROM audit_log ORDER BY 1")]


class TestTokens:
    async def test_create_list_and_revoke_own_tokens(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        _, _user, first = await make_user(engine)
        created = await client.post("/api/v1/tokens", json={"name": "ci"}, headers=bearer(first))
        assert created.status_code == 201
        second = created.json()["token"]
        assert second.startswith("isk_")
        assert created.json()["prefix"] == second[:8]

        listed = await client.get("/api/v1/tokens", headers=bearer(second))
        assert listed.status_code == 200
        assert [t["name"] for t in listed.json()["items"]] == ["", "ci"]
        assert second not in listed.text
        assert first not in listed.text

        revoked = await client.delete(
            f"/api/v1/tokens/{created.json()['id']}", headers=bearer(first)
        )
        assert revoked.status_code == 200
        assert revoked.json()["revoked_at"] is not None
        stored = await scalar(
            engine, "SELECT revoked_at FROM api_tokens WHERE id = :i", i=created.json()["id"]
        )
        assert stored is not None
        # The very next request with it is refused; the other token still works.
        assert (await client.get("/api/v1/tokens", headers=bearer(second))).status_code == 401
        assert (await client.get("/api/v1/tokens", headers=bearer(first))).status_code == 200
        # Revoking again answers the same and changes nothing.
        before = await dump(engine)
        again = await client.delete(f"/api/v1/tokens/{created.json()['id']}", headers=bearer(first))
        assert again.status_code == 200
        assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
        assert await dump(engine) == before
        assert (await audit_actions(engine)).count("token.revoked") == 1

    async def test_another_users_token_is_not_found(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        _, _, mine = await make_user(engine)
        _, other, theirs = await make_user(engine)
        their_id = await scalar(engine, "SELECT id FROM api_tokens WHERE user_id = :u", u=other.id)
        before = await dump(engine)
        response = await client.delete(f"/api/v1/tokens/{their_id}", headers=bearer(mine))
        assert (response.status_code, response.json()["code"]) == (404, "token_not_found")
        assert await dump(engine) == before
        assert (await client.get("/api/v1/tokens", headers=bearer(theirs))).status_code == 200

    async def test_expired_tokens_are_refused_and_expiry_must_be_future(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        _, _, token = await make_user(engine)
        past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        refused = await client.post(
            "/api/v1/tokens", json={"expires_at": past}, headers=bearer(token)
        )
        assert (refused.status_code, refused.json()["code"]) == (422, "invalid_expiry")
        soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        created = await client.post(
            "/api/v1/tokens", json={"expires_at": soon}, headers=bearer(token)
        )
        short_lived = created.json()["token"]
        assert (await client.get("/api/v1/tokens", headers=bearer(short_lived))).status_code == 200
        await execute(
            engine,
            "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = :i",
            i=created.json()["id"],
        )
        expired = await client.get("/api/v1/tokens", headers=bearer(short_lived))
        assert (expired.status_code, expired.json()["code"]) == (401, "invalid_token")

    async def test_last_used_at_is_written_at_most_once_a_minute(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        _, user, token = await make_user(engine)

        async def last_used() -> Any:
            return await scalar(
                engine, "SELECT last_used_at FROM api_tokens WHERE user_id = :u", u=user.id
            )

        assert await last_used() is None
        await client.get("/api/v1/me", headers=bearer(token))
        first = await last_used()
        assert first is not None
        before = await dump(engine)
        for _ in range(3):
            assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 200
        assert await dump(engine) == before  # reads within the minute write nothing
        await execute(
            engine,
            "UPDATE api_tokens SET last_used_at = now() - interval '61 seconds' WHERE user_id = :u",
            u=user.id,
        )
        await client.get("/api/v1/me", headers=bearer(token))
        assert await last_used() > first

    async def test_a_noop_install_notes_a_due_token_use_and_otherwise_writes_nothing(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        await publish_template(engine, small_doc())
        _, user, token = await make_user(engine)
        first = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
        )
        assert first.status_code == 201
        noted = "SELECT last_used_at FROM api_tokens WHERE user_id = :u"
        used = await scalar(engine, noted, u=user.id)
        assert used is not None
        before = await dump(engine)

        again = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
        )

        assert again.status_code == 200
        assert (again.json()["id"], again.json()["action"]) == (first.json()["id"], "none")
        assert await dump(engine) == before  # answered outside any transaction
        await execute(
            engine,
            "UPDATE api_tokens SET last_used_at = now() - interval '61 seconds' WHERE user_id = :u",
            u=user.id,
        )
        due = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(token)
        )
        assert (due.status_code, due.json()["action"]) == (200, "none")
        assert await scalar(engine, noted, u=user.id) > used

    async def test_a_refused_request_leaves_last_used_at_alone(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        _, _user, token = await make_user(engine)
        before = await dump(engine)
        refused = await client.post(
            "/api/v1/installs", json={"template": "nope"}, headers=bearer(token)
        )
        assert refused.status_code == 404
        assert await dump(engine) == before

    async def test_admins_list_and_revoke_any_users_tokens(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        _, user, token = await make_user(engine)
        listed = await client.get(f"/api/v1/admin/users/{user.email}/tokens", headers=admin)
        assert listed.status_code == 200
        [entry] = listed.json()["items"]
        assert entry["user_id"] == str(user.id)
        revoked = await client.delete(f"/api/v1/admin/tokens/{entry['id']}", headers=admin)
        assert revoked.status_code == 200
        assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 401
        forbidden = await client.get(
            f"/api/v1/admin/users/{user.email}/tokens", headers=bearer(token)
        )
        assert forbidden.status_code == 401
        _, _, other = await make_user(engine)
        not_admin = await client.delete(
            f"/api/v1/admin/tokens/{entry['id']}", headers=bearer(other)
        )
        assert not_admin.status_code == 403


class TestAdminTokenRotation:
    async def test_a_new_value_revokes_the_previous_one(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        async with transaction(engine) as session:
            assert await ensure_admin(session, "first-value") is None
        assert (await client.get("/api/v1/me", headers=bearer("first-value"))).status_code == 200
        async with transaction(engine) as session:
            assert await ensure_admin(session, "second-value") is None
        assert (await client.get("/api/v1/me", headers=bearer("first-value"))).status_code == 401
        assert (await client.get("/api/v1/me", headers=bearer("second-value"))).status_code == 200
        # The same value again changes nothing.
        before = await dump(engine)
        async with transaction(engine) as session:
            assert await ensure_admin(session, "second-value") is None
        assert await dump(engine) == before

    async def test_unsetting_the_value_revokes_it_and_prints_a_generated_token(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        async with transaction(engine) as session:
            await ensure_admin(session, "configured")
        async with transaction(engine) as session:
            generated = await ensure_admin(session, None)
        assert generated is not None
        assert (await client.get("/api/v1/me", headers=bearer("configured"))).status_code == 401
        assert (await client.get("/api/v1/me", headers=bearer(generated))).status_code == 200
        async with transaction(engine) as session:
            assert await ensure_admin(session, None) is None  # still live: nothing new

    async def test_a_revoked_value_is_never_brought_back(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        async with transaction(engine) as session:
            await ensure_admin(session, "leaked")
        await execute(engine, "UPDATE api_tokens SET revoked_at = now()")
        async with transaction(engine) as session:
            await ensure_admin(session, "leaked")
        assert (await client.get("/api/v1/me", headers=bearer("leaked"))).status_code == 401

    async def test_concurrent_start_ups_make_one_admin(self, engine: AsyncEngine) -> None:
        async def start() -> str | None:
            async with transaction(engine) as session:
                return await ensure_admin(session, "together")

        assert await asyncio.gather(*(start() for _ in range(5))) == [None] * 5
        assert await scalar(engine, "SELECT count(*) FROM users WHERE is_platform_admin") == 1
        assert await scalar(engine, "SELECT count(*) FROM api_tokens") == 1


class TestMembers:
    async def test_removed_member_loses_access_at_once(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        owner, _, _ = await make_user(engine)
        _, member, member_token = await make_user(engine)
        await make_org(engine, owner=owner, slug="acme")
        added = await client.post(
            "/api/v1/admin/organizations/acme/members",
            json={"email": member.email, "role": "admin"},
            headers=admin,
        )
        assert added.status_code == 201
        path = "/api/v1/organizations/acme/installs"
        assert (await client.get(path, headers=bearer(member_token))).status_code == 200
        removed = await client.delete(
            f"/api/v1/admin/organizations/acme/members/{member.email}", headers=admin
        )
        assert (removed.status_code, removed.json()["role"]) == (200, "admin")
        assert (await client.get(path, headers=bearer(member_token))).status_code == 404
        gone = await client.delete(
            f"/api/v1/admin/organizations/acme/members/{member.email}", headers=admin
        )
        assert (gone.status_code, gone.json()["code"]) == (404, "member_not_found")

    async def test_role_change(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        owner, _, _ = await make_user(engine)
        _member, user, token = await make_user(engine)
        org = await make_org(engine, owner=owner, slug="acme")
        await client.post(
            "/api/v1/admin/organizations/acme/members",
            json={"user_id": str(user.id), "role": "member"},
            headers=admin,
        )
        await publish_template(engine, small_doc())
        install = {"template": "starter", "organization": "acme"}
        assert (
            await client.post("/api/v1/installs", json=install, headers=bearer(token))
        ).status_code == 403
        changed = await client.patch(
            f"/api/v1/admin/organizations/acme/members/{user.id}",
            json={"role": "admin"},
            headers=admin,
        )
        assert (changed.status_code, changed.json()["role"]) == (200, "admin")
        role = "SELECT role FROM memberships WHERE organization_id = :o AND user_id = :u"
        assert await scalar(engine, role, o=org.id, u=user.id) == "admin"
        assert (
            await client.post("/api/v1/installs", json=install, headers=bearer(token))
        ).status_code == 201

    async def test_the_last_owner_cannot_be_removed_or_demoted(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        owner, user, _ = await make_user(engine)
        await make_org(engine, owner=owner, slug="acme")
        before = await dump(engine)
        for response in (
            await client.delete(
                f"/api/v1/admin/organizations/acme/members/{user.email}", headers=admin
            ),
            await client.patch(
                f"/api/v1/admin/organizations/acme/members/{user.email}",
                json={"role": "member"},
                headers=admin,
            ),
            await client.post(
                "/api/v1/admin/organizations/acme/members",
                json={"email": user.email, "role": "admin"},
                headers=admin,
            ),
        ):
            assert (response.status_code, response.json()["code"]) == (409, "last_owner")
        assert await dump(engine) == before

    async def test_two_owners_removing_each_other_at_once_keep_one(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        first, a, _ = await make_user(engine)
        _, b, _ = await make_user(engine)
        org = await make_org(engine, owner=first, slug="acme")
        await client.post(
            "/api/v1/admin/organizations/acme/members",
            json={"email": b.email, "role": "owner"},
            headers=admin,
        )

        async def remove(email: str) -> None:
            async with transaction(engine) as session:
                await orgs.remove_member(session, SYSTEM, "acme", email)

        # The first removal is not committed yet while the second one runs.
        async with transaction(engine) as session:
            await orgs.remove_member(session, SYSTEM, "acme", a.email)
            second = asyncio.create_task(remove(b.email))
            await waits_for_a_lock(engine, second)
        with pytest.raises(Conflict, match="last owner"):
            await second
        owners = "SELECT user_id FROM memberships WHERE organization_id = :o AND role = 'owner'"
        assert [r.user_id for r in await rows(engine, owners, o=org.id)] == [b.id]

    async def test_nobody_is_removed_from_their_own_personal_org(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        _, user, _ = await make_user(engine)
        _, other, _ = await make_user(engine)
        personal = user.personal_organization.slug
        await client.post(
            f"/api/v1/admin/organizations/{personal}/members",
            json={"email": other.email, "role": "owner"},
            headers=admin,
        )
        refused = await client.delete(
            f"/api/v1/admin/organizations/{personal}/members/{user.email}", headers=admin
        )
        assert (refused.status_code, refused.json()["code"]) == (409, "personal_org_owner")

    async def test_members_are_listed_to_members(self, engine: AsyncEngine, client: Client) -> None:
        owner, user, token = await make_user(engine)
        await make_org(engine, owner=owner, slug="acme")
        _, _, outsider = await make_user(engine)
        listed = await client.get("/api/v1/organizations/acme/members", headers=bearer(token))
        assert [(m["email"], m["role"]) for m in listed.json()["items"]] == [(user.email, "owner")]
        hidden = await client.get("/api/v1/organizations/acme/members", headers=bearer(outsider))
        assert hidden.status_code == 404


class TestWhoSeesEmails:
    """Owners, admins and platform admins see the addresses of an org's people; a plain
    member sees ids, names and roles, and their own address only: in the member list, in
    its cursors and in who pinned an install."""

    async def test_members_and_pins(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        await publish_template(engine, small_doc())
        owner, owner_user, owner_token = await make_user(engine, "zoe-owner@example.com")
        org = await make_org(engine, owner=owner, slug="acme")
        people = {}
        for email, role in (
            ("amy-admin@example.com", "admin"),
            ("mo-member@example.com", "member"),
            ("nell-member@example.com", "member"),
        ):
            _, user, token = await make_user(engine, email, name=email.split("-")[0].title())
            async with transaction(engine) as session:
                await orgs.add_member(session, organization_id=org.id, user_id=user.id, role=role)
            people[email] = token
        installed = await install_template(engine, owner, "starter", "acme")
        pinned = await client.post(
            f"/api/v1/installs/{installed.id}/pin", json={}, headers=bearer(owner_token)
        )
        assert pinned.status_code == 200
        everyone = sorted([owner_user.email, *people])

        async def members(token_headers: dict[str, str]) -> list[tuple[str | None, str]]:
            found: list[tuple[str | None, str]] = []
            cursor = None
            while True:
                params = {"limit": 1} | ({"cursor": cursor} if cursor else {})
                page = await client.get(
                    "/api/v1/organizations/acme/members", params=params, headers=token_headers
                )
                assert page.status_code == 200, page.text
                found += [(m["email"], m["name"]) for m in page.json()["items"]]
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    return found
                assert "@" not in base64.urlsafe_b64decode(cursor + "==").decode()

        for headers in (bearer(owner_token), bearer(people["amy-admin@example.com"]), admin):
            assert [email for email, _ in await members(headers)] == everyone
        as_member = await members(bearer(people["mo-member@example.com"]))
        # The same order, the same names; only their own address.
        assert [email for email, _ in as_member] == [
            e if e == "mo-member@example.com" else None for e in everyone
        ]
        assert [name for _, name in as_member] == ["Amy", "Mo", "Nell", ""]

        def pinned_by(page: Any) -> Any:
            return page.json()["pinned_by"]

        install = f"/api/v1/installs/{installed.id}"
        listing = "/api/v1/organizations/acme/installs"
        for headers, expected in (
            (bearer(owner_token), owner_user.email),
            (bearer(people["amy-admin@example.com"]), owner_user.email),
            (admin, owner_user.email),
            (bearer(people["mo-member@example.com"]), None),
        ):
            assert pinned_by(await client.get(install, headers=headers)) == expected
            listed = (await client.get(listing, headers=headers)).json()["items"]
            assert [i["pinned_by"] for i in listed] == [expected]
            drift = (await client.get(f"{install}/drift", headers=headers)).json()
            assert drift["install"]["pinned_by"] == expected


class TestDeactivation:
    async def test_every_token_stops_at_once_and_comes_back_on_reactivation(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        _, user, first = await make_user(engine)
        second = (await client.post("/api/v1/tokens", json={}, headers=bearer(first))).json()
        off = await client.post(f"/api/v1/admin/users/{user.email}/deactivate", headers=admin)
        assert off.status_code == 200
        assert off.json()["deactivated_at"] is not None
        for token in (first, second["token"]):
            assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 401
        again = await client.post(f"/api/v1/admin/users/{user.id}/deactivate", headers=admin)
        assert again.json()["deactivated_at"] == off.json()["deactivated_at"]
        on = await client.post(f"/api/v1/admin/users/{user.id}/reactivate", headers=admin)
        assert on.json()["deactivated_at"] is None
        assert (await client.get("/api/v1/me", headers=bearer(first))).status_code == 200

    async def test_the_last_platform_admin_stays(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        before = await dump(engine)
        refused = await client.post("/api/v1/admin/users/admin@localhost/deactivate", headers=admin)
        assert (refused.status_code, refused.json()["code"]) == (409, "last_platform_admin")
        assert await dump(engine) == before


class TestPersonalOrgs:
    async def test_omitted_organization_is_the_callers_own_personal_org(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        await publish_template(engine, small_doc())
        _, ada, _ = await make_user(engine, "ada@example.com")
        _, bob, bob_token = await make_user(engine, "bob@example.com")
        # Bob also owns Ada's personal org (made before his own, so it is older).
        await client.post(
            f"/api/v1/admin/organizations/{ada.personal_organization.slug}/members",
            json={"email": bob.email, "role": "owner"},
            headers=admin,
        )
        installed = await client.post(
            "/api/v1/installs", json={"template": "starter"}, headers=bearer(bob_token)
        )
        assert installed.status_code == 201
        assert installed.json()["organization"]["id"] == str(bob.personal_organization.id)
        me = await client.get("/api/v1/me", headers=bearer(bob_token))
        assert me.json()["personal_organization"]["id"] == str(bob.personal_organization.id)

    async def test_the_admin_api_cannot_create_a_personal_org(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        before = await dump(engine)
        response = await client.post(
            "/api/v1/admin/organizations",
            json={"slug": "lonely", "name": "Lonely", "kind": "personal"},
            headers=admin,
        )
        assert (response.status_code, response.json()["code"]) == (422, "personal_org_not_allowed")
        assert await dump(engine) == before

    async def test_the_database_refuses_a_user_without_one(self, engine: AsyncEngine) -> None:
        with pytest.raises(DBAPIError, match="has no personal organization"):
            await execute(engine, "INSERT INTO users (email) VALUES ('orphan@example.com')")
        assert await scalar(engine, "SELECT count(*) FROM users") == 0

    async def test_the_database_refuses_a_second_one_and_losing_it(
        self, engine: AsyncEngine
    ) -> None:
        _, user, _ = await make_user(engine)
        with pytest.raises(IntegrityError):
            await execute(
                engine,
                """INSERT INTO organizations (slug, name, kind, personal_owner_id)
                   VALUES ('second', 'Second', 'personal', :u)""",
                u=user.id,
            )
        with pytest.raises(IntegrityError):
            await execute(
                engine,
                "UPDATE organizations SET kind = 'team' WHERE personal_owner_id = :u",
                u=user.id,
            )
        with pytest.raises(DBAPIError, match="has no personal organization"):
            await execute(
                engine,
                """UPDATE organizations SET kind = 'team', personal_owner_id = NULL
                   WHERE personal_owner_id = :u""",
                u=user.id,
            )


class TestAuditLog:
    async def test_admin_actions_are_recorded_with_actor_target_and_request_id(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        trace = {**admin, "X-Request-ID": "audit-trail-1"}
        created = await client.post(
            "/api/v1/admin/users", json={"email": "eve@example.com"}, headers=trace
        )
        [entry] = await rows(
            engine,
            """SELECT a.*, u.email AS actor_email FROM audit_log a
               LEFT JOIN users u ON u.id = a.actor_user_id WHERE a.action = 'user.created'
                 AND a.target_id = :t""",
            t=created.json()["id"],
        )
        assert (entry.actor_email, entry.target_type, entry.request_id) == (
            "admin@localhost",
            "user",
            "audit-trail-1",
        )
        listed = await client.get("/api/v1/admin/audit?action=user.created", headers=admin)
        assert next(e["target_id"] for e in listed.json()["items"]) == created.json()["id"]
        assert listed.json()["items"][0]["actor_email"] == "admin@localhost"

    async def test_lifecycle_changes_are_recorded_and_no_ops_are_not(
        self, engine: AsyncEngine, client: Client
    ) -> None:
        await publish_template(engine, small_doc())
        _owner, _, token = await make_user(engine)
        earlier = await audit_actions(engine)
        body = {"template": "starter"}
        assert (
            await client.post("/api/v1/installs", json=body, headers=bearer(token))
        ).status_code == 201
        assert sorted(await audit_actions(engine)) == sorted([*earlier, "install.created"])
        before = await dump(engine)
        for payload in (body, {**body, "dry_run": True}):
            again = await client.post("/api/v1/installs", json=payload, headers=bearer(token))
            assert again.status_code == 200
        await publish_template(engine, small_doc())  # unchanged: no release, no row
        assert await dump(engine) == before

    async def test_the_database_refuses_to_rewrite_it(
        self, engine: AsyncEngine, admin: dict[str, str]
    ) -> None:
        await make_org(engine, slug="acme")
        for sql in ("UPDATE audit_log SET action = 'x'", "DELETE FROM audit_log"):
            with pytest.raises(DBAPIError, match="append-only"):
                await execute(engine, sql)
        assert await scalar(engine, "SELECT count(*) FROM audit_log") >= 1

    async def test_filters_and_who_may_read(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        org = await make_org(engine, slug="acme")
        await make_org(engine, slug="other")
        by_org = await client.get(f"/api/v1/admin/audit?organization_id={org.id}", headers=admin)
        assert [e["action"] for e in by_org.json()["items"]] == ["organization.created"]
        _, _, token = await make_user(engine)
        assert (await client.get("/api/v1/admin/audit", headers=bearer(token))).status_code == 403
        assert (await client.get("/api/v1/admin/audit")).status_code == 401


class TestHostileBodies:
    BAD_BODIES = (
        b'{"template": "\xff\xfe"}',  # not UTF-8
        b'{"template": "starter", "x": ' + b"[" * 200 + b"]" * 200 + b"}",  # deeper than allowed
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the decoder goes
        b'{"template": "starter"',  # truncated
    )

    @pytest.mark.parametrize("body", BAD_BODIES, ids=["utf8", "deep", "deeper", "truncated"])
    async def test_malformed_bodies_are_400_or_401_without_a_token(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str], body: bytes
    ) -> None:
        _, _, token = await make_user(engine)
        before = await dump(engine)
        json_type = {"content-type": "application/json"}
        for path in ("/api/v1/installs", "/api/v1/tokens"):
            signed_in = await client.post(
                path, content=body, headers={**bearer(token), **json_type}
            )
            assert (signed_in.status_code, signed_in.json()["code"]) == (400, "invalid_request")
            anonymous = await client.post(path, content=body, headers=json_type)
            assert anonymous.status_code == 401
            bad_token = await client.post(
                path, content=body, headers={**bearer("nope"), **json_type}
            )
            assert bad_token.status_code == 401
        publish = await client.put(
            "/api/v1/admin/templates/starter", content=body, headers={**admin, **json_type}
        )
        assert publish.status_code == 400
        not_admin = await client.put(
            "/api/v1/admin/templates/starter", content=body, headers={**bearer(token), **json_type}
        )
        assert not_admin.status_code == 403
        assert await dump(engine) == before

    async def test_slugs_names_and_emails_are_exact(
        self, engine: AsyncEngine, client: Client, admin: dict[str, str]
    ) -> None:
        before = await dump(engine)
        for path, body in (
            ("/api/v1/admin/organizations", {"slug": "sales-crm\n", "name": "Look-alike"}),
            ("/api/v1/admin/organizations", {"slug": "fine", "name": "Bell\x07"}),
            ("/api/v1/admin/organizations", {"slug": "fine", "name": "Line\n"}),
            ("/api/v1/admin/users", {"email": "ada@example.com\n"}),
            ("/api/v1/admin/users", {"email": "ada@example.com", "name": "Ada\x1b[31m"}),
            ("/api/v1/tokens", {"name": "tab\there"}),
        ):
            response = await client.post(path, json=body, headers=admin)
            assert response.status_code == 400, (path, body)
        refused = await client.put(
            "/api/v1/admin/templates/starter", json=small_doc(slug="starter\n"), headers=admin
        )
        assert refused.status_code == 422
        assert await dump(engine) == before

    async def test_classifier_values_may_be_described_by_objects(
        self, engine: AsyncEngine, owner: Any
    ) -> None:
        doc = small_doc()
        doc["classifiers"][0]["attribute_values"] = {
            "junior": {"description": "Early career", "examples": ["intern", "graduate"]},
            "senior": "Experienced",
        }
        await publish_template(engine, doc)
        result = await install_template(engine, owner, "starter")
        stored = await scalar(
            engine,
            """SELECT v.attribute_values FROM event_classifier_versions v
               JOIN event_classifiers c ON c.current_version_id = v.id
               WHERE c.organization_id = :o""",
            o=result.organization.id,
        )
        assert stored == doc["classifiers"][0]["attribute_values"]
