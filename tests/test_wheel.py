"""The built wheel on its own: installed into a fresh virtual environment outside the checkout,
it migrates and seeds a database (`serve` to `/readyz`), and its pytest plugin runs another
project's tests. Everything it needs (migrations, bundled templates) travels inside it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import URL

from install_service.testing import bearer
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not installed")

# The consumer's test: only the plugin's public fixtures and factories.
CONSUMER_TEST = """
from importlib.resources import files
from pathlib import Path

from sqlalchemy import text

from install_service.testing import (
    bearer, install_template, make_org, make_user, publish_template,
)


async def test_a_bundled_template_installs(install_service_engine, install_service_client):
    owner, _, token = await make_user(install_service_engine)
    org = await make_org(install_service_engine, owner=owner, slug="acme")
    # A document the wheel carries, read from where the wheel put it.
    bundled = Path(str(files("install_service").joinpath("templates", "bundled")))
    # sales-crm builds on business-core: that is published first, and installed with it.
    await publish_template(install_service_engine, bundled / "business-core")
    await publish_template(install_service_engine, bundled / "sales-crm")
    result = await install_template(
        install_service_engine, owner, "sales-crm", "acme", with_requirements=True
    )
    assert result.created
    async with install_service_engine.connect() as conn:
        count = await conn.scalar(
            text("SELECT count(*) FROM entity_types WHERE organization_id = :o"), {"o": org.id}
        )
    assert count > 0
    response = await install_service_client.get(
        "/api/v1/organizations/acme/installs", headers=bearer(token)
    )
    assert response.status_code == 200
"""

ADMIN = "wheel-admin-token"

CONSUMER_CONFIG = """[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    """This environment without anything that points into the checkout or its venv."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name
        not in (
            "VIRTUAL_ENV",
            "UV_PROJECT_ENVIRONMENT",
            "PYTHONPATH",
            "INSTALL_SERVICE_DATABASE_URL",
        )
    }
    return env | extra


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(  # noqa: S603 (our own tools and paths)
        [str(c) for c in command],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """A fresh virtual environment, outside the checkout, holding the wheel built from it
    (dependencies at the versions this project locks, so uv's cache has them)."""
    with tempfile.TemporaryDirectory(prefix="install-service-wheel-") as directory:
        where = Path(directory)
        _run("uv", "build", "--wheel", "--quiet", "--out-dir", where / "dist", cwd=ROOT)
        [wheel] = (where / "dist").glob("install_service-*.whl")
        requirements = where / "requirements.txt"
        _run(
            "uv", "export", "--frozen", "--quiet", "--no-hashes", "--no-emit-project",
            "--no-dev", "--extra", "testing", "--output-file", requirements,
            cwd=ROOT,
        )  # fmt: skip
        venv = where / "venv"
        _run("uv", "venv", "--quiet", "--python", sys.executable, venv, cwd=where)
        python = venv / "bin" / "python"
        _run(
            "uv", "pip", "install", "--quiet", "--python", python, "--requirement",
            requirements, f"install-service[testing] @ {wheel.as_uri()}",
            cwd=where,
        )  # fmt: skip
        yield venv


def test_the_wheel_is_used_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    found = _run(
        installed / "bin" / "python",
        "-c",
        "import install_service; print(install_service.__file__)",
        cwd=tmp_path,
    )
    assert Path(found.strip()).is_relative_to(installed), found


def test_serve_migrates_seeds_and_gets_ready_on_a_fresh_data_dir(
    installed: Path, data_root: Path, tmp_path: Path
) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
    env = _env(INSTALL_SERVICE_DATA_DIR=str(data_root), INSTALL_SERVICE_ADMIN_TOKEN=ADMIN)
    with log.open("w") as out:
        process = subprocess.Popen(  # noqa: S603 (the installed entry point)
            [str(installed / "bin" / "install-service"), "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                ready = httpx.get(f"{base}/readyz", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        templates = httpx.get(f"{base}/api/v1/templates", headers=bearer(ADMIN)).json()
        assert {"business-core", "hiring-pipeline", "personal-finance", "sales-crm"} <= {
            t["slug"] for t in templates["items"]
        }
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_the_installed_plugin_runs_a_consumers_tests(
    installed: Path, tmp_path: Path, install_service_server_url: URL
) -> None:
    """A project that is not this checkout, whose tests use the plugin from the wheel (on this
    run's PostgreSQL server; the plugin's databases are named after its own process)."""
    project = tmp_path / "consumer"
    (project / "tests").mkdir(parents=True)
    (project / "pytest.ini").write_text(CONSUMER_CONFIG)
    (project / "tests" / "test_provisioning.py").write_text(CONSUMER_TEST)
    server = install_service_server_url.render_as_string(hide_password=False)
    output = _run(
        installed / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
        cwd=project,
        env=_env(INSTALL_SERVICE_DATABASE_URL=server),
    )  # fmt: skip
    assert "1 passed" in output, output
    assert "warning" not in output.lower(), output
