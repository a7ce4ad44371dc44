"""Chart geometry for the dashboard: numbers in, positions out; the SVG itself is drawn
by the Jinja templates (templates/dashboard/_charts.html), so the page needs no
JavaScript charting library and no internet.

`line_chart` lays out series of (x, y) points on a plot box with "nice" ticks;
`class_bars` turns per-class IoU (and the previous version's) into bars with deltas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

__all__ = ["Bar", "ChartPoint", "LineChart", "Series", "class_bars", "line_chart",
           "nice_ticks", "time_label", "time_ticks"]

WIDTH, HEIGHT = 560, 300
MARGIN = {"left": 52, "right": 34, "top": 16, "bottom": 44}


@dataclass(frozen=True)
class ChartPoint:
    x: float  # data units
    y: float
    px: float  # pixels in the SVG
    py: float
    version: str
    tooltip: str


@dataclass
class Series:
    name: str
    css: str  # class of the line and its points: teacher / student
    points: list[ChartPoint] = field(default_factory=list)

    @property
    def path(self) -> str:
        """SVG polyline `points`."""
        return " ".join(f"{p.px:.1f},{p.py:.1f}" for p in self.points)


@dataclass
class LineChart:
    x_label: str
    y_label: str
    series: list[Series]
    x_ticks: list[tuple[float, str]]  # (pixel, label)
    y_ticks: list[tuple[float, str]]
    width: int = WIDTH
    height: int = HEIGHT
    left: float = MARGIN["left"]
    top: float = MARGIN["top"]
    right: float = WIDTH - MARGIN["right"]
    bottom: float = HEIGHT - MARGIN["bottom"]

    @property
    def empty(self) -> bool:
        return not any(s.points for s in self.series)


@dataclass(frozen=True)
class Bar:
    name: str
    value: float | None  # percent, None = class absent from the holdout
    previous: float | None
    delta: float | None  # percentage points against the previous version

    @property
    def width(self) -> float:
        return 0.0 if self.value is None else max(0.0, min(100.0, self.value))

    @property
    def trend(self) -> str:
        if self.delta is None or abs(self.delta) < 0.05:
            return "flat"
        return "up" if self.delta > 0 else "down"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round numbers covering [low, high] (1, 2, 2.5 or 5 times 10^k)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
              43200, 86400, 172800, 604800, 2592000)  # seconds: round clock intervals


def time_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` epoch seconds on round clock times (UTC) covering [low, high]."""
    raw = (high - low) / max(1, count)
    step = next((s for s in TIME_STEPS if s >= raw), TIME_STEPS[-1])
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def time_label(epoch: float, span_s: float = 86400.0) -> str:
    """UTC time of `epoch`, as precise as a chart spanning `span_s` seconds needs."""
    pattern = "%H:%M:%S" if span_s < 600 else "%H:%M" if span_s < 86400 else "%m-%d %H:%M"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime(pattern)


def _span(values: Sequence[float], floor: float | None = None, pad: float | None = None
          ) -> tuple[float, float]:
    low, high = min(values), max(values)
    if floor is not None:
        low = min(low, floor)
    if high - low < 1e-9:  # one point, or all equal: give it room
        pad = pad or abs(high) * 0.1 or 1.0
        low, high = low - pad, high + pad
        if floor is not None:
            low = max(low, floor)
    return low, high


def line_chart(data: dict[str, list[tuple[float, float, str, str]]], *, x_label: str,
               y_label: str, x_format: Callable[[float], str] = "{:g}".format,
               y_floor: float | None = 0.0, x_time: bool = False) -> LineChart:
    """`data`: series name -> [(x, y, version, tooltip)], drawn in the given order;
    series named "teacher"/"student" get those CSS classes. `x_time`: x is epoch
    seconds, ticked on round clock times."""
    chart = LineChart(x_label, y_label, [], [], [])
    points = [p for values in data.values() for p in values]
    if not points:
        chart.series = [Series(name, name) for name in data]
        return chart
    x_span = _span([p[0] for p in points], pad=300.0 if x_time else None)
    x_ticks = time_ticks(*x_span) if x_time else nice_ticks(*x_span)
    y_ticks = nice_ticks(*_span([p[1] for p in points], y_floor))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return chart.left + (x - x0) / ((x1 - x0) or 1) * (chart.right - chart.left)

    def py(y: float) -> float:
        return chart.bottom - (y - y0) / ((y1 - y0) or 1) * (chart.bottom - chart.top)

    chart.x_ticks = [(px(t), x_format(t)) for t in x_ticks]
    chart.y_ticks = [(py(t), f"{t:g}") for t in y_ticks]
    for name, values in data.items():
        series = Series(name, name)
        for x, y, version, tooltip in sorted(values, key=lambda v: v[0]):
            series.points.append(ChartPoint(x, y, px(x), py(y), version, tooltip))
        chart.series.append(series)
    return chart


def class_bars(classes: Sequence[str], iou: Sequence[float | None],
               previous: Sequence[float | None] | None = None) -> list[Bar]:
    """One bar per class, IoU in percent, with the change from `previous` (same class
    order; shorter or None lists leave the delta out)."""
    previous = list(previous or [])
    bars = []
    for index, name in enumerate(classes):
        value = _percent(iou[index] if index < len(iou) else None)
        before = _percent(previous[index] if index < len(previous) else None)
        delta = None if value is None or before is None else round(value - before, 1)
        bars.append(Bar(str(name), value, before, delta))
    return bars


def _percent(value) -> float | None:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return round(100.0 * float(value), 1)
