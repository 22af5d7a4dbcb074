"""The figures of a sweep: quality against speedup (one point per threshold) and quality per exit layer."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt


def plot_quality_vs_speedup(points: list[dict], metric: str, path: str | os.PathLike, title: str = "") -> None:
    """`points`: {"threshold", "score", "analytic_speedup", "wallclock_speedup" (may be None)} per threshold."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = sorted(points, key=lambda p: (p["analytic_speedup"], p["threshold"]))
    ax.plot([p["analytic_speedup"] for p in pts], [p["score"] for p in pts], "o-", label="analytic (paper)")
    labels: dict[tuple[float, float], list[str]] = {}  # thresholds landing on one point share one label
    for p in pts:
        labels.setdefault((round(p["analytic_speedup"], 4), round(p["score"], 4)), []).append(f"{p['threshold']:g}")
    for (x, y), names in labels.items():
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    timed = sorted((p for p in pts if p.get("wallclock_speedup") is not None), key=lambda p: p["wallclock_speedup"])
    if timed:
        ax.plot(
            [p["wallclock_speedup"] for p in timed],
            [p["score"] for p in timed],
            "s:",
            alpha=0.8,
            label="measured wall-clock",
        )
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("speedup over the full model (x)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs speedup (labels: threshold)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_layer(points: list[dict], metric: str, num_layers: int, path: str | os.PathLike, title: str = "") -> None:
    """`points`: {"layer", "score"}: every token forced out at that exit (`num_layers` = the final layer)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = sorted(points, key=lambda p: p["layer"])
    ax.plot([p["layer"] for p in pts], [p["score"] for p in pts], "o-")
    ax.set_xticks([p["layer"] for p in pts])
    ax.set_xticklabels([str(p["layer"]) if p["layer"] < num_layers else f"{num_layers}\n(final)" for p in pts])
    ax.set_xlabel("LM layer every token leaves at")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per exit layer (mid-crisis curve)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
