"""Charts for the benchmark results: one PNG beside each JSON file, drawn with matplotlib (the `bench` extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def line_chart(
    path: Path,
    title: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    *,
    logy: bool = False,
) -> Path:
    """One line per series (name -> (xs, ys)), saved as ``path`` (.png)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logy:
        ax.set_yscale("log")
    _finish(fig, ax, title, xlabel, ylabel)
    return _save(fig, path)


def bar_chart(path: Path, title: str, bars: Mapping[str, float], ylabel: str, *, logy: bool = False) -> Path:
    """One bar per name, its value written above it, saved as ``path`` (.png)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    names, values = list(bars), list(bars.values())
    drawn = ax.bar(names, values, color="#4c72b0")
    ax.bar_label(drawn, labels=[f"{v:.3g}" for v in values], padding=2)
    if logy:
        ax.set_yscale("log")
    _finish(fig, ax, title, "", ylabel, legend=False)
    return _save(fig, path)


def _finish(fig, ax, title: str, xlabel: str, ylabel: str, *, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()
    fig.tight_layout()


def _save(fig, path: Path) -> Path:
    path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
