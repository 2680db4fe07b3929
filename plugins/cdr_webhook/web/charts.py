"""The health charts, drawn here as SVG: no script, no chart library, nothing fetched from elsewhere.

Every bar and point carries its numbers (``data-*`` attributes, and a ``<title>`` a browser shows on
hover), so what a chart draws can be read back exactly, by a person and by the tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from markupsafe import Markup, escape

from cdr_webhook.ledger.health import EDGES_MS, describe_latency, percentile_of

if TYPE_CHECKING:
    import datetime as dt

    from cdr_webhook.ledger.health import BacklogSeries, Series

DELIVERED = "#38a169"
FAILED = "#e53e3e"
P50 = "#0073b1"
P95 = "#d69e2e"
QUEUED = "#718096"
IN_FLIGHT = "#3182ce"
RETRYING = "#dd6b20"


def _when(at: dt.datetime, step: dt.timedelta) -> str:
    return at.strftime("%Y-%m-%d %H:%M") + f" +{int(step.total_seconds() // 60)} min"


def _bars(series: Series, *, width: int, height: int, top: int, bottom: int, left: int) -> list[str]:
    """A stacked bar per point (delivered below, failures above), scaled to the busiest point."""
    points = series.points
    most = max((p.attempts for p in points), default=0) or 1
    slot = (width - left) / len(points)
    usable = height - top - bottom
    parts = []
    for i, point in enumerate(points):
        x = left + i * slot + slot * 0.1
        bar = slot * 0.8
        ok_h = usable * point.delivered / most
        bad_h = usable * point.failures / most
        base = height - bottom
        title = (
            f"{_when(point.at, series.period.step)}: {point.delivered} delivered, {point.failures} failed "
            f"({point.retried} to be retried, {point.failed} failed for good)"
        )
        parts.append(
            f'<g class="point" data-at="{point.at.isoformat()}" data-attempts="{point.attempts}" '
            f'data-delivered="{point.delivered}" data-failures="{point.failures}" '
            f'data-failed="{point.failed}"><title>{escape(title)}</title>'
            f'<rect x="{x:.1f}" y="{base - ok_h:.1f}" width="{bar:.1f}" height="{ok_h:.1f}" '
            f'fill="{DELIVERED}"/>'
            f'<rect x="{x:.1f}" y="{base - ok_h - bad_h:.1f}" width="{bar:.1f}" height="{bad_h:.1f}" '
            f'fill="{FAILED}"/></g>'
        )
    return parts


def trend(series: Series, *, width: int = 144, height: int = 28) -> Markup:
    """The Endpoints page's small chart: attempts per step, delivered and failed."""
    label = (
        f"{series.endpoint}, last {series.period.name}: {series.delivered} delivered, "
        f"{series.failures} failed attempts"
    )
    body = "".join(_bars(series, width=width, height=height, top=1, bottom=1, left=0))
    return Markup(
        f'<svg class="trend" data-chart="trend" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
        f"<title>{escape(label)}</title>{body}</svg>"
    )


def attempts_chart(series: Series, *, width: int = 720, height: int = 180) -> Markup:
    """The detail page's attempts per step: delivered and failed, with the scale and the period's ends."""
    left, bottom = 40, 20
    most = max((p.attempts for p in series.points), default=0)
    parts = _bars(series, width=width, height=height, top=8, bottom=bottom, left=left)
    parts += _axes(series, width=width, height=height, left=left, bottom=bottom, top_label=str(most))
    label = f"attempts per {_step_name(series)}: {series.delivered} delivered, {series.failures} failed"
    return _svg("attempts", label, width, height, parts)


