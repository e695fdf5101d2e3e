"""Reports of a sweep: JSON, CSV, PNG plots (matplotlib, Agg) and a markdown summary.

Files written into the output folder:

* `points.json`: everything (model info, config, points with the overload time series);
* `points.csv`: one row per point (no time series);
* `latency_vs_steps.png`, `throughput_vs_steps.png`, `latency_vs_quality.png`;
* with `--overload` only: `overload_timeseries.csv` (per request of the overload points) and
  `overload_timeseries.png`;
* with `--step-load` only: `step_load.csv`, `step_load.png` (per policy and phase, `loadtest.stepload`);
* `summary.md`: the tables, ready to paste into the README, with a note for every column left
  blank and why.

`files_for(report)` lists what a report writes. The three plots are always written; one whose
data is missing (e.g. no profile, so no perplexity) says so in place of the curves.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from loadtest import stepload
from loadtest.sweep import PointResult, SweepReport

BASE_FILES = (
    "points.json",
    "points.csv",
    "latency_vs_steps.png",
    "throughput_vs_steps.png",
    "latency_vs_quality.png",
    "summary.md",
)
OVERLOAD_FILES = ("overload_timeseries.csv", "overload_timeseries.png")
STEP_LOAD_FILES = ("step_load.csv", "step_load.png")
DRAFT_FILES = ("speculation.png",)
FILES = BASE_FILES + OVERLOAD_FILES + STEP_LOAD_FILES + DRAFT_FILES  # every file a report may write


def files_for(report: SweepReport) -> tuple[str, ...]:
    """The files `write_report` writes for `report`: the scenario files only for a scenario that ran."""
    files = BASE_FILES
    if any(p.group == "overload" for p in report.points):
        files += OVERLOAD_FILES
    if report.step_load is not None:
        files += STEP_LOAD_FILES
    if _draft_points(report):
        files += DRAFT_FILES
    return files


def _draft_points(report: SweepReport) -> list[PointResult]:
    """The `--draft-steps` points, the `draft_steps=0` baseline first (sweep order)."""
    return [p for p in report.points if p.group == "draft"]


def _draft_steps(p: PointResult) -> int:
    return int(json.loads(p.compute).get("draft_steps", 0))


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
    """The three PNGs, and the overload one when the report has overload points."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    name = report.model.get("name", "?")
    steps, xs, x_label, x_title = _x_axis(report)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric in zip(axes, ("ttft", "itl", "e2e"), strict=True):
        for pct, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
            ys = [getattr(p, f"{metric}_{pct}_ms") for p in steps]
            if xs and any(y is not None for y in ys):
                ax.plot(xs, ys, style, label=pct)
        if metric == "e2e" and any(p.predicted_e2e_ms is not None for p in steps):
            ax.plot(xs, [p.predicted_e2e_ms for p in steps], "k-", alpha=0.5, label="cost model (mean)")
        if not xs:
            _no_data(ax, "no steps or rate points")
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{metric.upper()} (ms)")
        if xs:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: latency vs {x_title}")
    fig.tight_layout()
    fig.savefig(out / "latency_vs_steps.png", dpi=100)
    plt.close(fig)

    # Requests/s and tokens/s differ by a factor of max_tokens: one panel (own y axis, own legend) each.
    fig, (ax_req, ax_tok) = plt.subplots(1, 2, figsize=(11, 4))
    if xs:
        ax_req.plot(xs, [p.throughput_rps for p in steps], "o-", label="requests/s")
        ax_req.plot(xs, [p.goodput_rps for p in steps], "s--", label="goodput requests/s (within the SLO)")
        ax_req.legend(fontsize=8)
        ax_tok.plot(xs, [p.tokens_per_s for p in steps], "^-", color="tab:green", label="output tokens/s")
        ax_tok.legend(fontsize=8)
    else:
        _no_data(ax_req, "no steps or rate points")
        _no_data(ax_tok, "no steps or rate points")
    for ax, unit in ((ax_req, "requests/s"), (ax_tok, "tokens/s")):
        ax.set_xlabel(x_label)
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: throughput vs {x_title}")
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_steps.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    qual = [p for p in report.points if p.group in ("steps", "experts", "tier", "rate")
            and p.perplexity is not None and p.e2e_p99_ms is not None]  # fmt: skip
    if qual:
        for group, marker in (("steps", "o"), ("experts", "s"), ("tier", "*"), ("rate", "D")):
            pts = [p for p in qual if p.group == group]
            if not pts:  # a legend entry without points says nothing
                continue
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
    if over:
        plot_overload(report, over, out / "overload_timeseries.png")
    drafts = _draft_points(report)
    if drafts:
        plot_speculation(report, drafts, out / "speculation.png")


