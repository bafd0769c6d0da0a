"""The webhooks and events commands: the admin API's webhook operations and following the
change feed from a terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import Cli, small_doc


@pytest.fixture(autouse=True)
def public_addresses_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE", raising=False)


def test_webhook_commands(cli: Cli) -> None:
    assert cli("orgs", "create", "acme").exit_code == 0
    created = cli(
        "webhooks",
        "create",
        "https://93.184.216.34/hooks",
        "--event-type",
        "install.created",
        "--org",
        "acme",
        "--json",
    )
    assert created.exit_code == 0, created.stderr
    endpoint = created.json()
    assert endpoint["secret"].startswith("whsec_")
    assert [o["slug"] for o in endpoint["organizations"]] == ["acme"]
    assert [e["id"] for e in cli("webhooks", "list", "--json").json()] == [endpoint["id"]]
    assert cli("webhooks", "disable", endpoint["id"], "--json").json()["enabled"] is False
    assert cli("webhooks", "enable", endpoint["id"], "--json").json()["enabled"] is True
    assert cli("webhooks", "deliveries", endpoint["id"], "--json").json() == []
    table = cli("webhooks", "list")
    assert (table.exit_code, "acme" in table.stdout) == (0, True)
    assert cli("webhooks", "delete", endpoint["id"]).exit_code == 0
    assert cli("webhooks", "list", "--json").json() == []
    plain = cli("webhooks", "create", "https://93.184.216.34/other")
    [secret] = [x for x in plain.stdout.splitlines() if x.startswith("signing secret")]
    assert secret.startswith("signing secret (shown once): whsec_")
    [other] = cli("webhooks", "list", "--json").json()
    assert cli("webhooks", "delete", other["id"], "--json").json()["url"].endswith("/other")

    refused = cli("webhooks", "create", "http://127.0.0.1:8080/hooks")
    assert (refused.exit_code, "webhook_address_not_allowed" in refused.stderr) == (1, True)
    assert "Traceback" not in refused.stderr
    unknown_type = cli(
        "webhooks", "create", "https://93.184.216.34/", "--event-type", "x", "--json"
    )
    assert (unknown_type.exit_code, unknown_type.json()["code"]) == (1, "invalid_request")
    unknown_org = cli("webhooks", "create", "https://93.184.216.34/", "--org", "nowhere", "--json")
    assert unknown_org.json()["organizations"] == ["nowhere"]
    missing = cli("webhooks", "disable", "00000000-0000-0000-0000-000000000000", "--json")
    assert (missing.exit_code, missing.json()["code"]) == (1, "webhook_not_found")
    assert cli("webhooks", "list", "--json").json() == []


def test_events_tail(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "template.yaml").write_text(yaml.safe_dump(small_doc()))
    assert cli("templates", "publish", str(tmp_path)).exit_code == 0
    assert cli("orgs", "create", "acme").exit_code == 0
    assert cli("install", "starter", "--org", "acme").exit_code == 0
    everything = cli("events", "tail", "--json")
    assert everything.exit_code == 0, everything.stderr
    types = [json.loads(line)["type"] for line in everything.stdout.splitlines()]
    assert types == ["template.published", "install.created"]
    cursor = everything.stderr.strip().splitlines()[-1].removeprefix("cursor: ")
    assert cli("events", "tail", "--json", "--cursor", cursor).stdout == ""
    acme = cli("events", "tail", "--org", "acme")
    assert "install.created" in acme.stdout
    assert "template.published" not in acme.stdout
    nowhere = cli("events", "tail", "--org", "nowhere", "--json")
    assert (nowhere.exit_code, nowhere.json()["code"]) == (1, "org_not_found")
