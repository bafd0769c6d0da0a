"""The console in a real browser (Debian's Chromium, driven by Playwright) against the real
server process, with every request that is not to the server blocked: pages must work with the
network cut off.

Without Chromium these tests skip, unless CI is set: then they must run. Set
INSTALL_SERVICE_CHROMIUM to use another binary, and INSTALL_SERVICE_SCREENSHOTS to a
directory to save screenshots of the main pages there (`docs/console/` in the README).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, Request, Response, async_playwright, expect
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service import demo
from install_service.db.session import transaction
from install_service.resync.waves import STABLE_ORDER
from install_service.testing import bearer, install_template, make_org, make_user, publish_template
from tests.conftest import SERVER_TOKEN, execute, rows, scalar, small_doc
from tests.console import budget_doc, core_doc

CHROMIUM = (
    os.environ.get("INSTALL_SERVICE_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
# Headless, and nothing of Chromium's own reaching out to the network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = os.environ.get("INSTALL_SERVICE_SCREENSHOTS")
# Every expectation waits: a page may first have to hear from a server on a busy machine.
expect.set_options(timeout=15_000)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must run the browser tests: install Debian's chromium package")
        pytest.skip("no Chromium on this machine (apt-get install chromium) and CI is not set")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Tab:
    """A browser tab on the console with the network cut off: what it tried to fetch from
    anywhere else, and what failed, is recorded."""

    page: Page
    base: str
    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    async def goto(self, path: str) -> Response | None:
        return await self.page.goto(self.base + path)

    async def sign_in(self, token: str) -> None:
        await self.goto("/console/sign-in")
        await self.page.get_by_label("API token").fill(token)
        await self.page.get_by_role("button", name="Sign in").click()
        await expect(self.page.get_by_text("Signed in as")).to_be_visible()

    async def shot(self, name: str) -> None:
        if SCREENSHOTS:
            await asyncio.to_thread(Path(SCREENSHOTS).mkdir, parents=True, exist_ok=True)
            await self.page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)

    async def nav(self, name: str) -> None:
        """Follow a link of the main navigation."""
        await (
            self.page.get_by_role("navigation", name="Main").get_by_role("link", name=name).click()
        )


async def open_tab(browser: Browser, base: str) -> Tab:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    tab = Tab(page=page, base=base)

    async def only_the_server(route: Any) -> None:
        if route.request.url.startswith(base + "/"):
            await route.continue_()
        else:
            tab.blocked.append(route.request.url)
            await route.abort("internetdisconnected")

    def failed(request: Request) -> None:
        # ERR_ABORTED: the browser dropped it for the next navigation (a favicon, say).
        if request.url.startswith(base) and request.failure != "net::ERR_ABORTED":
            tab.failed.append(f"{request.url}: {request.failure}")

    def answered(response: Response) -> None:
        if response.request.resource_type != "document" and response.status >= 400:
            tab.failed.append(f"{response.url}: {response.status}")

    await context.route("**/*", only_the_server)
    page.on("requestfailed", failed)
    page.on("response", answered)
    return tab


async def expect_heading(tab: Tab, text: str) -> None:
    """The page's title is `text` (once the page that click or key press loads is there)."""
    await expect(tab.page.get_by_role("heading", level=1)).to_have_text(text)


