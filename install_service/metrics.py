"""Prometheus metrics of the service's own work (HTTP metrics come from Litestar's plugin)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

INSTALLS = Counter(
    "install_service_installs",
    "Install, upgrade, rollback and uninstall requests by outcome",
    ["action", "outcome"],
)
INSTALL_SECONDS = Histogram(
    "install_service_install_seconds",
    "Time to run one install through the engine, commit included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RESYNC_ITEMS = Counter(
    "install_service_resync_items",
    "Resync items finished, by status",
    ["status"],
)
WEBHOOK_ATTEMPTS = Counter(
    "install_service_webhook_attempts",
    "Webhook delivery attempts by outcome (succeeded, failed, redelivered)",
    ["outcome"],
)
