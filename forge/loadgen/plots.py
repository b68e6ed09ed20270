"""Sweep plots for reports: throughput and latency percentiles against offered load.

matplotlib runs on the Agg backend so plotting works on headless build machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from forge.loadgen.metrics import LevelSummary, SLOs, Stats  # noqa: E402


def _x_axis(levels: Sequence[LevelSummary]) -> tuple[list[float], str, bool]:
    """Concurrency when every level is a closed loop, request rate when every level is open loop,
    otherwise the sweep order with level labels as ticks."""
    if all(lv.request_rate is None for lv in levels):
        return [float(lv.concurrency or 0) for lv in levels], "concurrency (closed loop)", True
    if all(lv.request_rate is not None for lv in levels):
        return [float(lv.request_rate or 0) for lv in levels], "request rate (req/s, open loop)", False
    return [float(i) for i in range(len(levels))], "load level", False


def _setup_x(ax: plt.Axes, levels: Sequence[LevelSummary], xs: list[float], label: str, log2: bool) -> None:
    if log2 and len(xs) > 1 and min(xs) > 0:
        ax.set_xscale("log", base=2)
        # Explicit limits: lines that are all NaN (every request failed) set no data limits.
        ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)
    ax.set_xticks(xs)
    ax.set_xticklabels([lv.label for lv in levels] if label == "load level" else [f"{x:g}" for x in xs])
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)


def plot_throughput(levels: Sequence[LevelSummary], path: Path, title: str | None = None) -> Path:
    """Token and request throughput per level, side by side."""
    xs, label, log2 = _x_axis(levels)
    fig, (tok_ax, req_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    tok_ax.plot(xs, [lv.output_tok_s for lv in levels], "o-", label="output tok/s")
    tok_ax.plot(xs, [lv.total_tok_s for lv in levels], "s--", label="total tok/s (prompt + output)")
    tok_ax.set_ylabel("tokens / s")
    tok_ax.set_title("Token throughput")
    req_ax.plot(xs, [lv.request_throughput_rps for lv in levels], "o-", label="completed req/s")
    if any(lv.goodput_rps is not None for lv in levels):
        req_ax.plot(xs, [lv.goodput_rps or 0.0 for lv in levels], "^--", label="goodput (within SLOs)")
    req_ax.set_ylabel("requests / s")
    req_ax.set_title("Request throughput")
    for ax in (tok_ax, req_ax):
        _setup_x(ax, levels, xs, label, log2)
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(
    levels: Sequence[LevelSummary], path: Path, slos: SLOs | None = None, title: str | None = None
) -> Path:
    """TTFT, TPOT and E2E latency p50/p90/p99 per level, with SLO limits drawn where set."""
    xs, label, log2 = _x_axis(levels)
    panels: list[tuple[str, list[Stats], float | None]] = [
        ("TTFT", [lv.ttft_ms for lv in levels], slos.max_ttft_p99_ms if slos else None),
        ("TPOT", [lv.tpot_ms for lv in levels], slos.max_tpot_p99_ms if slos else None),
        ("E2E latency", [lv.e2el_ms for lv in levels], None),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for ax, (name, stats, limit) in zip(axes, panels, strict=True):
        for pct, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ys = [getattr(s, pct) for s in stats]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=pct)
        if limit is not None:
            ax.axhline(limit, color="tab:red", linewidth=1, label=f"p99 SLO {limit:g} ms")
        ax.set_title(name)
        ax.set_ylabel("ms")
        _setup_x(ax, levels, xs, label, log2)
        ax.margins(y=0.1)  # keep an SLO line off the frame
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
