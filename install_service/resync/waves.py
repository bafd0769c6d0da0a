"""Which wave each install of a run is in: the one definition of a wave.

The selected installs are taken in a stable order, `STABLE_ORDER`: the MD5 of the
organization's id (then the id). MD5 rather than PostgreSQL's `hashtext` because it is
documented, the same on every server version and computable anywhere (a client, a test, a
spreadsheet), while `hashtext` is an internal function free to change between major versions;
a run, its retry, its resumption and a dry run must never reshuffle. It is an order, not a
secret, so MD5's weakness as a hash does not matter here.

Given that order and the declared waves `1..k`:

1. an organization named by `{orgs}` waves is in the first wave naming it;
2. walking the waves in order, `{count: N}` takes the next N installs in the stable order
   among those no wave names and no earlier wave took (fewer when they run out), and
   `{percent: P}` takes, in the same order, as many as bring the number of installs in waves
   `1..i` up to ceil(P% of the selected installs) (none when already there);
3. whatever is left forms one last wave, `k + 1`; with no waves declared, that is wave 1.

Declared waves may end up empty (a percent already reached); they keep their numbers so a
run's waves match its request.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

# The stable order of a run's installs (`a` is the install's `agents` row).
STABLE_ORDER = "md5(CAST(a.organization_id AS text)), a.organization_id"


@dataclass(frozen=True, kw_only=True)
class WaveSpec:
    """A declared wave, its organizations resolved to ids."""

    orgs: frozenset[uuid.UUID] | None = None
    count: int | None = None
    percent: float | None = None


@dataclass(frozen=True, kw_only=True)
class Assignment:
    # The wave of each install, in the order given.
    waves: list[int]
    # Waves are numbered 1..count.
    count: int


def assign(ordered: Sequence[uuid.UUID], specs: Sequence[WaveSpec]) -> Assignment:
    """The wave of each organization of `ordered` (the selected installs' organizations, in
    the stable order). Organizations named in `specs` must all be in `ordered`."""
    named: dict[uuid.UUID, int] = {}
    for number, spec in enumerate(specs, start=1):
        for org in sorted(spec.orgs or ()):
            named.setdefault(org, number)
    named_per_wave = Counter(named.values())
    pool = [org for org in ordered if org not in named]
    taken: dict[uuid.UUID, int] = dict(named)
    next_in_pool = 0
    covered = 0
    for number, spec in enumerate(specs, start=1):
        covered += named_per_wave[number]
        if spec.count is not None:
            wanted = spec.count
        elif spec.percent is not None:
            target = math.ceil(Decimal(repr(spec.percent)) * len(ordered) / 100)
            wanted = max(0, target - covered)
        else:
            wanted = 0
        chosen = pool[next_in_pool : next_in_pool + wanted]
        next_in_pool += len(chosen)
        covered += len(chosen)
        taken.update(dict.fromkeys(chosen, number))
    leftover = pool[next_in_pool:]
    last = len(specs) + 1
    taken.update(dict.fromkeys(leftover, last))
    return Assignment(
        waves=[taken[org] for org in ordered], count=last if leftover or not specs else len(specs)
    )
