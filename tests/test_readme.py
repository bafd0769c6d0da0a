"""The README's quick-start curl lines, run as written against a real server process."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, SERVER_TOKEN


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
