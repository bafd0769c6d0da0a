"""The README's quick-start curl lines, run as written against a real server process."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
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


def quickstart_block() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- quickstart:[^>]*-->\s*```sh\n(.*?)```", readme, re.S)
    assert match, "README lost its quick-start block"
    return match.group(1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_quickstart_runs_as_written(server: str) -> None:
    script = quickstart_block()
    # Only the address and the admin token differ from the README's own server.
    script = script.replace("http://127.0.0.1:8000", server).replace("change-me", SERVER_TOKEN)
    result = subprocess.run(  # noqa: S603
        ["bash", "-euo", "pipefail", "-c", script],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert '"action":"install"' in result.stdout  # the history
    assert '"dry_run":true' in result.stdout  # the upgrade plan


def runner_block() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- runner:[^>]*-->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README lost its runner block"
    return match.group(1)


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
                json={"template": "personal-finance", "organization": "ada-household"},
            )
            assert installed.status_code == 201, installed.text
        script = runner_block().replace("http://127.0.0.1:8000", webhook_server)
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
