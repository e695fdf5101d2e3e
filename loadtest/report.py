"""Reports of a sweep: JSON, CSV, PNG plots (matplotlib, Agg) and a markdown summary.

Files written into the output folder:

* `points.json`: everything (model info, config, points with the overload time series);
* `points.csv`: one row per point (no time series);
* `overload_timeseries.csv`: per request of the overload points;
* `latency_vs_steps.png`, `throughput_vs_steps.png`, `latency_vs_quality.png`,
  `overload_timeseries.png`;
* `step_load.csv`, `step_load.png`: the step-load scenario per policy and phase (`loadtest.stepload`);
* `summary.md`: the tables, ready to paste into the README.

A plot whose data is missing (e.g. no profile, so no perplexity) is still
written, with a note in place of the curves, so the set of files is fixed.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from loadtest import stepload
from loadtest.sweep import PointResult, SweepReport

FILES = (
    "points.json",
    "points.csv",
    "overload_timeseries.csv",
    "latency_vs_steps.png",
    "throughput_vs_steps.png",
    "latency_vs_quality.png",
    "overload_timeseries.png",
    "step_load.csv",
    "step_load.png",
    "summary.md",
)
_CSV_FIELDS = [f.name for f in fields(PointResult) if f.name != "series"]


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_csv(report: SweepReport, path: Path) -> None:
    """One row per point; dict fields are JSON strings."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        w.writeheader()
        for p in report.points:
            row = {k: v for k, v in asdict(p).items() if k != "series"}
            row["errors"] = json.dumps(row["errors"], sort_keys=True)
            row["policy_reasons"] = json.dumps(row["policy_reasons"], sort_keys=True)
            row["error_examples"] = json.dumps(row["error_examples"], sort_keys=True)
            w.writerow(row)