def plot_speculation(report: SweepReport, drafts: list[PointResult], path: Path) -> None:
    """Tokens/s and time per output token p50 / p99 per `draft_steps` (0 = no speculation,
    the baseline), and the acceptance rate of the drafted tokens."""
    import matplotlib.pyplot as plt

    xs = [str(_draft_steps(p)) for p in drafts]
    fig, (ax_tok, ax_itl, ax_acc) = plt.subplots(1, 3, figsize=(14, 4))
    ax_tok.bar(xs, [p.tokens_per_s for p in drafts], color="tab:green")
    ax_tok.set_ylabel("output tokens/s")
    for pct, style in (("p50", "o-"), ("p99", "^:")):
        ys = [getattr(p, f"tpot_{pct}_ms") for p in drafts]
        if any(y is not None for y in ys):
            ax_itl.plot(xs, ys, style, label=f"TPOT {pct}")
            ax_itl.legend(fontsize=8)
    ax_itl.set_ylabel("time per output token (ms)")
    spec = [(x, p.acceptance) for x, p in zip(xs, drafts, strict=True) if p.acceptance is not None]
    if spec:
        ax_acc.bar([x for x, _ in spec], [a for _, a in spec], color="tab:orange")
        ax_acc.set_ylim(0, 1)
    else:
        _no_data(ax_acc, "nothing drafted")
    ax_acc.set_ylabel("accepted / drafted tokens")
    for ax in (ax_tok, ax_itl, ax_acc):
        ax.set_xlabel("draft_steps (0 = no speculation)")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{report.model.get('name', '?')}: self-speculative decoding at N={report.model.get('max_steps')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _x_axis(report: SweepReport) -> tuple[list[PointResult], list[float], str, str]:
    """The points the latency and throughput plots draw, their x values, axis label and title
    word: the steps points against their mean steps; without any, the offered-rate points
    (`--rates`, one setting at several loads) against their rate; else nothing."""
    steps = sorted((p for p in report.points if p.group == "steps" and p.mean_steps is not None),
                   key=lambda p: p.mean_steps or 0)  # fmt: skip
    if steps:
        return steps, [p.mean_steps or 0.0 for p in steps], "ODE steps per token", "steps"
    rates = sorted((p for p in report.points if p.group == "rate" and p.rate is not None),
                   key=lambda p: p.rate or 0)  # fmt: skip
    return rates, [p.rate or 0.0 for p in rates], "offered requests/s", "offered rate"


def plot_overload(report: SweepReport, over: list[PointResult], path: Path) -> None:
    """E2E latency and the steps chosen per request, over the overload run, per policy."""
    import matplotlib.pyplot as plt

    name = report.model.get("name", "?")
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for p in over:
        ok = [r for r in p.series if r["code"] == "OK"]
        ax1.plot([r["scheduled_s"] for r in ok], [r["e2e_ms"] for r in ok], ".", ms=4, label=p.label)
        ax2.plot([r["scheduled_s"] for r in ok], [r["steps"] for r in ok], ".-", ms=3, label=p.label)
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    rate = report.overload_rate
    ax1.set_title(f"{name}: overload at {rate:.2f} req/s" if rate else f"{name}: overload")
    ax1.set_ylabel("E2E latency (ms)")
    ax2.set_ylabel("steps chosen")
    ax2.set_xlabel("scheduled send time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def blank_column_notes(report: SweepReport) -> list[str]:
    """Why a column of the summary table is blank ("-"), for every column that is."""
    points = [p for p in report.points if p.ok]
    notes = []
    source = "the OpenAI HTTP route" if report.config.get("http_url") else "gRPC"
    profile_given = report.config.get("model_dir") or report.config.get("profile_path")
    if points and all(p.perplexity is None for p in points):
        why = (
            "the given profile has no setting these points ran at"
            if profile_given
            else "no --model-dir or --profile was given"
        )
        notes.append(
            f"ppl is blank: perplexity comes from the model's profile.json (measured by `leanserve eval`), "
            f"which the load tester reads from --model-dir or --profile, never from the server ({source} "
            f"reports the steps it ran, not their quality); {why}."
        )
    if points and all(p.predicted_e2e_ms is None for p in points):
        notes.append(
            "predicted E2E is blank: it is the cost model of profile.json (`cost_model`) applied with the "
            "model's config.json, so it needs --model-dir (a --profile alone has no config.json) and a "
            "profile with a cost model."
        )
    if points and all(p.itl_p50_ms is None for p in points):
        notes.append(
            "ITL is blank: every request produced at most one token-carrying message (max_tokens 1?)."
        )
    return notes


COST_MODEL_NOTE = (
    "The predicted E2E is the offline cost model of profile.json: decode iterations fitted at batch "
    "1-16 on the eval machine, prefill extrapolated from them, at the batch Little's law gives the "
    "point. It leaves out queueing behind other requests' prefills, the engine's scheduling and "
    "sampling, and the Ray proxy and transport hops, so it tends to read below the measured mean, "
    "the more so the busier the server (R^2 compares the two across points); the server's own "
    "predictor (runtime/predictor.py, "
    "`leanserve loadtest --budget-sweep`) adds those measured terms."
)


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
    drafts = _draft_points(report)
    if drafts:
        base = drafts[0] if _draft_steps(drafts[0]) == 0 else None
        lines += [
            "",
            f"## Self-speculative decoding at N={m.get('max_steps')}",
            "",
            "A speculative round's tokens arrive in one message, so the main table's ITL (gaps between"
            " messages) grows with speculation; TPOT is the time per output token after the first.",
            "",
            "| draft_steps | acceptance | tok/s | vs 0 | TPOT p50 / p99 | E2E p50 / p99 | drafted |",
            "|---:|---:|---:|---:|---|---|---:|",
        ]
        for p in drafts:
            ratio = (
                "-" if base is None or not base.tokens_per_s else f"{p.tokens_per_s / base.tokens_per_s:.2f}x"
            )
            lines.append(
                f"| {_draft_steps(p)} | {_fmt(p.acceptance, 3)} | {_fmt(p.tokens_per_s)} | {ratio} "
                f"| {_fmt(p.tpot_p50_ms)} / {_fmt(p.tpot_p99_ms)} "
                f"| {_fmt(p.e2e_p50_ms)} / {_fmt(p.e2e_p99_ms)} | {p.drafted_tokens} |"
            )
        lines += ["", "![speculation](speculation.png)"]
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
        f"Cost model vs measured mean E2E (steps/experts/tier points): R^2 = {_fmt(report.cost_r2, 3)}. "
        + COST_MODEL_NOTE,
        "",
        "![latency vs steps](latency_vs_steps.png) ![throughput](throughput_vs_steps.png) "
        "![latency vs quality](latency_vs_quality.png)",
    ]
    examples = {(code, msg) for p in report.points for code, msg in p.error_examples.items()}
    if examples:
        lines += ["", "Errors (one message per code):", ""] + [f"- {c}: {m}" for c, m in sorted(examples)]
    lines += [""] + stepload.markdown(report.step_load) if report.step_load is not None else []
    notes = blank_column_notes(report) + list(report.notes)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_report(report: SweepReport, out_dir: str | Path) -> list[Path]:
    """Write `files_for(report)` into `out_dir` (created); returns their paths.

    A scenario's files left in `out_dir` by an earlier run are removed when this report has no
    such scenario, so the folder never mixes runs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = files_for(report)
    for stale in set(FILES) - set(files):
        (out / stale).unlink(missing_ok=True)
    (out / "points.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    write_csv(report, out / "points.csv")
    if "overload_timeseries.csv" in files:
        write_timeseries_csv(report, out / "overload_timeseries.csv")
    plot_all(report, out)
    if report.step_load is not None:
        with (out / "step_load.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=stepload.CSV_COLUMNS)
            w.writeheader()
            w.writerows(stepload.csv_rows(report.step_load))
        stepload.plot(report.step_load, out / "step_load.png", report.model.get("name", "?"))
    (out / "summary.md").write_text(markdown(report), encoding="utf-8")
    return [out / f for f in files]
