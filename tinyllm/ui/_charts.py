"""Bar charts drawn on the server as inline SVG geometry (no script, no chart library): the
Call log page's cost per day and latency per day. The template draws the rectangles; text is
escaped by Jinja like everything else."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Bar", "Chart", "bar_chart"]

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP = 640, 180, 56, 22, 10


@dataclass
class Bar:
    """One bar: ``x``, ``y``, ``w``, ``h`` in SVG units; ``label`` (x axis), ``title`` (tooltip text)."""

    x: float
    y: float
    w: float
    h: float
    label: str
    title: str


@dataclass
class Chart:
    """A bar chart's geometry: ``bars``, the y axis' top value ``top`` as text, the size, and a
    ``caption``; ``empty`` when there was nothing to draw."""

    bars: list[Bar]
    top: str
    width: int
    height: int
    caption: str
    empty: bool


def bar_chart(points: list[tuple[str, float | None]], caption: str, fmt: str = "{:.4g}") -> Chart:
    """A chart of ``points`` (label, value >= 0 or None: no bar), in the order given.

    Labels are drawn under every bar when there are at most 12, else under every ``n/6``-th.
    """
    values = [v for _, v in points if v is not None]
    top = max(values, default=0.0) or 1.0
    n = max(len(points), 1)
    plot_w, plot_h = WIDTH - PAD_LEFT - 4, HEIGHT - PAD_BOTTOM - PAD_TOP
    step = plot_w / n
    every = 1 if n <= 12 else max(1, n // 6)
    bars = []
    for i, (label, value) in enumerate(points):
        h = 0.0 if value is None else max(plot_h * value / top, 0.5 if value > 0 else 0.0)
        bars.append(
            Bar(
                x=round(PAD_LEFT + i * step + step * 0.1, 2),
                y=round(PAD_TOP + plot_h - h, 2),
                w=round(max(step * 0.8, 1.0), 2),
                h=round(h, 2),
                label=label if i % every == 0 else "",
                title=f"{label}: {'-' if value is None else fmt.format(value)}",
            )
        )
    return Chart(
        bars=bars, top=fmt.format(top) if values else "", width=WIDTH, height=HEIGHT, caption=caption, empty=not values
    )