def latency_chart(series: Series, *, pickup: bool = False, width: int = 720, height: int = 180) -> Markup:
    """The detail page's latency per step, p50 and p95: the POST's own, or commit→POST (``pickup``)."""
    left, bottom, top = 56, 20, 8
    values = []
    for point in series.points:
        histogram = (point.pickup if pickup else point.latency) or []
        values.append((percentile_of(histogram, 50), percentile_of(histogram, 95)))
    most = max((v for pair in values for v in pair if v is not None), default=0) or 1
    slot = (width - left) / len(series.points)
    usable = height - top - bottom
    parts = []
    for name, colour, index in (("p50", P50, 0), ("p95", P95, 1)):
        drawn = []
        for i, (point, pair) in enumerate(zip(series.points, values, strict=True)):
            value = pair[index]
            if value is None:
                continue
            x = left + i * slot + slot / 2
            y = height - bottom - usable * value / most
            drawn.append(f"{x:.1f},{y:.1f}")
            parts.append(
                f'<circle class="point" data-at="{point.at.isoformat()}" data-{name}="{value}" cx="{x:.1f}" '
                f'cy="{y:.1f}" r="2.5" fill="{colour}"><title>{escape(_when(point.at, series.period.step))}: '
                f"{name} {describe_latency(value)}</title></circle>"
            )
        if len(drawn) > 1:
            parts.insert(
                0, f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(drawn)}"/>'
            )
    parts += _axes(series, width=width, height=height, left=left, bottom=bottom, top_label=_duration(most))
    what = "commit→POST" if pickup else "POST"
    label = (
        f"{what} latency per {_step_name(series)}, p50 and p95: over the period p50 "
        f"{describe_latency(series.latency(50, pickup=pickup))}, "
        f"p95 {describe_latency(series.latency(95, pickup=pickup))}"
    )
    return _svg("pickup" if pickup else "latency", label, width, height, parts)


def backlog_chart(series: BacklogSeries, *, width: int = 720, height: int = 180) -> Markup:
    """The detail page's backlog per step, stacked: queued (below), taken by a run, waiting for a retry."""
    left, bottom, top = 40, 20, 8
    most = series.peak or 1
    slot = (width - left) / len(series.points)
    usable = height - top - bottom
    parts = []
    for i, point in enumerate(series.points):
        x, bar = left + i * slot + slot * 0.1, slot * 0.8
        seen = f"snapshot {point.seen:%H:%M}" if point.seen else "no snapshot: nothing queued, or no run"
        title = (
            f"{_when(point.at, series.period.step)}: {point.queued} queued, {point.in_flight} taken by a "
            f"run, {point.retrying} waiting for a retry ({seen})"
        )
        rects, base = [], height - bottom
        for count, colour in (
            (point.queued, QUEUED),
            (point.in_flight, IN_FLIGHT),
            (point.retrying, RETRYING),
        ):
            h = usable * count / most
            rects.append(
                f'<rect x="{x:.1f}" y="{base - h:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}"/>'
            )
            base -= h
        parts.append(
            f'<g class="point" data-at="{point.at.isoformat()}" data-queued="{point.queued}" '
            f'data-inflight="{point.in_flight}" data-retrying="{point.retrying}">'
            f"<title>{escape(title)}</title>{''.join(rects)}</g>"
        )
    parts += _axes(series, width=width, height=height, left=left, bottom=bottom, top_label=str(series.peak))
    label = f"backlog per {_step_name(series)}, each step's peak: at most {series.peak} queued CDR(s)"
    return _svg("backlog", label, width, height, parts)


def _duration(ms: int) -> str:
    """A scale's top, short enough for the axis: ``300 ms``, ``15 s``, ``> 1 h``."""
    if ms > EDGES_MS[-1]:
        return "> 1 h"
    return f"{ms} ms" if ms < 1000 else f"{ms / 1000:g} s"


def _step_name(series: Series | BacklogSeries) -> str:
    minutes = int(series.period.step.total_seconds() // 60)
    return f"{minutes} minutes" if minutes < 60 else f"{minutes // 60} hour(s)"


def _axes(
    series: Series | BacklogSeries, *, width: int, height: int, left: int, bottom: int, top_label: str
) -> list[str]:
    first = series.points[0]
    last = series.points[-1]
    base = height - bottom
    return [
        f'<line x1="{left}" y1="{base}" x2="{width}" y2="{base}" stroke="currentColor" stroke-opacity=".3"/>',
        f'<text x="{left - 4}" y="14" text-anchor="end" font-size="11" fill="currentColor">'
        f"{escape(top_label)}</text>",
        f'<text x="{left - 4}" y="{base}" text-anchor="end" font-size="11" fill="currentColor">0</text>',
        f'<text x="{left}" y="{height - 4}" font-size="11" fill="currentColor">{first.at:%m-%d %H:%M}</text>',
        f'<text x="{width}" y="{height - 4}" text-anchor="end" font-size="11" fill="currentColor">'
        f"{last.at:%m-%d %H:%M} UTC</text>",
    ]


def _svg(name: str, label: str, width: int, height: int, parts: list[str]) -> Markup:
    return Markup(
        f'<svg class="chart" data-chart="{name}" width="100%" viewBox="0 0 {width} {height}" '
        f'preserveAspectRatio="none" role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>'
        + "".join(parts)
        + "</svg>"
    )
