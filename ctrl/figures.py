"""The benchmark's figures (matplotlib, no display): each method's tuned settings in accuracy against Frechet,
accuracy against denoiser calls per image, and accuracy against labelled images per class.

Every function takes the benchmark's rows (dicts with ``method``, ``accuracy`` and, for the test rows,
``accuracy_std``) and writes one PNG; a figure's points are only what the rows hold (nothing is interpolated).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never look for a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

_MARKERS = "osD^v<>phX*"


def _style(methods: list[str]) -> dict[str, tuple]:
    """One colour and marker per method, fixed by the order the methods are listed in."""
    colours = plt.get_cmap("tab10").colors
    return {m: (colours[i % len(colours)], _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(methods)}


def _methods(*row_lists: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for rows in row_lists for r in rows if " gamma=" not in r["method"]))


def _scored(rows: list[dict], *keys: str) -> list[dict]:
    """The rows that carry every one of ``keys`` (a benchmark without an evaluator has no accuracy to plot)."""
    return [r for r in rows if all(r.get(k) is not None for k in keys)]


def _log_x(ax) -> None:
    """A log x axis labelled 1, 2, 5, 10, 20, ... in plain numbers (a diverged setting sits a decade or two out
    and would squash the rest into one column on a linear axis)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_frechet(sweep: list[dict], table: list[dict], path: Path, max_frechet_ratio: float) -> None:
    """Two panels. Left, validation seeds: every setting a method tried (hollow), the one the rule kept filled,
    the rule's bound (``max_frechet_ratio`` x the pretrained model's Frechet) dashed. Right, test seeds: each
    method at its kept setting, mean +- std over the repeats, the pretrained model's Frechet dotted. Frechet is on
    a log axis in both."""
    sweep, table = _scored(sweep, "accuracy", "frechet"), _scored(table, "accuracy", "frechet")
    style = _style(_methods(table, sweep))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for method in dict.fromkeys(r["method"] for r in sweep):
        colour, marker = style[method]
        rows = [r for r in sweep if r["method"] == method]
        x, y = [r["frechet"] for r in rows], [r["accuracy"] for r in rows]
        left.scatter(x, y, facecolors="none", edgecolors=colour, marker=marker, label=method)
        kept = [r for r in rows if r["chosen"]]
        left.scatter([r["frechet"] for r in kept], [r["accuracy"] for r in kept], color=colour, marker=marker, s=70)
    if sweep:
        base = sweep[0]["base_frechet"]
        bound = f"{max_frechet_ratio:g}x pretrained"
        left.axvline(max_frechet_ratio * base, color="grey", linestyle="--", label=bound)
        left.legend(fontsize=7)
    left.set(title="validation seeds: settings tried (filled: kept)", xlabel="Frechet distance", ylabel="accuracy")
    _log_x(left)
    for row in [r for r in table if " gamma=" not in r["method"]]:
        colour, marker = style[row["method"]]
        right.errorbar(
            row["frechet"],
            row["accuracy"],
            xerr=row.get("frechet_std", 0.0),
            yerr=row.get("accuracy_std", 0.0),
            color=colour,
            marker=marker,
            label=row["method"],
            capsize=3,
        )
        if row["method"] == "pretrained":
            right.axvline(row["frechet"], color="grey", linestyle=":")
    right.set(title="test seeds: kept settings (mean +- std)", xlabel="Frechet distance")
    _log_x(right)
    right.legend(fontsize=7)
    _save(fig, path)


def accuracy_calls(table: list[dict], path: Path) -> None:
    """Test accuracy (mean +- std) against denoiser calls per image, one point per method."""
    rows = [r for r in _scored(table, "accuracy", "denoiser_calls_per_image") if " gamma=" not in r["method"]]
    style = _style(_methods(rows))
    fig, ax = plt.subplots(figsize=(7, 5))
    for row in rows:
        colour, marker = style[row["method"]]
        calls = row["denoiser_calls_per_image"]
        ax.errorbar(calls, row["accuracy"], yerr=row.get("accuracy_std", 0.0), color=colour, marker=marker, capsize=3)
        ax.annotate(row["method"], (calls, row["accuracy"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(title="test seeds: accuracy against sampling cost", xlabel="denoiser calls per image", ylabel="accuracy")
    _save(fig, path)


def accuracy_labelled(rows: list[dict], sizes: list[float], path: Path) -> None:
    """Test accuracy (mean +- std) against labelled images per class (each row's ``labelled_images``: the size
    of its cut, or the whole split's mean per class), a line per method; ``sizes`` are the ticks."""
    rows = _scored(rows, "accuracy")
    style = _style(_methods(rows))
    fig, ax = plt.subplots(figsize=(7, 5))
    for method, (colour, marker) in style.items():
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["labelled_images"])
        x = [r["labelled_images"] for r in mine]
        y, err = [r["accuracy"] for r in mine], [r.get("accuracy_std", 0.0) for r in mine]
        ax.errorbar(x, y, yerr=err, color=colour, marker=marker, capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.minorticks_off()  # the log axis's own minor labels would overlap the sizes
    ax.set(title="test seeds: accuracy against labelled data", xlabel="labelled images per class", ylabel="accuracy")
    ax.legend(fontsize=7)
    _save(fig, path)
