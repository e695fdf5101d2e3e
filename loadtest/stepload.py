"""The step-load scenario: a load that jumps (0.5x -> 2x -> 0.5x of the rate N_max sustains).

Each policy (every fixed step count asked for, then the server's default,
which is its SLO controller when the server runs with `--slo-target-itl-ms`)
sees the same piecewise-Poisson schedule: phase i sends at
`multipliers[i] x rate` for `phase_s` seconds. Every request is assigned to
the phase of its scheduled send time, and each (policy, phase) pair is
summarised like a sweep point (`sweep.summarize`): SLO attainment, mean
steps, the profile's perplexity, latency percentiles.

For the controller run, `stats_url` (the HTTP route's `/stats`) is polled
every `poll_s`; its `slo.operating_point` is the controller's trajectory,
from which the report counts direction reversals per phase after the phase's
first `settle_s` seconds and the time back to the full step count (the top of
the controller's ladder) after the load drops. Without `stats_url` the
trajectory is the mean step count of the requests sent in each second.

The verdicts are issue 20's targets: per phase >= 95 % of requests within the
SLO, perplexity no worse than the best fixed step count that also met the
SLO in that phase, at most two reversals after the first 5 s, and back to
the full step count within 10 s of a drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from loadtest.arrivals import poisson_schedule
from loadtest.driver import RunResult, run_open_loop

GOOD_TARGET = 0.95
REVERSALS_TARGET = 2
BACK_TARGET_S = 10.0
CONTROLLER = "SLO controller"


def count_reversals(values: Sequence[float]) -> int:
    """How often a series changes direction (repeated values do not count)."""
    reversals, last = 0, 0
    for a, b in zip(values, values[1:], strict=False):
        if b == a:
            continue
        d = 1 if b > a else -1
        reversals += last not in (0, d)
        last = d
    return reversals


def step_schedule(rate: float, multipliers: Sequence[float], phase_s: float, seed: int = 0) -> list[float]:
    """Send offsets of a piecewise-Poisson process: `multipliers[i] x rate` during phase i."""
    out: list[float] = []
    for i, m in enumerate(multipliers):
        count = int(m * rate * phase_s * 2) + 10  # a bound well above the expected count
        out += [i * phase_s + t for t in poisson_schedule(m * rate, count, phase_s, seed + i)]
    return out


@dataclass
class StepLoadResult:
    """A finished step-load scenario (plain data; `report` renders it).

    Attributes:
        rate: the sustainable rate at N_max the multipliers apply to.
        multipliers: the phases' load factors.
        phase_s: seconds per phase.
        settle_s: seconds at the start of a phase not counted for reversals.
        phases: per policy, one summary per phase (`PointResult` as a dict).
        series: per policy, one row per request (send time, latencies, steps, good).
        trace: the controller's trajectory, (seconds, operating point) pairs.
        trace_source: "stats" (polled `/stats`) or "requests" (per-second mean steps).
        ladder_top: the controller's full step count (None if unknown).
        reversals: per phase, reversals of the trajectory after `settle_s`.
        back_s: per phase that follows a drop in load, seconds until the full step count.
        best_fixed: per phase, the fixed policy with the best perplexity among those within target.
        verdicts: per phase, each target and whether the controller met it.
        polled: the controller's `/stats` snapshots (its inputs and predictions) over the run.
    """

    rate: float
    multipliers: list[float]
    phase_s: float
    settle_s: float
    phases: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    series: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    trace: list[tuple[float, float]] = field(default_factory=list)
    trace_source: str = "requests"
    ladder_top: int | None = None
    reversals: list[int] = field(default_factory=list)
    back_s: dict[int, float | None] = field(default_factory=dict)
    best_fixed: list[str | None] = field(default_factory=list)
    verdicts: list[dict[str, bool | None]] = field(default_factory=list)
    polled: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _poll(url: str, poll_s: float, t0: float, out: list[dict[str, Any]]) -> None:
    """GET `url` every `poll_s` until cancelled; keep the SLO controller's part."""
    import aiohttp

    from runtime.client import auth_metadata

    headers = {k.title(): v for k, v in auth_metadata()}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0), headers=headers) as session:
        while True:
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
                async with session.get(url) as resp:
                    slo = (await resp.json()).get("slo") or {}
                    if "operating_point" in slo:
                        out.append({"t": time.perf_counter() - t0, **slo})
            await asyncio.sleep(poll_s)


