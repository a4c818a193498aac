"""The competition page's charts, drawn on the server as inline SVG: they need no JavaScript
and no request of their own, and every name in them is escaped text.

``progress_svg``: each team's best score over time (a step line per team, baselines dashed).
``distribution_svg``: how the board's scores spread (a histogram of each team's score).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 40, 210, 14, 34  # the plot area's margins (the legend on the right)
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
MAX_TEAMS = len(PALETTE)  # more lines than colours would not be read


@dataclass(frozen=True)
class Point:
    team: str
    baseline: bool
    at: dt.datetime
    average: float  # 0..1


def _svg(label: str, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="100%" role="img" aria-label="{escape(label)}" class="chart">'
        f"<title>{escape(label)}</title>" + "".join(body) + "</svg>"
    )


def _y_axis(low: float, high: float, y: object) -> list[str]:
    """Gridlines and labels every 5 or 10 points of score."""
    step = 5 if high - low <= 30 else 10
    parts = []
    for tick in range(int(math.ceil(low / step) * step), int(high) + 1, step):
        at = y(tick / 100)  # type: ignore[operator]
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{at:.1f}" y2="{at:.1f}" stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{at + 4:.1f}" text-anchor="end" font-size="11">{tick}</text>'
        )
    return parts


def _score_range(averages: list[float]) -> tuple[float, float]:
    """The shown range in points, padded to whole steps around the scores."""
    low, high = min(averages) * 100, max(averages) * 100
    return max(0.0, math.floor(low / 5) * 5 - 5), min(100.0, math.ceil(high / 5) * 5 + 5)


def progress_svg(points: list[Point]) -> str | None:
    """Each team's best average so far against submission time; None with nothing to draw.
    The teams with the best scores are drawn (``MAX_TEAMS``); baselines are dashed levels."""
    if not points:
        return None
    best: dict[str, float] = {}
    for p in points:
        best[p.team] = max(best.get(p.team, 0.0), p.average)
    shown = sorted(best, key=lambda team: -best[team])[:MAX_TEAMS]
    points = sorted((p for p in points if p.team in shown), key=lambda p: p.at)
    start, end = points[0].at, points[-1].at
    span = max((end - start).total_seconds(), 1.0)
    low, high = _score_range([p.average for p in points])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at: dt.datetime) -> float:
        return LEFT + plot_w * (at - start).total_seconds() / span

    def y(average: float) -> float:
        return TOP + plot_h * (1 - (average * 100 - low) / (high - low))

    body = _y_axis(low, high, y)
    for label, at, anchor in ((start, LEFT, "start"), (end, WIDTH - RIGHT, "end")):
        body.append(
            f'<text x="{at}" y="{HEIGHT - 12}" text-anchor="{anchor}" font-size="11">'
            f"{label:%Y-%m-%d %H:%M} UTC</text>"
        )
    for index, team in enumerate(shown):
        colour = PALETTE[index]
        mine = [p for p in points if p.team == team]
        path: list[str] = []
        level: float | None = None
        for p in mine:  # a step up at each new best
            if level is not None and p.average <= level:
                continue
            if level is None:
                path.append(f"M{x(p.at):.1f} {y(p.average):.1f}")
            else:
                path.append(f"H{x(p.at):.1f} V{y(p.average):.1f}")
            level = p.average
        path.append(f"H{WIDTH - RIGHT}")
        dash = ' stroke-dasharray="5 4"' if mine[0].baseline else ""
        body.append(
            f'<path d="{" ".join(path)}" fill="none" stroke="{colour}" stroke-width="2"{dash}>'
            f"<title>{escape(team)}: best {best[team] * 100:.1f}</title></path>"
        )
        name = team if len(team) <= 18 else team[:17] + "…"
        body.append(
            f'<text x="{WIDTH - RIGHT + 8}" y="{TOP + 12 + 16 * index}" font-size="12" '
            f'fill="{colour}">{escape(name)} {best[team] * 100:.1f}'
            f"{' (baseline)' if mine[0].baseline else ''}</text>"
        )
    return _svg("Each team's best average score over time", body)


def distribution_svg(averages: list[float], baselines: list[float]) -> str | None:
    """A histogram of the board's scores (one per team, in 5-point bins), the baselines marked;
    None with nothing to draw."""
    if not averages:
        return None
    low, high = _score_range(averages + baselines)
    bins = [0] * max(1, int((high - low) // 5))
    for average in averages:
        bins[min(len(bins) - 1, int((average * 100 - low) // 5))] += 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    tallest, width = max(bins), plot_w / len(bins)
    body = []
    for index, count in enumerate(bins):
        bar = plot_h * count / tallest
        left = LEFT + index * width
        body.append(
            f'<rect x="{left + 1:.1f}" y="{TOP + plot_h - bar:.1f}" width="{width - 2:.1f}" '
            f'height="{bar:.1f}" fill="#1f77b4"><title>{low + 5 * index:g}–'
            f"{low + 5 * index + 5:g}: {count} team(s)</title></rect>"
            f'<text x="{left:.1f}" y="{HEIGHT - 12}" font-size="11">{low + 5 * index:g}</text>'
        )
        if count:
            body.append(
                f'<text x="{left + width / 2:.1f}" y="{TOP + plot_h - bar - 3:.1f}" '
                f'text-anchor="middle" font-size="11">{count}</text>'
            )
    for average in baselines:
        at = LEFT + plot_w * (average * 100 - low) / (high - low)
        body.append(
            f'<line x1="{at:.1f}" x2="{at:.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#222" '
            f'stroke-width="2" stroke-dasharray="5 4">'
            f"<title>baseline {average * 100:.1f}</title></line>"
        )
    body.append(
        f'<text x="{WIDTH - RIGHT + 8}" y="{TOP + 12}" font-size="12">teams per 5 points</text>'
        f'<text x="{WIDTH - RIGHT + 8}" y="{TOP + 28}" font-size="12" fill="#222">'
        "dashed: baselines</text>"
    )
    return _svg("How the teams' scores spread", body)
