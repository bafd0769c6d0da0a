"""The merge settles a field only one side changed without a nested call.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06 17:00

Reviewed by hand. `install_merge` merged every field of an item (with the merge policy) by a
query on `install_merge_value`, whose first steps settle a field that no resolution names
and that the org, or the release, left as the base had it (or that both changed alike):
most fields of an edited row. Each such query cost more than the rest of the field's work
(a merge of an entity type took about 0.3 ms, most of a fleet dry run's time where orgs
edited rows). `install_merge` now settles those fields itself, with the same outcomes,
and calls `install_merge_value` for the others. Nothing else changes; downgrading restores
the previous function.
"""

from collections.abc import Sequence

from alembic import op

from install_service.db.migrate import revision_module

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What `install_merge_value` does first for a field with no resolution (`take`), inline.
SETTLED = """
            ELSIF coalesce(resolutions ->> at, whole) IS NULL
                  AND (h IS NOT DISTINCT FROM b OR t IS NOT DISTINCT FROM b
                       OR t IS NOT DISTINCT FROM h) THEN
                IF h IS NOT DISTINCT FROM b THEN  -- only the release changed it, if anyone
                    v := t;
                    IF t IS DISTINCT FROM b THEN
                        f := install_outcome(at, 'merged');
                    END IF;
                ELSIF t IS NOT DISTINCT FROM b THEN  -- only the org changed it
                    v := h;
                    f := install_outcome(at, 'kept_local');
                ELSE  -- both changed it the same way
                    v := h;
                    f := install_outcome(at, 'merged');
                END IF;"""

# Where the settled fields go: before the call of `install_merge_value`.
CALL = "\n            ELSE\n                SELECT m.merged, m.fields INTO v, f"


def _merge(settled: str) -> str:
    """`install_merge` as migration 0005 made it (the same code), with `settled` inserted."""
    functions: tuple[str, ...] = revision_module("2026-11-30-0800_merge.py").FUNCTIONS
    (merge,) = (f for f in functions if "FUNCTION install_merge(" in f)
    if CALL not in merge:
        raise RuntimeError("install_merge is not the function this revision replaces")
    return merge.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1).replace(
        CALL, settled + CALL, 1
    )


def upgrade() -> None:
    op.execute(_merge(SETTLED))


def downgrade() -> None:
    op.execute(_merge(""))
