"""`install-service`: run the service and operate it from the command line.

One module per domain (`serve`, `db`, `templates`, `installs`, `resync`, `orgs`, `audit`,
`events` for webhooks and the change feed, `schema` for an organization's own items; `demo`
makes sample data), each a thin layer over the service functions the HTTP API calls; `output`
is how every command prints and `base` holds the group, its error policy and the unit of work.
"""

from install_service.cli import (
    audit,
    db,
    demo,
    events,
    installs,
    orgs,
    resync,
    schema,
    serve,
    templates,
)
from install_service.cli.base import main

__all__ = [
    "audit",
    "db",
    "demo",
    "events",
    "installs",
    "main",
    "orgs",
    "resync",
    "schema",
    "serve",
    "templates",
]
