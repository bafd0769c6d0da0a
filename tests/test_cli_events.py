"""The webhooks and events commands, run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from install_service.orgs.service import Actor
from install_service.testing import install_template, make_org, publish_template
from tests.conftest import small_doc


def cli(url: URL, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "INSTALL_SERVICE_DATABASE_URL": url.render_as_string(hide_password=False),
    }
    env.pop("INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE", None)
    return subprocess.run(  # noqa: S603 (our own entry point)
        [sys.executable, "-m", "install_service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_webhook_commands(engine: AsyncEngine, install_service_database_url: URL) -> None:
    url = install_service_database_url
    await make_org(engine, slug="acme")
    created = cli(
        url,
        "webhooks",
        "create",
        "https://93.184.216.34/hooks",
        "--event-type",
        "install.created",
        "--org",
        "acme",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    endpoint = json.loads(created.stdout)
    assert endpoint["secret"].startswith("whsec_")
    assert [o["slug"] for o in endpoint["organizations"]] == ["acme"]
    listed = json.loads(cli(url, "webhooks", "list", "--json").stdout)
    assert [e["id"] for e in listed] == [endpoint["id"]]
    disabled = json.loads(cli(url, "webhooks", "disable", endpoint["id"], "--json").stdout)
    assert disabled["enabled"] is False
    enabled = json.loads(cli(url, "webhooks", "enable", endpoint["id"], "--json").stdout)
    assert enabled["enabled"] is True
    assert json.loads(cli(url, "webhooks", "deliveries", endpoint["id"], "--json").stdout) == []
    assert cli(url, "webhooks", "delete", endpoint["id"]).returncode == 0
    assert json.loads(cli(url, "webhooks", "list", "--json").stdout) == []

    refused = cli(url, "webhooks", "create", "http://127.0.0.1:8080/hooks")
    assert refused.returncode == 1
    assert "webhook_address_not_allowed" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = cli(url, "webhooks", "disable", "00000000-0000-0000-0000-000000000000")
    assert (missing.returncode, "webhook_not_found" in missing.stderr) == (1, True)


async def test_events_tail(engine: AsyncEngine, install_service_database_url: URL) -> None:
    url = install_service_database_url
    await publish_template(engine, small_doc())
    await make_org(engine, slug="acme")
    await install_template(engine, Actor.system(), "starter", "acme")
    everything = cli(url, "events", "tail", "--json")
    assert everything.returncode == 0, everything.stderr
    types = [json.loads(line)["type"] for line in everything.stdout.splitlines()]
    assert types == ["template.published", "install.created"]
    cursor = everything.stderr.strip().splitlines()[-1].removeprefix("cursor: ")
    assert cli(url, "events", "tail", "--json", "--cursor", cursor).stdout == ""
    acme = cli(url, "events", "tail", "--org", "acme")
    assert "install.created" in acme.stdout
    assert "template.published" not in acme.stdout
