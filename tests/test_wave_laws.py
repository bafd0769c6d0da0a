"""The laws of wave assignment (`resync.waves.assign`, the one definition of a wave), checked
on generated fleets and wave lists."""

from __future__ import annotations

import math
import uuid
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from install_service.resync.waves import WaveSpec, assign

ORGS = st.lists(st.uuids(), max_size=60, unique=True)
LAWS = settings(max_examples=300, deadline=None)


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[uuid.UUID], list[WaveSpec]]:
    """Organizations in their stable order, and declared waves naming some of them."""
    orgs = draw(ORGS)
    specs = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["orgs", "count", "percent"] if orgs else ["count", "percent"]))
        if kind == "orgs":
            named = draw(st.lists(st.sampled_from(orgs), min_size=1, max_size=5))
            specs.append(WaveSpec(orgs=frozenset(named)))
        elif kind == "count":
            specs.append(WaveSpec(count=draw(st.integers(1, 30))))
        else:
            percent = draw(st.sampled_from([0.5, 1, 10, 33.3, 50, 66.7, 99.9, 100]))
            specs.append(WaveSpec(percent=float(percent)))
    return orgs, specs


@LAWS
@given(fleets())
def test_every_install_is_in_exactly_one_wave_numbered_from_one(
    fleet: tuple[list[uuid.UUID], list[WaveSpec]],
) -> None:
    orgs, specs = fleet
    result = assign(orgs, specs)
    assert len(result.waves) == len(orgs)
    assert all(1 <= wave <= result.count for wave in result.waves)
    assert result.count in (max(len(specs), 1), len(specs) + 1)


@LAWS
@given(fleets())
def test_a_named_org_is_in_the_first_wave_naming_it(
    fleet: tuple[list[uuid.UUID], list[WaveSpec]],
) -> None:
    orgs, specs = fleet
    wave_of = dict(zip(orgs, assign(orgs, specs).waves, strict=True))
    for org in orgs:
        naming = [n for n, spec in enumerate(specs, start=1) if org in (spec.orgs or ())]
        if naming:
            assert wave_of[org] == naming[0]


@LAWS
@given(fleets())
def test_count_and_percent_waves_take_installs_in_the_stable_order(
    fleet: tuple[list[uuid.UUID], list[WaveSpec]],
) -> None:
    orgs, specs = fleet
    named = {org for spec in specs for org in spec.orgs or ()}
    waves = [w for org, w in zip(orgs, assign(orgs, specs).waves, strict=True) if org not in named]
    assert waves == sorted(waves)  # never a later org in an earlier wave


@LAWS
@given(fleets())
def test_counts_take_n_and_percents_are_cumulative(
    fleet: tuple[list[uuid.UUID], list[WaveSpec]],
) -> None:
    orgs, specs = fleet
    per_wave = Counter(assign(orgs, specs).waves)
    named = {org for spec in specs for org in spec.orgs or ()}
    unnamed_left = len(orgs) - len(named)
    covered = 0
    for number, spec in enumerate(specs, start=1):
        size = per_wave[number]
        if spec.count is not None:
            assert size == min(spec.count, unnamed_left)
        elif spec.percent is not None:
            target = math.ceil(spec.percent * len(orgs) / 100 - 1e-9)
            # Up to the target, or as far as the installs no wave names go.
            assert covered + size == max(covered, min(target, covered + unnamed_left))
        if spec.orgs is None:
            unnamed_left -= size
        covered += size


@LAWS
@given(fleets())
def test_what_the_waves_leave_out_forms_one_last_wave(
    fleet: tuple[list[uuid.UUID], list[WaveSpec]],
) -> None:
    orgs, specs = fleet
    result = assign(orgs, specs)
    per_wave = Counter(result.waves)
    if not specs:
        assert result.count == 1
        assert per_wave[1] == len(orgs)
    elif result.count == len(specs) + 1:
        assert per_wave[result.count] > 0
    else:
        assert sum(per_wave.values()) == sum(per_wave[n] for n in range(1, len(specs) + 1))
    if specs and specs[-1].percent == 100:
        # Everything no later wave names is in by the last declared wave.
        assert result.count == len(specs)


def test_the_contract_example_is_10_then_half_then_the_rest() -> None:
    orgs = [uuid.UUID(int=i) for i in range(1000)]
    specs = [WaveSpec(count=10), WaveSpec(percent=50), WaveSpec(percent=100)]
    result = assign(orgs, specs)
    assert Counter(result.waves) == {1: 10, 2: 490, 3: 500}
    assert result.count == 3
    assert result.waves[:10] == [1] * 10
    assert result.waves[10:500] == [2] * 490
