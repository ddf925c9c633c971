"""The PNG: grouped bars of the main ratios to plain Celery's defaults (headless, Agg).

Left: throughput (enqueue single, drain), higher is better. Right: cost per job (worker CPU,
Redis commands, Redis round trips) and submit->start p99 at 500/s, lower is better. Log scale;
the line at 1 is Celery's defaults.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.compare_parts.report import COLUMNS


def _series(
    fig: dict[str, Any],
) -> tuple[
    list[str], list[str], dict[str, list[float]], dict[str, list[float]], list[float], list[float]
]:
    """Metric names, per-system ratios to Celery defaults (throughput, cost), and where the
    issue's targets fall on the same scale (NaN: no target)."""
    enq, drains, lat = fig.get("enqueue", {}), fig.get("drain", {}), fig.get("latency", {})

    def d(key: str, field: str) -> float | None:
        b = (drains.get(key) or {}).get("best")
        if not b:
            return None
        return b["redis"][field] if field in b["redis"] else b.get(field)

    def e(key: str) -> float | None:
        return (enq.get(key) or {}).get("per_s")

    def p99(key: str) -> float | None:
        return ((lat.get(key) or {}).get("500") or {}).get("p99_ms")

    def cost(key: str) -> list[float | None]:
        return [
            d(key, "cpu_ms_per_job"),
            d(key, "commands_per_job"),
            d(key, "round_trips_per_job"),
            p99(key),
        ]

    up = ["enqueue single jobs/s", "drain jobs/s"]
    down = ["worker CPU ms/job", "Redis cmds/job", "Redis round trips/job", "p99 ms @500/s"]
    base_up = [e("celery_defaults"), d("celery_defaults", "per_s")]
    base_dn = cost("celery_defaults")
    high: dict[str, list[float]] = {}
    low: dict[str, list[float]] = {}
    for key, _ in COLUMNS:
        vals_up = [e(key) if key != "conveyor_c2" else None, d(key, "per_s")]
        high[key] = [v / b if v and b else math.nan for v, b in zip(vals_up, base_up, strict=True)]
        low[key] = [v / b if v and b else math.nan for v, b in zip(cost(key), base_dn, strict=True)]

    def scaled(goal: float | None, base: float | None) -> float:
        return goal / base if goal is not None and base else math.nan

    targets_up = [scaled(6000.0, base_up[0]), 2.0]
    targets_dn = [
        scaled(1.0, base_dn[0]),
        math.nan,
        scaled(6.0, base_dn[2]),
        scaled(3.0, base_dn[3]),
    ]
    return up, down, high, low, targets_up, targets_dn


def write(fig: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install the bench extra)"
    up, down, high, low, t_up, t_dn = _series(fig)
    labels = dict(COLUMNS)
    keys = [k for k, _ in COLUMNS if not all(math.isnan(v) for v in high[k] + low[k])]
    fig_, axes = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [2, 4]})
    handles = []
    for ax, metrics, data, targets, title in (
        (axes[0], up, high, t_up, "throughput ÷ Celery defaults (higher is better)"),
        (axes[1], down, low, t_dn, "cost per job ÷ Celery defaults (lower is better)"),
    ):
        width = 0.8 / max(1, len(keys))
        handles = []
        for i, key in enumerate(keys):
            xs = [m + (i - (len(keys) - 1) / 2) * width for m in range(len(metrics))]
            vals = [v if not math.isnan(v) else 0 for v in data[key]]
            bars = ax.bar(xs, vals, width, label=labels[key])
            handles.append(bars)
            for bar, v in zip(bars, data[key], strict=True):
                if not math.isnan(v) and v > 0:
                    ax.annotate(
                        f"{v:.2g}",
                        (bar.get_x() + bar.get_width() / 2, v),
                        ha="center",
                        va="bottom",
                        fontsize=6,
                        rotation=90,
                    )
        for m, goal in enumerate(targets):
            if not math.isnan(goal):
                ax.hlines(goal, m - 0.45, m + 0.45, colors="black", linestyles="dashed")
                ax.annotate(
                    "Conveyor target", (m + 0.45, goal), fontsize=6, ha="right", va="bottom"
                )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels(metrics, fontsize=8)
        ax.set_title(title, fontsize=10)
    fig_.legend(handles, [labels[k] for k in keys], loc="lower center", ncol=len(keys), fontsize=8)
    run = fig.get("run", {})
    fig_.suptitle(
        f"make bench: one run, {run.get('cpus')} cores, load {run.get('load_before')} → "
        f"{run.get('load_after')} (ratios to plain Celery defaults, same Valkey; "
        "dashed: Conveyor's targets)",
        fontsize=10,
    )
    fig_.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig_.savefig(path, dpi=110)
    plt.close(fig_)
    return None
