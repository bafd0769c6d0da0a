"""The states of resync runs and their items: the one place they are named.

A leaf module (standard library only) on the package's ground floor: the models build their
CHECK constraints from it, the metrics their gauges, the resync schemas their types and its
service its transitions, and none of them imports the resync domain for it.

Run states:

- `scheduled`: created with a `start_at` in the future; a job scheduled for then starts it.
- `queued`: ready; the next worker job starts it.
- `running`: items of `current_wave` are being claimed.
- `baking`: the previous wave passed its check; the next (`current_wave`) starts at
  `next_step_at`.
- `halted`: the previous wave's conflict or failure rate was above its threshold;
  `current_wave` is the wave a `resume` starts.
- `paused`: stopped by an admin; `resume` goes back to where it was.
- `cancelled`, `succeeded`, `partial`, `failed`: finished.

No worker waits through `scheduled`, `baking`, `halted` or `paused`.
"""

from __future__ import annotations

from typing import Literal, get_args

RunStatus = Literal[
    "scheduled",
    "queued",
    "running",
    "baking",
    "halted",
    "paused",
    "cancelled",
    "succeeded",
    "partial",
    "failed",
]
ItemStatus = Literal["pending", "succeeded", "conflict", "failed", "skipped", "cancelled"]

RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
ITEM_STATUSES: tuple[str, ...] = get_args(ItemStatus)

# A template has at most one run in these states.
UNFINISHED = ("scheduled", "queued", "running", "baking", "halted", "paused")
FINISHED = ("cancelled", "succeeded", "partial", "failed")
# Waiting for a time (`next_step_at`) to come: a scheduled job moves them on.
WAITING = ("scheduled", "baking")
# Workers claim items of these runs (a queued run becomes running when a job starts it).
WORKING = ("queued", "running")
# Items a wave's rates count: the ones whose install was attempted.
ATTEMPTED = ("succeeded", "conflict", "failed")


def sql_list(values: tuple[str, ...]) -> str:
    """`('a', 'b')`: a list of states for SQL text (the values are the constants above)."""
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"
