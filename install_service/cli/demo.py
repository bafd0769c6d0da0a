"""`demo`: sample organizations, installs, local edits and a new release, for a first look."""

from __future__ import annotations

from typing import TYPE_CHECKING

from install_service.cli.base import main, run
from install_service.cli.output import emit, json_option, secret, table

if TYPE_CHECKING:
    from rich.console import RenderableType

    from install_service import demo

# What each org's own edit means for the new release.
_WHAT = {
    "none": "none",
    "merges": "account tier description (merges)",
    "conflicts": "deal name (conflicts at /name)",
}


def _view(result: demo.DemoResult) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    orgs = table(
        f"{result.template}: installed at release 1, now released up to {result.latest_version}",
        [
            "slug",
            ("created now", lambda o: "yes" if o.created else "no (kept)"),
            ("installed now", lambda o: "yes" if o.installed else "no (kept)"),
            ("local edits", lambda o: _WHAT[o.edit]),
            ("owner", lambda o: result.owner_email if o.owned_by_demo_owner else ""),
        ],
        result.organizations,
    )
    return Group(
        orgs,
        Text(
            "Next: open /console, sign in with the admin token, open Templates > "
            f"{result.template}, preview a staged resync with the form's defaults and start "
            "it: it halts after its first wave on the conflicts, and Resume moves the rest. "
            f"{result.owner_email} owns three of these organizations and sees only those "
            "(token below)."
        ),
    )


@main.command("demo")
@json_option
def demo_command() -> None:
    """Create sample organizations with the demo-crm template installed, local edits in some
    of them, and release 2 of demo-crm, which conflicts with some of those edits.

    Then open /console, sign in with the admin token and start a staged resync of demo-crm
    from its page.
    Running it again keeps what exists (and prints a new token for the demo owner)."""
    from install_service import demo

    result = run(demo.create)
    emit(result, view=_view)
    secret(f"token for {result.owner_email} (shown once)", result.owner_token)