def write_timeseries_csv(report: SweepReport, path: Path) -> None:
    """Per-request rows of every point that kept a series (the overload points)."""
    cols = ["label", "scheduled_s", "e2e_ms", "ttft_ms", "steps", "code"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for p in report.points:
            for row in p.series:
                w.writerow({"label": p.label, **row})


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_all(report: SweepReport, out: Path) -> None:
    """The four PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    name = report.model.get("name", "?")
    steps = sorted((p for p in report.points if p.group == "steps" and p.mean_steps is not None),
                   key=lambda p: p.mean_steps or 0)  # fmt: skip
    xs = [p.mean_steps for p in steps]

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric in zip(axes, ("ttft", "itl", "e2e"), strict=True):
        for pct, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
            ys = [getattr(p, f"{metric}_{pct}_ms") for p in steps]
            if xs and any(y is not None for y in ys):
                ax.plot(xs, ys, style, label=pct)
        if metric == "e2e" and any(p.predicted_e2e_ms is not None for p in steps):
            ax.plot(xs, [p.predicted_e2e_ms for p in steps], "k-", alpha=0.5, label="cost model (mean)")
        if not xs:
            _no_data(ax, "no steps points")
        ax.set_xlabel("ODE steps per token")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        if xs:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: latency vs steps")
    fig.tight_layout()
    fig.savefig(out / "latency_vs_steps.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    if xs:
        ax.plot(xs, [p.throughput_rps for p in steps], "o-", label="requests/s")
        ax.plot(xs, [p.goodput_rps for p in steps], "s--", label="goodput requests/s")
        ax2 = ax.twinx()
        ax2.plot(xs, [p.tokens_per_s for p in steps], "^:", color="tab:green", label="tokens/s")
        ax2.set_ylabel("tokens/s")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
    else:
        _no_data(ax, "no steps points")
    ax.set_xlabel("ODE steps per token")
    ax.set_ylabel("requests/s")
    ax.set_title(f"{name}: throughput vs steps")
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_steps.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    qual = [p for p in report.points if p.group in ("steps", "experts", "tier")
            and p.perplexity is not None and p.e2e_p99_ms is not None]  # fmt: skip
    if qual:
        for group, marker in (("steps", "o"), ("experts", "s"), ("tier", "*")):
            pts = [p for p in qual if p.group == group]
            ax.scatter([p.e2e_p99_ms for p in pts], [p.perplexity for p in pts], marker=marker, label=group)
            for p in pts:
                ax.annotate(p.label, (p.e2e_p99_ms, p.perplexity), fontsize=7)
        # Pareto front: no other point has both lower latency and lower perplexity.
        front = sorted(qual, key=lambda p: (p.e2e_p99_ms, p.perplexity))
        best, pareto = float("inf"), []
        for p in front:
            if p.perplexity < best:  # type: ignore[operator]
                best = p.perplexity  # type: ignore[assignment]
                pareto.append(p)
        ax.step([p.e2e_p99_ms for p in pareto], [p.perplexity for p in pareto], "k--", where="post",
                alpha=0.5, label="Pareto front")  # fmt: skip
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "no perplexity: pass --model-dir or --profile")
    ax.set_xlabel("E2E p99 (ms)")
    ax.set_ylabel("perplexity (profile.json)")
    ax.set_title(f"{name}: latency vs quality")
    fig.tight_layout()
    fig.savefig(out / "latency_vs_quality.png", dpi=100)
    plt.close(fig)

    over = [p for p in report.points if p.group == "overload"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    if over:
        for p in over:
            ok = [r for r in p.series if r["code"] == "OK"]
            ax1.plot([r["scheduled_s"] for r in ok], [r["e2e_ms"] for r in ok], ".", ms=4, label=p.label)
            ax2.plot([r["scheduled_s"] for r in ok], [r["steps"] for r in ok], ".-", ms=3, label=p.label)
        ax1.set_yscale("log")
        ax1.legend(fontsize=8)
        ax2.legend(fontsize=8)
    else:
        _no_data(ax1, "no overload scenario (--overload)")
    rate = report.overload_rate
    ax1.set_title(f"{name}: overload at {rate:.2f} req/s" if rate else f"{name}: overload")
    ax1.set_ylabel("E2E latency (ms)")
    ax2.set_ylabel("steps chosen")
    ax2.set_xlabel("scheduled send time (s)")
    fig.tight_layout()
    fig.savefig(out / "overload_timeseries.png", dpi=100)
    plt.close(fig)


def markdown(report: SweepReport) -> str:
    """The summary: a table of all points, the overload table, cost-model R^2, notes."""
    m = report.model
    slo = report.config.get("slo", {})
    lines = [
        f"# Load test: {m.get('name')} ({m.get('backend')}, "
        f"steps {m.get('min_steps')}..{m.get('max_steps')})",
        "",
        f"Mode {report.config.get('mode')}, {report.config.get('max_requests')} requests / "
        f"{report.config.get('duration_s')} s per point, max_tokens {report.config.get('max_tokens')}, "
        f"SLO ttft={slo.get('ttft')} s, itl={slo.get('itl')} s, e2e={slo.get('e2e')} s. "
        "Latencies in ms, measured from each request's scheduled send time.",
        "",
        "| group | point | rate | ok/sent | TTFT p50/p95/p99 | ITL p50/p95/p99 | E2E p50/p95/p99 "
        "| req/s | tok/s | goodput/s | steps | ppl | predicted E2E | errors |",
        "|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in report.points:
        lines.append(
            f"| {p.group} | {p.label} | {_fmt(p.rate, 2)} | {p.ok}/{p.sent} "
            f"| {_fmt(p.ttft_p50_ms)} / {_fmt(p.ttft_p95_ms)} / {_fmt(p.ttft_p99_ms)} "
            f"| {_fmt(p.itl_p50_ms)} / {_fmt(p.itl_p95_ms)} / {_fmt(p.itl_p99_ms)} "
            f"| {_fmt(p.e2e_p50_ms)} / {_fmt(p.e2e_p95_ms)} / {_fmt(p.e2e_p99_ms)} "
            f"| {_fmt(p.throughput_rps, 2)} | {_fmt(p.tokens_per_s)} | {_fmt(p.goodput_rps, 2)} "
            f"| {_fmt(p.mean_steps, 2)} | {_fmt(p.perplexity, 2)} | {_fmt(p.predicted_e2e_ms)} "
            f"| {json.dumps(p.errors) if p.errors else '-'} |"
        )
    over = [p for p in report.points if p.group == "overload"]
    if over:
        lines += [
            "",
            f"## Overload at {report.overload_rate:.2f} req/s",
            "",
            "| policy | TTFT p99 | ITL p99 | E2E p99 | goodput/s | good % | mean steps | perplexity |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in over:
            lines.append(
                f"| {p.label} | {_fmt(p.ttft_p99_ms)} | {_fmt(p.itl_p99_ms)} | {_fmt(p.e2e_p99_ms)} "
                f"| {_fmt(p.goodput_rps, 2)} | {_fmt(100 * p.goodput_fraction)} | {_fmt(p.mean_steps, 2)} "
                f"| {_fmt(p.perplexity, 2)} |"
            )
        lines += ["", "![overload](overload_timeseries.png)"]
    lines += [
        "",
        f"Cost model vs measured mean E2E (steps/experts/tier points): R^2 = {_fmt(report.cost_r2, 3)}",
        "",
        "![latency vs steps](latency_vs_steps.png) ![throughput](throughput_vs_steps.png) "
        "![latency vs quality](latency_vs_quality.png)",
    ]
    examples = {(code, msg) for p in report.points for code, msg in p.error_examples.items()}
    if examples:
        lines += ["", "Errors (one message per code):", ""] + [f"- {c}: {m}" for c, m in sorted(examples)]
    lines += [""] + stepload.markdown(report.step_load) if report.step_load is not None else []
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def write_report(report: SweepReport, out_dir: str | Path) -> list[Path]:
    """Write every file of `FILES` into `out_dir` (created); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "points.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    write_csv(report, out / "points.csv")
    write_timeseries_csv(report, out / "overload_timeseries.csv")
    plot_all(report, out)
    with (out / "step_load.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=stepload.CSV_COLUMNS)
        w.writeheader()
        w.writerows(stepload.csv_rows(report.step_load))
    stepload.plot(report.step_load, out / "step_load.png", report.model.get("name", "?"))
    (out / "summary.md").write_text(markdown(report), encoding="utf-8")
    return [out / f for f in FILES]
