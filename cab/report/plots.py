"""The report's figures: matplotlib (object API with the Agg-free SVG canvas, never pyplot, so no global
backend is touched), one consistent style, readable in grayscale (every series has its own marker and line
style, not only a colour), axis labels with units. Each figure is an SVG embedded in the page as a data
URI in an <img>: no network, no element ids that could collide, and no script inside a figure can run.
Text from plugins (attention names) is escaped by matplotlib's SVG writer."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Sequence

from matplotlib import rc_context
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

# Okabe-Ito (colour-blind safe) with black first; markers and dashes tell series apart without colour
COLOURS = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#7f7f7f", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
DASHES = ("-", "--", ":", "-.")
STYLE = {
    "font.size": 8.5, "axes.titlesize": 9.5, "axes.labelsize": 8.5, "legend.fontsize": 7.5,
    "xtick.labelsize": 7.5, "ytick.labelsize": 7.5, "axes.grid": True, "grid.color": "#d0d0d0",
    "grid.linewidth": 0.5, "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.3,
    "lines.markersize": 4.5, "svg.fonttype": "none", "svg.hashsalt": "cab-report", "font.family": "sans-serif",
}


@dataclass(frozen=True)
class Plot:
    """An embedded figure: its data URI, a text alternative and a caption."""

    uri: str
    alt: str
    caption: str = ""


@dataclass(frozen=True)
class Series:
    """One line: name, x values and y values (None = missing, drawn as a gap), optional error-bar ends."""

    name: str
    x: tuple
    y: tuple
    low: "tuple | None" = None
    high: "tuple | None" = None


def style(i: int) -> dict:
    """Colour, marker and line style of the i-th series (markers and dashes cycle at different periods)."""
    return {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": DASHES[i % len(DASHES)]}


def _finish(fig: Figure, alt: str, caption: str) -> Plot:
    buffer = io.StringIO()
    # bbox_inches="tight" grows the image to whatever the legend (placed outside-right) needs: never cut off
    FigureCanvasSVG(fig).print_figure(buffer, format="svg", bbox_inches="tight", pad_inches=0.05,
                                      metadata={"Date": None, "Creator": None})
    data = base64.b64encode(buffer.getvalue().encode("utf-8")).decode("ascii")
    return Plot(uri=f"data:image/svg+xml;base64,{data}", alt=alt, caption=caption)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _plain_number(value: float, _position=None) -> str:
    """Tick labels without mathtext (fast, and readable as plain text in the SVG): 128, 1k, 0.01."""
    if value <= 0:
        return ""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _log_axis(ax, which: str, base: int = 10) -> None:
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=base)
    axis.set_major_formatter(FuncFormatter(_plain_number))
    axis.set_minor_formatter(NullFormatter())


def _legend(ax, n: int) -> None:
    if n:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, ncol=1 if n <= 16 else 2,
                  borderaxespad=0.0)


def _draw_series(ax, series: "Sequence[Series]", positive: bool) -> int:
    drawn = 0
    for i, s in enumerate(series):
        points = [(x, y, lo, hi) for x, y, lo, hi in zip(s.x, s.y, s.low or [None] * len(s.x),
                                                         s.high or [None] * len(s.x))
                  if _finite(x) and _finite(y) and (not positive or (x > 0 and y > 0))]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        st = style(i)
        ax.plot(xs, ys, label=s.name, **st)
        bars = [(x, y, lo, hi) for x, y, lo, hi in points if _finite(lo) and _finite(hi)]
        if bars:
            ax.errorbar([b[0] for b in bars], [b[1] for b in bars],
                        yerr=[[max(b[1] - b[2], 0) for b in bars], [max(b[3] - b[1], 0) for b in bars]],
                        fmt="none", ecolor=st["color"], elinewidth=0.8, capsize=2)
        drawn += 1
    return drawn


def line_panels(panels: "Sequence[tuple[str, str, str, Sequence[Series]]]", *, loglog: bool, alt: str,
                caption: str = "", vline: "float | None" = None, vline_label: str = "", logx_base: int = 10,
                ylim: "tuple[float, float] | None" = None, xticks: "Sequence[float]" = ()) -> Plot:
    """Side-by-side line panels (title, x label, y label, series) sharing one legend: every name drawn in any
    panel, once. A name keeps its style across panels only when every panel lists the same series in the same
    order (a missing one as a series of None). `ylim` fixes the y range (linear axes); `xticks` labels exactly
    those x values."""
    with rc_context(STYLE):
        width = 4.0 * len(panels) + 2.0
        fig = Figure(figsize=(width, 3.2))
        fig.subplots_adjust(left=0.75 / width, right=1 - 2.1 / width, bottom=0.16, top=0.9, wspace=0.3)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        drawn = 0
        for ax, (title, xlabel, ylabel, series) in zip(axes, panels):
            n = _draw_series(ax, series, positive=loglog)
            drawn = max(drawn, n)
            if loglog:
                _log_axis(ax, "x", logx_base)
                _log_axis(ax, "y")
            elif logx_base != 10:
                _log_axis(ax, "x", logx_base)
            if vline is not None:
                ax.axvline(vline, color="#555555", linestyle=(0, (4, 2)), linewidth=1.0, label=vline_label or None)
            if ylim is not None and not loglog:
                ax.set_ylim(*ylim)
            if xticks:
                ax.set_xticks(list(xticks), [_plain_number(x) for x in xticks])
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if not n:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#777777")
        handles, labels = [], []
        for ax in axes:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                if name not in labels:
                    handles.append(handle)
                    labels.append(name)
        if handles:
            axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                            ncol=1 if len(handles) <= 16 else 2, borderaxespad=0.0)
        return _finish(fig, alt, caption)


def scatter(points: "Sequence[tuple[str, float, float, float | None, float | None]]", *, xlabel: str, ylabel: str,
            title: str, alt: str, caption: str = "", logx: bool = True, frontier: "Sequence[str]" = ()) -> Plot:
    """Labelled points (name, x, y, y_low, y_high), each with its own marker; `frontier` names are joined
    by a step line (the Pareto front)."""
    with rc_context(STYLE):
        fig = Figure(figsize=(6.8, 3.6))
        fig.subplots_adjust(left=0.1, right=0.66, bottom=0.15, top=0.9)
        ax = fig.subplots()
        shown = [p for p in points if _finite(p[1]) and _finite(p[2]) and (not logx or p[1] > 0)]
        for i, (name, x, y, lo, hi) in enumerate(shown):
            st = style(i)
            ax.plot([x], [y], linestyle="none", marker=st["marker"], color=st["color"], label=name,
                    markersize=6, markerfacecolor="none" if i % 2 else st["color"])
            if _finite(lo) and _finite(hi):
                ax.errorbar([x], [y], yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], fmt="none", ecolor=st["color"],
                            elinewidth=0.8, capsize=2)
        front = sorted((p for p in shown if p[0] in set(frontier)), key=lambda p: p[1])
        if len(front) >= 2:
            ax.step([p[1] for p in front], [p[2] for p in front], where="post", color="#444444",
                    linestyle=(0, (3, 2)), linewidth=1.0, label="Pareto front")
        if logx:
            _log_axis(ax, "x")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if not shown:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#777777")
        _legend(ax, len(shown))
        return _finish(fig, alt, caption)


def heatmaps(panels: "Sequence[tuple[str, Sequence[str], list]]", *, alt: str, caption: str = "",
             vmin: float = -1.0, vmax: float = 1.0) -> Plot:
    """Square heat maps (title, labels, matrix with None for undefined) in gray, every value printed."""
    with rc_context({**STYLE, "axes.grid": False}):
        fig = Figure(figsize=(3.3 * len(panels) + 1.0, 3.1))
        fig.subplots_adjust(left=0.08, right=0.86, bottom=0.1, top=0.88, wspace=0.35)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        image = None
        for ax, (title, labels, matrix) in zip(axes, panels):
            n = len(labels)
            grid = [[math.nan if v is None else v for v in row] for row in matrix]
            image = ax.imshow(grid, cmap="Greys", vmin=vmin, vmax=vmax)
            ax.set_xticks(range(n), labels)
            ax.set_yticks(range(n), labels)
            ax.set_title(title)
            for i in range(n):
                for j in range(n):
                    v = matrix[i][j]
                    shade = 0.0 if v is None else (v - vmin) / (vmax - vmin)
                    ax.text(j, i, "n/a" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if shade > 0.55 else "black")
        if image is not None:
            fig.colorbar(image, ax=list(axes), shrink=0.8, label="rank correlation (unitless)")
        return _finish(fig, alt, caption)