class TestSignInAndOut:
    async def test_sign_in_then_sign_out(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        tab = await open_tab(browser, server)
        await tab.goto("/console/orgs")
        await expect_heading(tab, "Sign in")
        await tab.shot("sign-in")
        await tab.page.get_by_label("API token").fill(SERVER_TOKEN)
        await tab.page.get_by_role("button", name="Sign in").click()
        # Back where the browser was going.
        await expect(tab.page.get_by_role("heading", name="Organizations")).to_be_visible()
        assert await scalar(engine, "SELECT count(*) FROM console_sessions") == 1
        cookie = next(c for c in await tab.page.context.cookies() if c["name"] == "console_session")
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert await tab.page.evaluate("document.cookie") == ""

        await tab.page.get_by_role("button", name="Sign out").click()
        await expect(tab.page.get_by_text("You have signed out.")).to_be_visible()
        assert await scalar(engine, "SELECT count(*) FROM console_sessions") == 0
        await tab.goto("/console/orgs")
        await expect_heading(tab, "Sign in")
        assert tab.blocked == []
        assert tab.failed == []

    async def test_revoking_the_token_ends_the_session(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        _, _user, token = await make_user(engine, "ada@example.com")
        tab = await open_tab(browser, server)
        await tab.sign_in(token)
        async with httpx.AsyncClient(base_url=server, headers=bearer(token)) as api:
            (listed,) = (await api.get("/api/v1/tokens")).json()["items"]
            assert (await api.delete(f"/api/v1/tokens/{listed['id']}")).status_code == 200
        await tab.nav("Organizations")
        await expect(tab.page.get_by_text("Your session has ended")).to_be_visible()
        await expect_heading(tab, "Sign in")


class TestAuthorization:
    async def test_an_owner_cannot_open_another_orgs_pages(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        await publish_template(engine, small_doc())
        owner, _, token = await make_user(engine, "owner@example.com")
        mine = await make_org(engine, owner=owner, slug="mine")
        await install_template(engine, owner, "starter", mine.slug)
        other, _, _ = await make_user(engine, "other@example.com")
        theirs = await make_org(engine, owner=other, slug="theirs")
        installed = await install_template(engine, other, "starter", theirs.slug)

        tab = await open_tab(browser, server)
        await tab.sign_in(token)
        await tab.nav("Organizations")
        await expect(tab.page.get_by_role("link", name="Test org")).to_have_count(1)
        for path in (f"/console/orgs/{theirs.slug}", f"/console/installs/{installed.id}"):
            response = await tab.goto(path)
            assert response is not None
            assert response.status == 404
            await expect_heading(tab, "Not Found")
        response = await tab.goto("/console/runs/")
        assert response is not None
        assert response.status == 403


class TestPages:
    async def test_a_release_diff_side_by_side(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        doc = small_doc()
        await publish_template(engine, doc)
        doc["entity_types"][0]["name"] = "Human"
        await publish_template(engine, doc, notes="people are humans")
        tab = await open_tab(browser, server)
        await tab.sign_in(SERVER_TOKEN)
        await tab.nav("Templates")
        await tab.page.get_by_role("link", name="Starter template").click()
        await tab.page.get_by_role("link", name="Diff 1 → 2").click()
        await expect_heading(tab, "starter: release 1 → 2")
        row = tab.page.get_by_role("row", name="/name")
        await expect(row.get_by_role("cell").nth(0)).to_have_text('"Person"')
        await expect(row.get_by_role("cell").nth(1)).to_have_text('"Human"')
        await tab.shot("release-diff")

    async def test_drift_history_and_reconcile(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        await publish_template(engine, small_doc())
        owner, _, token = await make_user(engine, "owner@example.com")
        org = await make_org(engine, owner=owner, slug="acme")
        installed = await install_template(engine, owner, "starter", org.slug)
        await execute(
            engine,
            "UPDATE entity_types SET name = 'Someone' WHERE slug = 'person' "
            "AND organization_id = :org",
            org=org.id,
        )
        tab = await open_tab(browser, server)
        await tab.sign_in(token)
        await tab.nav("Organizations")
        await tab.page.get_by_role("link", name="Test org").click()
        await tab.page.get_by_role("link", name="starter").click()
        drift = tab.page.get_by_role("row", name="/name")
        await expect(drift.get_by_role("cell").nth(0)).to_have_text('"Person"')
        await expect(drift.get_by_role("cell").nth(1)).to_have_text('"Someone"')
        history = tab.page.get_by_role("table", name="What happened to this install")
        await expect(history.get_by_role("rowheader")).to_have_text(["install"])
        await tab.shot("install-drift")

        await tab.page.get_by_role("link", name="Reconcile").click()
        # The plan first: what it would overwrite; nothing is written before the button.
        await expect(tab.page.get_by_role("heading", level=1)).to_have_text(
            "Reconcile starter with release 1"
        )
        await expect(tab.page.locator(".plan-summary")).to_contain_text("1 value(s)")
        await tab.page.get_by_role("button", name="Reconcile: overwrite 1 value(s)").click()
        await expect(tab.page.get_by_role("status")).to_contain_text("made equal")
        await expect(history.get_by_role("rowheader")).to_have_text(["install", "reconcile"])
        assert (
            await scalar(
                engine,
                "SELECT name FROM entity_types WHERE slug = 'person' AND organization_id = :o",
                o=org.id,
            )
            == "Person"
        )
        actions = await rows(
            engine,
            "SELECT action FROM install_events WHERE install_id = :i ORDER BY created_at",
            i=installed.id,
        )
        assert [a.action for a in actions] == ["install", "reconcile"]


async def make_demo(engine: AsyncEngine) -> None:
    async with transaction(engine) as session:
        await demo.create(session)


class TestKeyboard:
    async def focus(self, tab: Tab, name: str, *, limit: int = 80) -> None:
        """Press Tab until the element named `name` has the focus, and check it shows."""
        for _ in range(limit):
            await tab.page.keyboard.press("Tab")
            focused = await tab.page.evaluate(
                "document.activeElement.innerText || document.activeElement.value || ''"
            )
            if focused.strip().startswith(name):
                outline = await tab.page.evaluate(
                    "getComputedStyle(document.activeElement).outlineStyle"
                )
                assert outline != "none", f"{name!r} has the focus but does not show it"
                return
        raise AssertionError(f"Tab never reached {name!r}")

    async def focus_id(self, tab: Tab, element_id: str, *, limit: int = 80) -> None:
        """Press Tab until the element with this id has the focus, and check it shows."""
        for _ in range(limit):
            await tab.page.keyboard.press("Tab")
            if await tab.page.evaluate("document.activeElement.id") == element_id:
                outline = await tab.page.evaluate(
                    "getComputedStyle(document.activeElement).outlineStyle"
                )
                assert outline != "none", f"#{element_id} has the focus but does not show it"
                return
        raise AssertionError(f"Tab never reached #{element_id}")

    async def follow(self, tab: Tab, name: str) -> None:
        """Tab to a link or button named `name` and press Enter: a new page loads."""
        await self.focus(tab, name)
        async with tab.page.expect_navigation():
            await tab.page.keyboard.press("Enter")

    async def test_main_flows_by_keyboard_alone(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        await make_demo(engine)
        tab = await open_tab(browser, server)
        page = tab.page
        await tab.goto("/console/")
        # The token field has the focus on the sign-in page (autofocus: once rendered).
        await expect(page.get_by_label("API token")).to_be_focused()
        await page.keyboard.type(SERVER_TOKEN)
        await page.keyboard.press("Enter")
        await expect(page.get_by_text("Signed in as")).to_be_visible()

        await self.focus(tab, "Skip to content")
        await page.keyboard.press("Enter")
        # Following a fragment moves the focus in a later task: wait for it.
        await expect(page.locator("#main")).to_be_focused()

        await self.follow(tab, "Templates")
        await expect(page.get_by_role("heading", name="Templates")).to_be_visible()
        await self.follow(tab, "Demo CRM")
        await self.follow(tab, "Diff 1 → 2")
        await expect(page.get_by_role("heading", name="demo-crm: release 1 → 2")).to_be_visible()

        await self.follow(tab, "Organizations")
        await self.follow(tab, "Demo organization 10")
        await self.follow(tab, "demo-crm")
        await self.follow(tab, "Reconcile")
        await self.follow(tab, "Reconcile: overwrite")
        await expect(page.get_by_role("status")).to_contain_text("made equal")

        # The staged-resync form: type into a field, submit with Enter, confirm with Enter.
        await self.follow(tab, "Templates")
        await self.follow(tab, "Demo CRM")
        await self.focus_id(tab, "wave-1-size")
        await page.keyboard.press("Control+A")
        await page.keyboard.type("4")
        await self.focus_id(tab, "max_conflict_rate")
        await page.keyboard.press("Control+A")
        await page.keyboard.type("0.5")
        async with page.expect_navigation():
            await page.keyboard.press("Enter")
        await expect(page.get_by_role("heading", name="Dry run")).to_be_visible()
        await self.follow(tab, "Start the resync")
        await expect(page.get_by_role("heading", name="demo-crm → release 2")).to_be_visible()
        (run,) = await rows(engine, "SELECT selection, max_conflict_rate FROM resync_runs")
        assert run.selection["waves"][0] == {"count": 4}
        assert float(run.max_conflict_rate) == 0.5
        assert await scalar(engine, "SELECT count(*) FROM resync_items WHERE wave = 1") == 4
        assert tab.blocked == []
        assert tab.failed == []

    async def test_edit_a_prompt_and_choose_at_an_upgrade_by_keyboard_alone(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        owner_token, org, _ = await customizable(engine)
        tab = await open_tab(browser, server)
        page = tab.page
        await tab.sign_in(owner_token)
        await tab.goto(f"/console/orgs/{org.slug}/schema")
        await self.follow(tab, "inbox")
        await self.focus_id(tab, "field-prompt")
        await page.keyboard.press("Control+A")
        await page.keyboard.type(OURS)
        await self.follow(tab, "Save")
        await expect(page.get_by_role("status")).to_contain_text("Saved")
        assert await current_prompt(engine, org.id) == (OURS, 1)

        await publish_template(engine, story_doc(THEIRS))
        await self.follow(tab, "its install")
        await self.follow(tab, "Review the upgrade to release 2")
        await self.focus_id(tab, "resolve-watchers-inbox-1-local")
        await page.keyboard.press("Space")
        await expect(page.get_by_role("radio", name="Keep ours")).to_be_checked()
        await self.follow(tab, "Upgrade to release 2")
        await expect(page.get_by_role("status")).to_contain_text("Upgraded")
        assert await current_prompt(engine, org.id) == (OURS, 2)
        assert tab.blocked == []
        assert tab.failed == []


class TestOffline:
    async def test_every_main_page_renders_with_the_network_cut_off(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        await make_demo(engine)
        install_id = await scalar(
            engine,
            "SELECT a.id FROM agents a JOIN organizations o ON o.id = a.organization_id "
            "WHERE o.slug = 'demo-org-10'",
        )
        tab = await open_tab(browser, server)
        await tab.sign_in(SERVER_TOKEN)
        pages = {
            "home": "/console/",
            "templates": "/console/templates/",
            "template": "/console/templates/demo-crm",
            "organizations": "/console/orgs",
            "organization": "/console/orgs/demo-org-10",
            "install": f"/console/installs/{install_id}",
            "audit-log": "/console/audit/",
            "runs": "/console/runs/",
        }
        for name, path in pages.items():
            response = await tab.goto(path)
            assert response is not None
            assert response.status == 200, path
            # The service's own stylesheet and htmx were applied.
            header = await tab.page.evaluate(
                "getComputedStyle(document.querySelector('header.top')).backgroundColor"
            )
            assert header == "rgb(31, 78, 121)", path
            assert await tab.page.evaluate("typeof window.htmx") == "object", path
            if name in ("template", "install", "audit-log"):
                await tab.shot(name)
        assert tab.blocked == []
        assert tab.failed == []


def run_demo_command(url: URL) -> Any:
    """`install-service demo --json` as its own process, on the test's database."""
    env = {**os.environ, "INSTALL_SERVICE_DATABASE_URL": url.render_as_string(hide_password=False)}
    done = subprocess.run(
        [sys.executable, "-m", "install_service", "demo", "--json"],
        env=env,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


CONFLICTING = [slug for slug, edit in demo.ORGS if edit == "conflicts"]


class TestStagedResync:
    async def test_the_demo_halts_on_its_conflicts_and_resumes(
        self, engine: AsyncEngine, url: URL, server: str, browser: Browser
    ) -> None:
        """The README's walk-through: the demo command, the admin token, the staged-resync
        form's defaults and its dry run, then the run. Three installs of its first wave are
        locked by this test, so the server's worker finishes the others and waits: the bar
        shows that much, then moves on when the lock goes, with no page load in between; the
        wave's conflicts halt the run, and Resume moves the rest."""
        made = await asyncio.to_thread(run_demo_command, url)
        assert made["latest_version"] == 2
        tab = await open_tab(browser, server)
        page = tab.page
        await tab.sign_in(SERVER_TOKEN)
        await tab.nav("Templates")
        await page.get_by_role("link", name="Demo CRM").click()
        await page.get_by_role("link", name="Start a staged resync").click()
        # The form's defaults, typed in again as a newcomer would.
        await page.get_by_label("Wave 1", exact=True).fill("10")
        await page.get_by_label("Wave 1 counts").select_option("count")
        await page.get_by_label("Wave 2", exact=True).fill("50")
        await page.get_by_label("Wave 2 counts").select_option("percent")
        await page.get_by_label("Halt after a wave whose conflict rate is above").fill("0.1")
        await page.get_by_role("button", name="Preview the dry run").click()

        await expect(page.get_by_role("heading", name="Dry run")).to_be_visible()
        total = len(demo.ORGS)
        await expect(page.locator(".dry-run-totals")).to_contain_text(
            f"{total - len(CONFLICTING)} upgrade, 0 unchanged, {len(CONFLICTING)} conflict"
        )
        noted = page.get_by_role("table", name="Organizations that would conflict")
        await expect(noted.get_by_role("rowheader")).to_have_count(len(CONFLICTING))
        for slug in CONFLICTING:
            await expect(noted).to_contain_text(slug)
        await expect(noted).to_contain_text("/name")
        await tab.shot("resync-dry-run")
        assert await scalar(engine, "SELECT count(*) FROM resync_runs") == 0

        first_wave = 10
        held = 3
        async with engine.connect() as lock:
            await lock.execute(
                text(f"""SELECT a.id FROM agents a JOIN organizations o
                         ON o.id = a.organization_id WHERE o.slug LIKE 'demo-org-%'
                         ORDER BY {STABLE_ORDER} LIMIT :held
                         FOR NO KEY UPDATE OF a"""),
                {"held": held},
            )
            await page.get_by_role("button", name="Start the resync").click()
            await expect(page.get_by_role("heading", name="demo-crm → release 2")).to_be_visible()
            await page.wait_for_load_state("load")
            await page.evaluate("window.notReloaded = true")
            loads: list[str] = []
            page.on("load", lambda: loads.append(page.url))
            bar = page.get_by_role("progressbar", name="Items finished")
            await expect(bar).to_have_attribute(
                "aria-valuenow", str(first_wave - held), timeout=30_000
            )
            await expect(page.locator("#run-live")).to_have_attribute("data-status", "running")
            await tab.shot("run-in-progress")
            await lock.rollback()
        await expect(bar).to_have_attribute("aria-valuenow", str(first_wave), timeout=30_000)
        await expect(page.locator("#run-live")).to_have_attribute("data-status", "halted")
        assert await page.evaluate("window.notReloaded") is True
        assert loads == []

        (run,) = await rows(engine, "SELECT * FROM resync_runs")
        assert run.status == "halted"
        conflicted = await scalar(
            engine, "SELECT count(*) FROM resync_items WHERE wave = 1 AND status = 'conflict'"
        )
        # Whatever the stable order, ten of the twelve include at least two conflicting.
        assert conflicted >= 2
        reason = f"wave 1: conflict rate {conflicted}/{first_wave} is above 0.1"
        assert run.halt_reason == reason
        halted = page.get_by_role("region", name=f"Halted after {reason}")
        await expect(halted).to_be_visible()
        await tab.shot("run-halted")
        assert (
            await scalar(engine, "SELECT count(*) FROM resync_items WHERE status = 'pending'")
            == total - first_wave
        )

        await halted.get_by_role("button", name="Resume with wave").click()
        await expect(bar).to_have_attribute("aria-valuenow", str(total), timeout=30_000)
        await expect(page.locator("#run-live")).to_have_attribute("data-status", "partial")
        conflicts = page.get_by_role("table", name="Conflicting and failed organizations")
        await expect(conflicts.get_by_role("rowheader")).to_have_text(
            await conflicting_in_item_order(engine)
        )
        await expect(conflicts).to_contain_text("/name")
        await expect(page.get_by_role("img", name="Finished items over time")).to_be_visible()
        await expect(page.get_by_role("button", name="Retry")).to_be_visible()
        await tab.shot("run-finished")
        statuses = await rows(
            engine, "SELECT status, count(*) AS n FROM resync_items GROUP BY 1 ORDER BY 1"
        )
        assert {s.status: s.n for s in statuses} == {
            "conflict": len(CONFLICTING),
            "succeeded": total - len(CONFLICTING),
        }
        audit = await rows(
            engine,
            "SELECT action, actor_user_id FROM audit_log WHERE action LIKE 'resync.%' "
            "ORDER BY occurred_at",
        )
        assert [a.action for a in audit] == ["resync.started", "resync.resumed"]
        assert all(a.actor_user_id is not None for a in audit)
        assert tab.blocked == []
        assert tab.failed == []


async def conflicting_in_item_order(engine: AsyncEngine) -> list[str]:
    """The conflicting orgs as a run's page lists them: by wave, then slug."""
    found = await rows(
        engine,
        "SELECT o.slug FROM resync_items i JOIN organizations o ON o.id = i.organization_id "
        "WHERE i.status = 'conflict' ORDER BY i.wave, o.slug",
    )
    return [f.slug for f in found]


class TestPins:
    async def test_an_owner_pins_and_unpins_an_install(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        async with transaction(engine) as session:
            made = await demo.create(session)
        tab = await open_tab(browser, server)
        page = tab.page
        await tab.sign_in(made.owner_token)
        await tab.nav("Organizations")
        await page.get_by_role("link", name="Demo organization 01").click()
        await page.get_by_role("link", name="demo-crm").click()
        await expect(page.locator(".pin-state")).to_contain_text("Not pinned")
        await page.get_by_label("Reason").fill("Quarter close")
        await page.get_by_label("Until").fill("2099-01-31T18:00")
        await page.get_by_role("button", name="Pin at release 1").click()
        await expect(page.get_by_role("status")).to_contain_text("Pinned:")
        state = page.locator(".pin-state")
        await expect(state).to_contain_text(f"Pinned at release 1 by {demo.OWNER_EMAIL}")
        await expect(state).to_contain_text("until 2099-01-31 18:00 UTC")
        await expect(state).to_contain_text("Quarter close")
        await tab.shot("install-pinned")
        pinned = (
            await rows(
                engine,
                "SELECT a.pin_reason, a.pinned_until, u.email FROM agents a "
                "JOIN organizations o ON o.id = a.organization_id "
                "JOIN users u ON u.id = a.pinned_by_user_id WHERE o.slug = 'demo-org-01'",
            )
        )[0]
        assert (pinned.pin_reason, pinned.email) == ("Quarter close", demo.OWNER_EMAIL)
        assert pinned.pinned_until.isoformat() == "2099-01-31T18:00:00+00:00"

        await page.get_by_role("link", name="demo-org-01").click()
        await expect(page.get_by_role("row", name="demo-crm")).to_contain_text(
            "pinned by owner@demo.example, until 2099-01-31 18:00 UTC: Quarter close"
        )
        await page.get_by_role("link", name="demo-crm").click()
        await page.get_by_role("button", name="Unpin").click()
        await expect(page.get_by_role("status")).to_contain_text("Unpinned")
        assert (
            await scalar(
                engine,
                "SELECT count(*) FROM agents WHERE pinned_at IS NOT NULL",
            )
            == 0
        )
        assert [
            a.action
            for a in await rows(
                engine,
                "SELECT action FROM audit_log WHERE action LIKE 'install.%pinned' "
                "ORDER BY occurred_at",
            )
        ] == ["install.pinned", "install.unpinned"]
        assert tab.blocked == []
        assert tab.failed == []


PROMPT = "Find people.\nFind companies.\nLink each person to the company they work for.\n"
OURS = PROMPT.replace("Find people.", "Find people and their roles.")
THEIRS = PROMPT.replace("Link each person", "Link every person")


def story_doc(prompt: str = PROMPT) -> dict[str, Any]:
    doc = small_doc()
    doc["watchers"][0]["prompt"] = prompt
    return doc


async def customizable(engine: AsyncEngine) -> tuple[str, Any, Any]:
    """`starter` (its watcher's prompt spanning lines) installed in an owner's org."""
    await publish_template(engine, story_doc())
    owner, _, token = await make_user(engine, "owner@example.com")
    org = await make_org(engine, owner=owner, slug="acme")
    installed = await install_template(engine, owner, "starter", org.slug)
    return token, org, installed


async def current_prompt(engine: AsyncEngine, org: Any) -> tuple[str, int]:
    """The watcher's current prompt, and the release it was last mirrored from."""
    (row,) = await rows(
        engine,
        "SELECT v.prompt, r.version FROM watchers w "
        "JOIN watcher_versions v ON v.id = w.current_version_id "
        "JOIN template_releases r ON r.id = w.mirrored_release_id WHERE w.organization_id = :o",
        o=org,
    )
    return row.prompt, row.version


class TestOrganizationSchema:
    async def test_customize_see_the_drift_then_upgrade_keeping_ours(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        """The owner edits a watcher's prompt in its text area and an entity type's name,
        sees both as drift (the prompt line by line), then a release changes the same
        prompt: the install page offers the upgrade, shows its plan with the conflict, and
        the owner keeps their prompt."""
        token, org, _ = await customizable(engine)
        tab = await open_tab(browser, server)
        page = tab.page
        await tab.sign_in(token)
        await tab.nav("Organizations")
        await page.get_by_role("link", name="Test org").click()
        await page.get_by_role("link", name="Schema").click()
        await expect(page.get_by_role("heading", level=1)).to_have_text("acme: schema")
        watchers = page.get_by_role("table", name="Watchers of acme")
        await expect(watchers.get_by_role("row", name="inbox")).to_contain_text(
            "managed by starter, release 1"
        )

        await watchers.get_by_role("link", name="inbox").click()
        prompt = page.get_by_label("prompt")
        await expect(prompt).to_have_value(PROMPT)
        await prompt.fill(OURS)
        await page.get_by_role("button", name="Save").click()
        await expect(page.get_by_role("status")).to_contain_text("Saved")
        await expect(page.locator(".item-state")).to_contain_text("edited")
        await tab.shot("schema-item")

        await page.get_by_role("link", name="schema", exact=True).click()
        entity_types = page.get_by_role("table", name="Entity types of acme")
        await entity_types.get_by_role("link", name="person").click()
        await page.get_by_label("name", exact=True).fill("Contact")
        await page.get_by_role("button", name="Save").click()
        await expect(page.get_by_role("status")).to_contain_text("Saved")
        await page.get_by_role("link", name="schema", exact=True).click()
        for table, slug in ((entity_types, "person"), (watchers, "inbox")):
            await expect(table.get_by_role("row", name=slug)).to_contain_text("edited")
        await tab.shot("org-schema")

        await page.get_by_role("link", name="acme").first.click()
        await page.get_by_role("link", name="starter").click()
        diff = page.get_by_role("row", name="/prompt")
        await expect(diff.locator("del")).to_have_text(["-Find people."])
        await expect(diff.locator("ins")).to_have_text(["+Find people and their roles."])
        await expect(page.get_by_role("row", name="/name").get_by_role("cell").nth(1)).to_have_text(
            '"Contact"'
        )

        await publish_template(engine, story_doc(THEIRS))
        await page.reload()
        await expect(page.get_by_role("heading", name="Release 2 is available")).to_be_visible()
        await page.get_by_role("link", name="Review the upgrade to release 2").click()
        await expect(page.locator(".plan-summary")).to_contain_text("1 item(s) conflict")
        conflict = page.locator(".plan-item.action-conflict")
        await expect(conflict.locator("del")).to_have_text(
            ["-Find people and their roles.", "-Link each person to the company they work for."]
        )
        await expect(conflict.locator("ins")).to_have_text(
            ["+Find people.", "+Link every person to the company they work for."]
        )
        await tab.shot("upgrade-plan")
        # Nothing is written before the choice is made and confirmed.
        assert await current_prompt(engine, org.id) == (OURS, 1)
        await conflict.get_by_role("radio", name="Keep ours").check()
        await page.get_by_role("button", name="Upgrade to release 2").click()
        await expect(page.get_by_role("status")).to_contain_text("Upgraded")
        assert await current_prompt(engine, org.id) == (OURS, 2)
        history = page.get_by_role("table", name="What happened to this install")
        await expect(history.get_by_role("rowheader")).to_have_text(["install", "upgrade"])
        feed = await rows(
            engine,
            "SELECT type FROM events WHERE organization_id = :o ORDER BY seq",
            o=org.id,
        )
        assert [e.type for e in feed] == [
            "install.created",
            "schema.item_updated",
            "schema.item_updated",
            "install.upgraded",
        ]
        audit = await rows(
            engine,
            "SELECT action, actor_user_id FROM audit_log WHERE organization_id = :o "
            "ORDER BY occurred_at, id",
            o=org.id,
        )
        assert [a.action for a in audit][-3:] == [
            "schema.item_updated",
            "schema.item_updated",
            "install.upgraded",
        ]
        assert all(a.actor_user_id is not None for a in audit[-3:])
        assert tab.blocked == []
        assert tab.failed == []

    async def test_the_template_page_lists_its_contents_and_installs(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        await customizable(engine)
        tab = await open_tab(browser, server)
        await tab.sign_in(SERVER_TOKEN)
        await tab.goto("/console/templates/starter")
        await expect(
            tab.page.get_by_role("table", name="Watchers in release 1").get_by_role(
                "row", name="inbox"
            )
        ).to_contain_text("Inbox")
        installs = tab.page.get_by_role("table", name="Organizations with starter installed")
        await expect(installs.get_by_role("rowheader")).to_have_text(["acme"])


async def installs_in(engine: AsyncEngine, org: Any) -> dict[str, tuple[Any, str, int]]:
    """The org's installs by template: id, status and release."""
    found = await rows(
        engine,
        """SELECT q.slug, a.id, a.status, r.version FROM agents a
           JOIN agents t ON t.id = a.template_agent_id
           JOIN organizations q ON q.id = t.organization_id
           JOIN template_releases r ON r.id = a.installed_release_id
           WHERE a.organization_id = :o""",
        o=org,
    )
    return {r.slug: (r.id, r.status, r.version) for r in found}


class TestRequirements:
    async def test_upgrade_with_requirements_then_follow_the_links_between_them(
        self, engine: AsyncEngine, server: str, browser: Browser
    ) -> None:
        """Release 2 of `household-budget` requires `core-people`, which the org lacks: the
        upgrade's plan names it, the upgrade without "With requirements" is refused naming
        it, and with it both are installed. The install pages, then the template pages,
        link each to the other."""
        await publish_template(engine, core_doc())
        await publish_template(engine, budget_doc(requires=False))
        owner, _, token = await make_user(engine, "owner@example.com")
        org = await make_org(engine, owner=owner, slug="acme")
        installed = await install_template(engine, owner, "household-budget", org.slug)
        await publish_template(engine, budget_doc())
        tab = await open_tab(browser, server)
        page = tab.page
        await tab.sign_in(token)
        await tab.nav("Organizations")
        await page.get_by_role("link", name="Test org").click()
        await page.get_by_role("link", name="household-budget").click()
        await expect(page.get_by_role("heading", level=1)).to_have_text("household-budget in acme")
        requirements = page.get_by_role("region", name="Requirements")
        await expect(requirements).to_contain_text("Requires None. Required by None.")

        await page.get_by_role("link", name="Review the upgrade to release 2").click()
        unmet = page.get_by_role("list", name="Release 2 requires templates acme does not have")
        await expect(unmet.get_by_role("listitem")).to_have_text(
            ["core-people (release 1 or later): not installed"]
        )
        await expect(unmet.get_by_role("link", name="core-people")).to_have_attribute(
            "href", "/console/templates/core-people"
        )
        with_requirements = page.get_by_label("With requirements")
        await expect(with_requirements).not_to_be_checked()
        await page.get_by_role("button", name="Upgrade to release 2").click()
        await expect(page.get_by_role("alert")).to_contain_text(
            "Not upgraded: release 2 of household-budget requires core-people "
            "(release 1 or later), which acme does not have"
        )
        assert set(await installs_in(engine, org.id)) == {"household-budget"}

        await page.get_by_label("With requirements").check()
        await page.get_by_role("button", name="Upgrade to release 2").click()
        await expect(page.get_by_role("status")).to_contain_text("Upgraded")
        found = await installs_in(engine, org.id)
        assert {slug: i[1:] for slug, i in found.items()} == {
            "household-budget": ("active", 2),
            "core-people": ("active", 1),
        }
        budget, core = found["household-budget"][0], found["core-people"][0]
        assert budget == installed.id

        requires = page.get_by_role("list", name="Requires", exact=True)
        await expect(requires.get_by_role("listitem")).to_have_text(
            ["core-people, release 1 (release 1 or later required)"]
        )
        link = requires.get_by_role("link", name="core-people")
        await expect(link).to_have_attribute("href", f"/console/installs/{core}")
        await link.click()
        await expect(page.get_by_role("heading", level=1)).to_have_text("core-people in acme")
        required_by = page.get_by_role("list", name="Required by", exact=True)
        await expect(required_by.get_by_role("listitem")).to_have_text(
            ["household-budget, release 2"]
        )
        await expect(required_by.get_by_role("link", name="household-budget")).to_have_attribute(
            "href", f"/console/installs/{budget}"
        )

        await page.get_by_role("link", name="the template's releases").click()
        await expect(page.get_by_role("heading", level=1)).to_have_text("Core people")
        required_by = page.get_by_role("list", name="Required by", exact=True)
        link = required_by.get_by_role("link", name="household-budget")
        await expect(link).to_have_attribute("href", "/console/templates/household-budget")
        await expect(page.get_by_role("region", name="Requirements")).to_contain_text(
            "Requires None."
        )
        await link.click()
        await expect(page.get_by_role("heading", level=1)).to_have_text("Household budget")
        requires = page.get_by_role("list", name="Requires", exact=True)
        await expect(requires.get_by_role("listitem")).to_have_text(
            ["core-people, release 1 or later"]
        )
        await expect(requires.get_by_role("link", name="core-people")).to_have_attribute(
            "href", "/console/templates/core-people"
        )
        assert tab.blocked == []
        assert tab.failed == []
