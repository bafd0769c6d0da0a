"""Names that several layers share: the database's models, the domains and the edges.

A leaf module (standard library only), so that importing a name never imports the layer it
happens to be used in (the models, say, which cost a declarative mapping to import).
"""

from __future__ import annotations

# Every event type of the change feed, in the order the contract lists them.
EVENT_TYPES = (
    "install.created",
    "install.upgraded",
    "install.rolled_back",
    "install.reinstalled",
    "install.uninstalled",
    "install.reconciled",
    "install.item_detached",
    "template.published",
    "schema.item_created",
    "schema.item_updated",
    "schema.item_archived",
)

# A watcher that should run but has no `next_run_at` yet: a trigger clears it whenever the
# schedule changes or the watcher starts being scheduled; the service computes it (cron).
WATCHER_UNSCHEDULED = (
    "next_run_at IS NULL AND status = 'active' AND schedule_enabled AND schedule IS NOT NULL"
)
