"""Geometry for the console's inline SVG: a run's progress bar and its outcomes over time.

Presentation only: the numbers come from the resync service; this turns them into
coordinates the templates draw, so pages need no JavaScript charting library and render the
same without a network.
"""

from __future__ import annotations

from dataclasses import dataclass

from install_service.resync.schemas import RunCounts, RunTimeline

WIDTH = 600
HEIGHT = 160
# Outcome order, bottom to top in the chart and left to right in the bar.
OUTCOMES = ("succeeded", "conflict", "failed")


@dataclass(frozen=True)
class Segment:
    outcome: str
    x: float
    width: float
    count: int


def progress(counts: RunCounts) -> list[Segment]:
    """The bar's segments, each as wide as its share of the run's items (pending last)."""
    total = counts.total or 1
    segments = []
    x = 0.0
    for outcome in (*OUTCOMES, "pending"):
        count = getattr(counts, outcome)
        width = WIDTH * count / total
        segments.append(Segment(outcome=outcome, x=round(x, 2), width=round(width, 2), count=count))
        x += width
    return segments


@dataclass(frozen=True)
class Band:
    outcome: str
    points: str


def bands(timeline: RunTimeline) -> list[Band]:
    """One stacked area per outcome: cumulative finished items over time, scaled to the run's
    total (so a finished run fills the chart up to its share of successes, conflicts and
    failures)."""
    total = timeline.total or 1
    n = len(timeline.points)
    xs = [WIDTH * i / max(n - 1, 1) for i in range(n)]
    below = [0] * n
    result = []
    for outcome in OUTCOMES:
        above = [below[i] + getattr(p, outcome) for i, p in enumerate(timeline.points)]
        top = [(xs[i], HEIGHT - HEIGHT * above[i] / total) for i in range(n)]
        bottom = [(xs[i], HEIGHT - HEIGHT * below[i] / total) for i in reversed(range(n))]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in top + bottom)
        result.append(Band(outcome=outcome, points=points))
        below = above
    return result