def _phase_of(t: float, phase_s: float, n: int) -> int:
    return min(int(t // phase_s), n - 1)


async def run_step_load(
    sweep: Any,
    info: dict[str, Any],
    rate: float,
    multipliers: Sequence[float] = (0.5, 2.0, 0.5),
    phase_s: float = 20.0,
    steps: Sequence[int] | None = None,
    stats_url: str | None = None,
    poll_s: float = 0.25,
    settle_s: float = 5.0,
) -> StepLoadResult:
    """Run the scenario against `sweep`'s server (see the module docstring).

    Args:
        sweep: a `loadtest.sweep.Sweep` with open transports.
        info: `sweep.model_summary` of the server's model.
        rate: the sustainable rate at N_max, requests/s.
        multipliers: load per phase, in units of `rate`.
        phase_s: seconds per phase (>= 20 for issue 20's profile).
        steps: fixed step counts to compare (None = every count of the model's range).
        stats_url: the server's `/stats` URL, polled during the controller run.
        poll_s: seconds between polls.
        settle_s: seconds at the start of each phase not counted for reversals.
    """
    from loadtest.sweep import summarize

    cfg = sweep.cfg
    n = len(multipliers)
    schedule = step_schedule(rate, multipliers, phase_s, cfg.seed)
    total_s = n * phase_s
    lo, hi = info["min_steps"], info["max_steps"]
    fixed = list(range(lo, hi + 1)) if steps is None else [s for s in steps if lo <= s <= hi]
    policies = [(f"fixed N={s}", {"steps": s}) for s in fixed] + [(CONTROLLER, {})]
    result = StepLoadResult(rate, list(multipliers), phase_s, settle_s)
    polled: list[dict[str, Any]] = []
    for label, compute in policies:
        if sweep._bar is not None:
            sweep._bar.set_description(f"step load:{label}")
        poller = None
        t0 = time.perf_counter()
        if label == CONTROLLER and stats_url:
            poller = asyncio.create_task(_poll(stats_url, poll_s, t0, polled))
        try:
            run = await run_open_loop(
                sweep.transport, sweep.specs(compute), schedule, duration_s=total_s,
                drain_s=min(cfg.timeout_s, 30.0), rate=rate, on_done=sweep._on_done,
            )  # fmt: skip
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
        rows = []
        for i, m in enumerate(multipliers):
            part = [r for r in run.results if _phase_of(r.scheduled_s, phase_s, n) == i]
            sub = RunResult(part, phase_s, "open", rate=m * rate)
            point = summarize("step_load", f"{label} phase {i + 1}", compute, sub, cfg.slo, sweep.profile)
            rows.append(asdict(point))
        result.phases[label] = rows
        result.series[label] = [
            {
                "scheduled_s": round(r.scheduled_s, 4),
                "ttft_ms": None if r.ttft_s is None else round(r.ttft_s * 1e3, 2),
                "e2e_ms": round(r.e2e_s * 1e3, 2),
                "steps": r.steps,
                "good": cfg.slo.met(r),
                "code": r.code,
            }
            for r in run.results
        ]
    _trajectory(result, polled)
    _judge(result)
    return result


def _trajectory(result: StepLoadResult, polled: list[dict[str, Any]]) -> None:
    """The controller's trajectory, its reversals per phase and the time back to full steps."""
    n, phase_s = len(result.multipliers), result.phase_s
    if polled:
        result.polled = polled
        result.trace = [(round(p["t"], 3), float(p["operating_point"])) for p in polled]
        result.trace_source = "stats"
        result.ladder_top = int(polled[-1]["ladder"][-1]) if polled[-1].get("ladder") else None
    else:
        by_second: dict[int, list[int]] = {}
        for r in result.series.get(CONTROLLER, []):
            if r["steps"] is not None:
                by_second.setdefault(int(r["scheduled_s"]), []).append(r["steps"])
        result.trace = [(float(s), sum(v) / len(v)) for s, v in sorted(by_second.items())]
        steps = [r["steps"] for r in result.series.get(CONTROLLER, []) if r["steps"] is not None]
        result.ladder_top = max(steps) if steps else None
    for i in range(n):
        start, end = i * phase_s, (i + 1) * phase_s
        result.reversals.append(
            count_reversals([x for t, x in result.trace if start + result.settle_s <= t < end])
        )
        if i and result.multipliers[i] < result.multipliers[i - 1]:
            back = next((t for t, x in result.trace if t >= start and x == result.ladder_top), None)
            result.back_s[i] = None if back is None else round(back - start, 2)


def _judge(result: StepLoadResult) -> None:
    """Best fixed policy per phase and the controller's verdict on each target."""
    ctl = result.phases.get(CONTROLLER)
    for i in range(len(result.multipliers)):
        within = [
            (rows[i]["perplexity"], label)
            for label, rows in result.phases.items()
            if label != CONTROLLER
            and rows[i]["goodput_fraction"] >= GOOD_TARGET
            and rows[i]["perplexity"] is not None
        ]
        best = min(within)[1] if within else None
        result.best_fixed.append(best)
        if ctl is None:
            result.verdicts.append({})
            continue
        row = ctl[i]
        best_ppl = result.phases[best][i]["perplexity"] if best else None
        result.verdicts.append(
            {
                "slo": row["goodput_fraction"] >= GOOD_TARGET,
                "quality": None
                if best_ppl is None or row["perplexity"] is None
                else row["perplexity"] <= best_ppl,
                "reversals": result.reversals[i] <= REVERSALS_TARGET,
                "back": None if i not in result.back_s else _within(result.back_s[i], BACK_TARGET_S),
            }
        )


def _within(value: float | None, bound: float) -> bool:
    return value is not None and value <= bound


# ----------------------------------------------------------------------------
# Report: CSV, plot, markdown (called by loadtest.report)
# ----------------------------------------------------------------------------
CSV_COLUMNS = (
    "policy", "phase", "rate", "sent", "ok", "good_pct", "mean_steps", "perplexity",
    "ttft_p99_ms", "itl_p99_ms", "e2e_p99_ms",
)  # fmt: skip


def csv_rows(result: StepLoadResult | None) -> list[dict[str, Any]]:
    """One row per (policy, phase)."""
    if result is None:
        return []
    rows = []
    for label, phases in result.phases.items():
        for i, p in enumerate(phases):
            rows.append(
                {
                    "policy": label,
                    "phase": i + 1,
                    "rate": p["rate"],
                    "sent": p["sent"],
                    "ok": p["ok"],
                    "good_pct": round(100 * p["goodput_fraction"], 1),
                    "mean_steps": p["mean_steps"],
                    "perplexity": p["perplexity"],
                    "ttft_p99_ms": p["ttft_p99_ms"],
                    "itl_p99_ms": p["itl_p99_ms"],
                    "e2e_p99_ms": p["e2e_p99_ms"],
                }
            )
    return rows


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def markdown(result: StepLoadResult | None, title_level: str = "##") -> list[str]:
    """The step-load section: one row per policy (good % / mean steps / perplexity per phase),
    the best fixed policy per phase, the controller's reversals and recovery, and the verdicts."""
    if result is None:
        return []
    n = len(result.multipliers)
    phases = " -> ".join(f"{m:g}x" for m in result.multipliers)
    head = " | ".join(
        f"phase {i + 1} ({m:g}x = {m * result.rate:.1f}/s)" for i, m in enumerate(result.multipliers)
    )
    lines = [
        f"{title_level} Step load {phases} of {result.rate:.2f} req/s, {result.phase_s:g} s per phase",
        "",
        "Cells: requests within the SLO (%) / mean steps / mean perplexity (profile.json) of the served "
        "requests.",
        "",
        f"| policy | {head} |",
        "|---|" + "---|" * n,
    ]
    for label, rows in result.phases.items():
        cells = [
            f"{_fmt(100 * r['goodput_fraction'])} / {_fmt(r['mean_steps'], 2)} / {_fmt(r['perplexity'], 2)}"
            for r in rows
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    best = [b or "none within target" for b in result.best_fixed]
    lines.append("| best fixed within target | " + " | ".join(best) + " |")
    if CONTROLLER in result.phases:
        rev = [str(r) for r in result.reversals]
        lines.append(f"| controller reversals after {result.settle_s:g} s | " + " | ".join(rev) + " |")
        back = [("-" if i not in result.back_s else f"{_fmt(result.back_s[i])} s") for i in range(n)]
        lines.append(f"| controller back to {result.ladder_top} steps | " + " | ".join(back) + " |")
        marks = {True: "met", False: "**missed**", None: "-"}
        verdict = [
            ", ".join(f"{k} {marks[v]}" for k, v in result.verdicts[i].items() if v is not None)
            for i in range(n)
        ]
        lines.append("| targets | " + " | ".join(verdict) + " |")
        lines += [
            "",
            f"Targets per phase: >= {100 * GOOD_TARGET:g} % within the SLO; perplexity no worse than "
            f"the best fixed step count within target; <= {REVERSALS_TARGET} reversals of the "
            f"controller's operating point after the first {result.settle_s:g} s (trajectory from "
            f"{result.trace_source}); back to the full step count within {BACK_TARGET_S:g} s of a drop.",
        ]
    lines += ["", "![step load](step_load.png)"]
    return lines


def plot(result: StepLoadResult | None, path: Any, name: str = "?") -> None:
    """Latency and steps over time: the controller, fixed N_max and the best fixed of the peak phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    if result is None or not result.series:
        ax1.text(
            0.5, 0.5, "no step-load scenario (--step-load)", ha="center", va="center", transform=ax1.transAxes
        )
    else:
        peak = max(range(len(result.multipliers)), key=lambda i: result.multipliers[i])
        fixed = [label for label in result.series if label != CONTROLLER]
        shown = [label for label in (fixed[-1] if fixed else None, result.best_fixed[peak]) if label]
        shown = list(dict.fromkeys(shown)) + ([CONTROLLER] if CONTROLLER in result.series else [])
        for label in shown:
            ok = [r for r in result.series[label] if r["code"] == "OK" and r["ttft_ms"] is not None]
            ax1.plot([r["scheduled_s"] for r in ok], [r["ttft_ms"] for r in ok], ".", ms=3, label=label)
            ax2.plot(
                [r["scheduled_s"] for r in ok], [r["steps"] for r in ok], ".", ms=2, alpha=0.4, label=label
            )
        if result.trace:
            ax2.plot(
                *zip(*result.trace, strict=True),
                "k-",
                lw=1.2,
                label=f"controller operating point ({result.trace_source})",
            )
        for i in range(1, len(result.multipliers)):
            for ax in (ax1, ax2):
                ax.axvline(i * result.phase_s, color="grey", lw=0.8, ls="--")
        rate = ax2.twinx()
        xs = [
            x for i in range(len(result.multipliers)) for x in (i * result.phase_s, (i + 1) * result.phase_s)
        ]
        ys = [m * result.rate for m in result.multipliers for _ in (0, 1)]
        rate.plot(xs, ys, color="tab:red", lw=1, alpha=0.5)
        rate.set_ylabel("offered req/s", color="tab:red")
        ax1.set_yscale("log")
        ax1.legend(fontsize=7, loc="upper left")
        ax2.legend(fontsize=7, loc="lower left")
    ax1.set_ylabel("time to first token (ms)")
    ax2.set_ylabel("steps")
    ax2.set_xlabel("scheduled send time (s)")
    ax1.set_title(f"{name}: step load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------
# README block: `python -m loadtest.stepload README.md RESULTS_DIR` rewrites the text between
# the markers from RESULTS_DIR/points.json, so the README's table is the report's.
# ----------------------------------------------------------------------------
BEGIN, END = "<!-- step-load:begin -->", "<!-- step-load:end -->"


def load(points_json: Any) -> StepLoadResult:
    """The step-load result of a report's points.json."""
    import json
    from pathlib import Path

    data = json.loads(Path(points_json).read_text(encoding="utf-8"))["step_load"]
    data["back_s"] = {int(k): v for k, v in data["back_s"].items()}
    data["trace"] = [tuple(p) for p in data["trace"]]
    return StepLoadResult(**data)


def readme_block(results_dir: Any) -> str:
    """The README block for a results folder (its table, images linked from the folder)."""
    from pathlib import Path

    folder = Path(results_dir)
    lines = markdown(load(folder / "points.json"), title_level="####")
    lines = [line.replace("](step_load.png)", f"]({folder.as_posix()}/step_load.png)") for line in lines]
    return "\n".join([BEGIN, *lines, END])


def update_readme(readme: Any, results_dir: Any) -> None:
    """Replace the marked block of `readme` with `readme_block(results_dir)`."""
    from pathlib import Path

    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + readme_block(results_dir) + text[end:], encoding="utf-8")


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m loadtest.stepload README.md RESULTS_DIR")
    update_readme(sys.argv[1], sys.argv[2])
