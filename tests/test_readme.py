"""The README's snippets, run as written: the quick-start curl lines, the resync walk-through
and the watcher runner against a real server process, and the integration-test consumer in a
fresh directory of its own."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import URL
from standardwebhooks.webhooks import WebhookVerificationError

from install_service.testing import bearer, serving
from tests.conftest import ROOT, SERVER_TOKEN
from tests.webhook_receiver import Receiver

README = (ROOT / "README.md").read_text()


def block(marker: str, language: str = "sh", *, index: int = 0) -> str:
    """The `index`-th fenced block after the `<!-- marker: ... -->` comment."""
    match = re.search(rf"<!-- {marker}:[^>]*-->(.*)", README, re.S)
    assert match, f"README lost its {marker} block"
    blocks = re.findall(rf"```{language}\n(.*?)```", match.group(1), re.S)
    return blocks[index]


def bash(script: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        ["bash", "-euo", "pipefail", "-c", script],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_quickstart_runs_as_written(server: str) -> None:
    script = block("quickstart")
    # Only the address and the admin token differ from the README's own server.
    script = script.replace("http://127.0.0.1:8000", server).replace("change-me", SERVER_TOKEN)
    result = bash(script)
    assert result.returncode == 0, result.stderr + result.stdout
    assert '"action":"install"' in result.stdout  # the history
    assert '"dry_run":true' in result.stdout  # the upgrade plan


@pytest.mark.skipif(shutil.which("perl") is None, reason="perl is not installed")
def test_readme_resync_walkthrough_runs_as_written(
    install_service_database_url: URL, tmp_path: Path
) -> None:
    url = install_service_database_url.render_as_string(hide_password=False)
    with serving(
        install_service_database_url, admin_token=SERVER_TOKEN, log=tmp_path / "serve.log"
    ) as base:
        # One org with personal-finance installed (with business-core, which it requires), so
        # the resync has something to move.
        user = json.loads(
            bash(
                f"{sys.executable} -m install_service users create ada@example.com --json",
                env={**os.environ, "INSTALL_SERVICE_DATABASE_URL": url},
            ).stdout
        )
        installed = bash(
            f"curl -sf -X POST {base}/api/v1/installs -H 'Authorization: Bearer {user['token']}'"
            " -H 'Content-Type: application/json'"
            ' -d \'{"template": "personal-finance", "with_requirements": true}\''
        )
        assert installed.returncode == 0, installed.stderr
        # Only the program differs: this checkout's interpreter instead of `uv run`, in a
        # directory of its own that holds the bundled templates.
        bundled = Path("install_service", "templates", "bundled")
        shutil.copytree(ROOT / bundled, tmp_path / bundled)
        script = block("resync").replace(
            "uv run install-service", f"{sys.executable} -m install_service"
        )
        result = bash(script, cwd=tmp_path, env={**os.environ, "INSTALL_SERVICE_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr + result.stdout
    assert "would cut release 2" in result.stdout
    assert "personal-finance release 2 (new)" in result.stdout
    assert re.search(r"personal-finance v2 succeeded: 1 succeeded, 0 conflict", result.stdout)


@pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("perl") is None,
    reason="curl or perl is not installed",
)
def test_readme_customize_upgrade_resolve_runs_as_written(
    install_service_database_url: URL, tmp_path: Path
) -> None:
    url = install_service_database_url.render_as_string(hide_password=False)
    env = {**os.environ, "INSTALL_SERVICE_DATABASE_URL": url}
    with serving(
        install_service_database_url, admin_token=SERVER_TOKEN, log=tmp_path / "serve.log"
    ) as base:
        # Where the quick start leaves Ada: her household, personal-finance installed (with
        # business-core, which it requires).
        ada = json.loads(
            bash(
                f"{sys.executable} -m install_service users create ada@example.com --json", env=env
            ).stdout
        )
        with httpx.Client(base_url=base, headers=bearer(SERVER_TOKEN)) as admin:
            admin.post(
                "/api/v1/admin/organizations", json={"slug": "ada-household", "name": "Ada"}
            ).raise_for_status()
            admin.post(
                "/api/v1/admin/organizations/ada-household/members",
                json={"email": "ada@example.com", "role": "owner"},
            ).raise_for_status()
        installed = httpx.post(
            f"{base}/api/v1/installs",
            json={
                "template": "personal-finance",
                "organization": "ada-household",
                "with_requirements": True,
            },
            headers=bearer(ada["token"]),
        )
        assert installed.status_code == 201, installed.text
        # In a directory of its own that holds the bundled templates, as the resync's.
        bundled = Path("install_service", "templates", "bundled")
        shutil.copytree(ROOT / bundled, tmp_path / bundled)
        script = (
            block("customize")
            .replace("uv run install-service", f"{sys.executable} -m install_service")
            .replace("http://127.0.0.1:8000", base)
        )
        result = bash(script, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr + result.stdout
        lines = result.stdout.splitlines()
        assert '"name":"Bank account"' in result.stdout  # the PATCH's answer
        assert "watchers gmail-finance /prompt" in lines  # drift, as lines
        assert "(dry run; 1 conflict)" in result.stdout
        assert any(line.startswith("-Be very sceptical.") for line in lines)
        assert any(line.startswith("+Be sceptical of every sender.") for line in lines)
        assert "personal-finance v2 -> ada-household: upgrade" in result.stdout
        assert "ada-household schema.item_updated watchers:gmail-finance updated" in result.stdout
        with httpx.Client(base_url=base, headers=bearer(ada["token"])) as api:
            schema = "/api/v1/organizations/ada-household/schema"
            watcher = api.get(f"{schema}/watchers/gmail-finance").json()
            account = api.get(f"{schema}/entity-types/account").json()
            feed = api.get("/api/v1/organizations/ada-household/events").json()["items"]
    assert "Be very sceptical." in watcher["document"]["prompt"]
    assert (watcher["provenance"]["release"], watcher["edited"], watcher["version"]) == (2, True, 2)
    assert account["document"]["name"] == "Bank account"
    assert [(e["type"], e["data"].get("template")) for e in feed][:2] == [
        ("install.created", "business-core"),
        ("install.created", "personal-finance"),
    ]
    assert [e["type"] for e in feed][2:] == [
        "schema.item_updated",
        "schema.item_updated",
        "install.upgraded",
    ]


@pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("perl") is None,
    reason="curl or perl is not installed",
)
def test_readme_requirements_run_as_written(
    server: str, install_service_database_url: URL, tmp_path: Path
) -> None:
    url = install_service_database_url.render_as_string(hide_password=False)
    script = (
        block("requires")
        .replace("uv run install-service", f"{sys.executable} -m install_service")
        .replace("http://127.0.0.1:8000", server)
        .replace("change-me", SERVER_TOKEN)
    )
    result = bash(script, cwd=tmp_path, env={**os.environ, "INSTALL_SERVICE_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr + result.stdout
    out = result.stdout
    assert "vendor-core release 1 (new)" in out
    assert "purchasing release 1 (new)" in out
    assert "vendor-core release 2 (new)" in out
    # The JSON answers, one after another on stdout (curl adds no newline).
    answers, decoder, at = [], json.JSONDecoder(), out.find('{"')
    while at != -1:
        answer, at = decoder.raw_decode(out, at)
        answers.append(answer)
        at = out.find('{"', at)
    problems = [a for a in answers if "code" in a]
    assert [(p["status"], p["code"]) for p in problems] == [
        (422, "missing_requirement"),
        (409, "install_conflict"),
        (409, "required_by"),
    ]
    missing, conflict, required = problems
    assert missing["requirements"] == [
        {"template": "vendor-core", "version": None, "installed_version": None}
    ]
    assert [(c["slug"], c["reason"], c["required_by"]) for c in conflict["conflicts"]] == [
        (
            "vendor",
            "required_by",
            [{"kind": "relationship_types", "slug": "ordered_from", "template": "purchasing"}],
        )
    ]
    assert [d["template"] for d in required["required_by"]] == ["purchasing"]
    with httpx.Client(base_url=server, headers=bearer(SERVER_TOKEN)) as api:
        installs = api.get("/api/v1/organizations/acme/installs").json()["items"]
    assert sorted((i["template"]["slug"], i["version"], i["status"]) for i in installs) == [
        ("purchasing", 1, "uninstalled"),
        ("vendor-core", 1, "uninstalled"),
    ]


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not installed")
def test_readme_consumer_runs_from_a_fresh_directory(tmp_path: Path) -> None:
    project = tmp_path / "my-service"
    (project / "tests").mkdir(parents=True)
    # Only the path to this checkout differs from the README's.
    pyproject = block("consumer", "toml").replace('"../install-service"', f'"{ROOT}"')
    (project / "pyproject.toml").write_text(pyproject)
    (project / "tests" / "test_contacts.py").write_text(block("consumer", "python"))
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTHONPATH")
    }
    result = subprocess.run(
        ["uv", "run", "--quiet", "pytest", "-q", "-p", "no:cacheprovider"],  # noqa: S607
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 passed" in result.stdout
    # The snippet is complete: its first run warns of nothing (pytest-asyncio's loop scope).
    assert "warning" not in (result.stdout + result.stderr).lower(), result.stdout


def test_the_example_consumer_lockfile_follows_the_project() -> None:
    """CI runs the example consumer with `--locked`: a dependency added to the project must
    be locked there too, or CI fails after the whole suite has passed."""
    result = subprocess.run(
        ["uv", "lock", "--check", "--offline"],  # noqa: S607
        cwd=ROOT / "examples" / "consumer",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture
def webhook_server(
    install_service_database_url: URL, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """`serve` whose worker may deliver to this machine (the test's receiver)."""
    monkeypatch.setenv("INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE", "true")
    with serving(
        install_service_database_url, admin_token=SERVER_TOKEN, log=tmp_path / "serve.log"
    ) as base:
        yield base


def test_readme_runner_reads_the_feed_and_verifies_a_webhook(webhook_server: str) -> None:
    receiver = Receiver()
    receiver.start()
    try:
        with httpx.Client(base_url=webhook_server, headers=bearer(SERVER_TOKEN)) as api:
            hook = api.post("/api/v1/admin/webhooks", json={"url": receiver.url}).json()
            receiver.secret = hook["secret"]
            api.post("/api/v1/admin/organizations", json={"slug": "ada-household", "name": "Ada"})
            installed = api.post(
                "/api/v1/installs",
                json={
                    "template": "personal-finance",
                    "organization": "ada-household",
                    "with_requirements": True,
                },
            )
            assert installed.status_code == 201, installed.text
        script = block("runner", "python").replace("http://127.0.0.1:8000", webhook_server)
        script = script.replace("change-me", SERVER_TOKEN)
        namespace: dict[str, Any] = {}
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            exec(compile(script, "README.md", "exec"), namespace)  # noqa: S102 (the README's own)
        printed = output.getvalue()
        assert printed.startswith("install.created [('entity_types', ")
        assert "'gmail-finance': ('*/30 * * * *', '20" in printed  # and its next run

        deadline = time.monotonic() + 60
        while not receiver.raw and time.monotonic() < deadline:
            time.sleep(0.1)
        body, headers = receiver.raw[0]
        delivered = namespace["receive"](body, headers, hook["secret"])
        assert delivered["type"] in ("template.published", "install.created")
        with pytest.raises(WebhookVerificationError):
            namespace["receive"](body + b" ", headers, hook["secret"])
    finally:
        receiver.stop()
