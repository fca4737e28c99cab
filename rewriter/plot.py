"""The plots passes draw (``--plot``), written as PNG files with matplotlib.

Figures are ``matplotlib.figure.Figure`` objects saved directly: no pyplot state and no
backend switch in the caller's process, so a notebook's own plotting is left alone.

>>> bar_chart("bars.png", [0.2, 0.9, 0.5], [(70, 130, 180), (230, 120, 40), (70, 130, 180)])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Color = tuple[int, int, int]


def figure(width: float = 8.0, height: float = 5.0) -> Figure:
    """A new figure of ``width`` x ``height`` inches, to draw on and :func:`save`.

    >>> axes = figure().subplots()  # doctest: +SKIP
    """
    # Imported here: matplotlib takes a quarter of a second to import, and most runs draw nothing.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def save(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` to ``path`` as a PNG (120 dpi, tight layout)."""
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120, format="png")


def bar_chart(
    path: str | Path,
    values: Sequence[float],
    colors: Sequence[Color],
    *,
    labels: Sequence[str] = (),
    ylabel: str = "",
    title: str = "",
) -> None:
    """One bar per value, colored by ``colors`` (RGB, 0-255), written to ``path`` as a PNG.

    Negative values (LIM and ZD scores can be) are bars below the zero line.
    """
    fig = figure(max(4.0, 0.25 * len(values) + 1.5), 4.0)
    axes = fig.subplots()
    positions = range(len(values))
    axes.bar(positions, values, color=[tuple(c / 255 for c in color) for color in colors])
    axes.axhline(0.0, color="black", linewidth=0.8)
    if labels:
        axes.set_xticks(list(positions), list(labels), rotation=90, fontsize=6)
    else:
        axes.set_xticks([])
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    save(fig, path)
