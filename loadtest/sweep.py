"""Sweeps: many load points against one server, summarised per point.

A point is one run (open- or closed-loop) with one compute setting. A sweep
runs, in order: steps (explicit step counts), experts (at the maximum step
count), self-speculative draft settings (`draft_steps` at the maximum step
count, after a `draft_steps=0` point: the same requests without speculation),
quality tiers, request rates (at the maximum step count) and the overload
scenario. Every point reuses the same seed, so all points see the
same prompts and the same arrival pattern (common random numbers make the
differences between points the settings', not the dice's).

Per point: TTFT / ITL / E2E p50, p95, p99 from HdrHistogram (microsecond
resolution, 3 significant digits), throughput, error counts by gRPC code,
goodput under an SLO, the compute the server reported, the profile's
perplexity for that compute, and the cost model's predicted latency.

The overload scenario runs one rate that the maximum step count cannot
sustain against three policies: fixed N_max, fixed N_max/2, and requests with
no compute field, which the server answers with its default policy; start the
server with `--slo-target-itl-ms` so that the default is its SLO controller
(the report checks `policy_reason == "default:slo"` and says if it was not).
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.arrivals import LengthSpec, build_prompts, poisson_schedule
from loadtest.driver import (
    GrpcTransport,
    HttpTransport,
    RequestResult,
    RequestSpec,
    RunResult,
    Transport,
    run_closed_loop,
    run_open_loop,
)

_HDR_MAX_US = 3_600_000_000  # one hour: anything longer is a hung run, not a latency
PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class SLO:
    """Service-level objective for goodput, in seconds (None = not checked).

    A request is good when it succeeded, its TTFT <= `ttft`, its mean
    inter-token latency (time per output token) <= `itl`, and its E2E <= `e2e`.
    """

    ttft: float | None = 0.5
    itl: float | None = 0.05
    e2e: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """Parse `ttft=0.5,itl=0.05[,e2e=2]` (seconds)."""
        values: dict[str, float | None] = {"ttft": None, "itl": None, "e2e": None}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key not in values or not value:
                raise ValueError(f"bad SLO term {part!r}; use ttft=S,itl=S,e2e=S (seconds)")
            values[key] = float(value)
            if not values[key] > 0:  # type: ignore[operator]
                raise ValueError(f"SLO {key}={value} must be > 0 seconds")
        return cls(**values)

    def met(self, r: RequestResult) -> bool:
        """Whether one request meets the SLO."""
        if not r.ok:
            return False
        if self.ttft is not None and (r.ttft_s is None or r.ttft_s > self.ttft):
            return False
        tpot = r.tpot_s  # the mean gap per token, also when a message carries several
        if self.itl is not None and tpot is not None and tpot > self.itl:
            return False
        return not (self.e2e is not None and r.e2e_s > self.e2e)


class Profile:
    """A model's profile.json (quality per setting, cost model) and config, for lookups.

    Args:
        profile: the parsed profile.json (None = no quality or predictions).
        config: the parsed config.json (needed for cost-model predictions).
    """

    def __init__(self, profile: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> None:
        self.data = profile or {}
        self._ppl = {(s["steps"], s.get("experts")): s["perplexity"] for s in self.data.get("settings", [])}
        experts = [e for _, e in self._ppl if e is not None]
        self.max_experts = max(experts) if experts else None
        self.cost_model: Any = None
        self.model_config: Any = None
        if config is not None and "cost_model" in self.data:
            from models.config import ModelConfig  # public models API, lazy (imports torch)
            from models.cost import CostModel

            self.model_config = ModelConfig.from_dict(config)
            self.cost_model = CostModel.from_dict(self.data["cost_model"])

    @classmethod
    def load(cls, model_dir: str | Path | None = None, profile_path: str | Path | None = None) -> Profile:
        """From a model directory (profile.json + config.json) or a profile file alone."""
        profile = config = None
        if profile_path is not None:
            profile = json.loads(Path(profile_path).read_text(encoding="utf-8"))
        if model_dir is not None:
            d = Path(model_dir)
            if profile is None and (d / "profile.json").exists():
                profile = json.loads((d / "profile.json").read_text(encoding="utf-8"))
            if (d / "config.json").exists():
                config = json.loads((d / "config.json").read_text(encoding="utf-8"))
        return cls(profile, config)

    def perplexity(self, steps: int | None, experts: int | None = None) -> float | None:
        """Measured perplexity of a setting (experts None = the maximum); None if not profiled."""
        if steps is None:
            return None
        return self._ppl.get((steps, experts if experts is not None else self.max_experts))

    def predict_e2e_s(
        self, steps: int, prompt_tokens: int, new_tokens: int, batch: int, experts: int | None
    ) -> float | None:
        """The cost model's whole-request seconds (None without a cost model)."""
        if self.cost_model is None or new_tokens < 1:
            return None
        return self.cost_model.predict_request_seconds(
            self.model_config, steps, max(1, prompt_tokens), new_tokens, max(1, batch), experts
        )


def percentiles_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 and mean in milliseconds via an HdrHistogram (None when empty)."""
    from hdrh.histogram import HdrHistogram

    keys = [f"p{p}" for p in PERCENTILES] + ["mean"]
    if not values_s:
        return dict.fromkeys(keys)
    h = HdrHistogram(1, _HDR_MAX_US, 3)
    for v in values_s:
        h.record_value(min(_HDR_MAX_US, max(1, round(v * 1e6))))
    out: dict[str, float | None] = {f"p{p}": h.get_value_at_percentile(p) / 1e3 for p in PERCENTILES}
    out["mean"] = h.get_mean_value() / 1e3
    return out


@dataclass
class PointResult:
    """Summary of one sweep point (flat fields, so a CSV row is `asdict` minus the series).

    Latencies are milliseconds; rates are per second of the point's wall time.
    """

    group: str
    label: str
    mode: str
    rate: float | None
    concurrency: int | None
    compute: str
    sent: int
    ok: int
    errors: dict[str, int]
    error_examples: dict[str, str]
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    itl_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p95_ms: float | None
    e2e_p99_ms: float | None
    e2e_mean_ms: float | None
    send_lag_p99_ms: float | None
    throughput_rps: float
    tokens_per_s: float
    goodput_rps: float
    goodput_fraction: float
    mean_steps: float | None
    policy_reasons: dict[str, int]
    perplexity: float | None
    predicted_e2e_ms: float | None
    wall_s: float
    series: list[dict[str, Any]] = field(default_factory=list)
    drafted_tokens: int = 0
    acceptance: float | None = None  # accepted / drafted tokens (None: nothing drafted)
    tpot_p50_ms: float | None = None  # time per output token after the first, per request
    tpot_p99_ms: float | None = None


def summarize(
    group: str,
    label: str,
    compute: dict[str, Any],
    run: RunResult,
    slo: SLO,
    profile: Profile,
    keep_series: bool = False,
) -> PointResult:
    """Turn one run into a `PointResult`."""
    rs = run.results
    ok = [r for r in rs if r.ok]
    wall = max(run.wall_s, 1e-9)
    ttft = percentiles_ms([r.ttft_s for r in ok if r.ttft_s is not None])
    itl = percentiles_ms([g for r in ok for g in r.itls_s])
    e2e = percentiles_ms([r.e2e_s for r in ok])
    tpot = percentiles_ms([t for r in ok if (t := r.tpot_s) is not None])
    lag = percentiles_ms([max(0.0, r.send_lag_s) for r in rs])
    steps = [r.steps for r in ok if r.steps is not None]
    ppls = [p for r in ok if (p := profile.perplexity(r.steps, r.experts)) is not None]
    mean_steps = statistics.fmean(steps) if steps else None
    tokens = sum(r.tokens for r in ok)
    predicted = None
    if ok and steps:
        # Batch size seen by a request, by Little's law: mean in flight = throughput x mean E2E.
        in_flight = len(ok) / wall * statistics.fmean(r.e2e_s for r in ok)
        experts = Counter(r.experts for r in ok).most_common(1)[0][0]
        p = profile.predict_e2e_s(
            round(mean_steps or 0),
            round(statistics.fmean(r.prompt_tokens for r in ok)),
            round(tokens / len(ok)),
            round(in_flight),
            experts,
        )
        predicted = None if p is None else p * 1e3
    good = sum(1 for r in rs if slo.met(r))
    drafted = sum(r.drafted_tokens for r in ok)
    accepted = sum(r.accepted_tokens for r in ok)
    series = []
    if keep_series:
        series = [
            {
                "scheduled_s": round(r.scheduled_s, 4),
                "e2e_ms": round(r.e2e_s * 1e3, 2),
                "ttft_ms": None if r.ttft_s is None else round(r.ttft_s * 1e3, 2),
                "steps": r.steps,
                "code": r.code,
            }
            for r in rs
        ]
    return PointResult(
        group=group,
        label=label,
        mode=run.mode,
        rate=run.rate,
        concurrency=run.concurrency,
        compute=json.dumps(compute, sort_keys=True),
        sent=len(rs),
        ok=len(ok),
        errors=dict(Counter(r.code for r in rs if not r.ok)),
        # The first message per code: "INVALID_ARGUMENT x 50" alone does not say what to fix.
        error_examples={r.code: r.detail for r in reversed(rs) if not r.ok},
        ttft_p50_ms=ttft["p50"],
        ttft_p95_ms=ttft["p95"],
        ttft_p99_ms=ttft["p99"],
        itl_p50_ms=itl["p50"],
        itl_p95_ms=itl["p95"],
        itl_p99_ms=itl["p99"],
        e2e_p50_ms=e2e["p50"],
        e2e_p95_ms=e2e["p95"],
        e2e_p99_ms=e2e["p99"],
        e2e_mean_ms=e2e["mean"],
        send_lag_p99_ms=lag["p99"],
        throughput_rps=len(ok) / wall,
        tokens_per_s=tokens / wall,
        goodput_rps=good / wall,
        goodput_fraction=good / len(rs) if rs else 0.0,
        mean_steps=mean_steps,
        policy_reasons=dict(Counter(r.policy_reason for r in ok)),
        perplexity=statistics.fmean(ppls) if ppls else None,
        predicted_e2e_ms=predicted,
        wall_s=run.wall_s,
        series=series,
        drafted_tokens=drafted,
        acceptance=accepted / drafted if drafted else None,
        tpot_p50_ms=tpot["p50"],
        tpot_p99_ms=tpot["p99"],
    )


def r_squared(measured: Sequence[float], predicted: Sequence[float]) -> float | None:
    """Coefficient of determination of `predicted` for `measured` (None for < 2 points)."""
    if len(measured) < 2:
        return None
    mean = statistics.fmean(measured)
    ss_tot = sum((m - mean) ** 2 for m in measured)
    ss_res = sum((m - p) ** 2 for m, p in zip(measured, predicted, strict=True))
    return None if ss_tot == 0 else 1.0 - ss_res / ss_tot


@dataclass
class SweepConfig:
    """Everything a sweep needs (the CLI maps its flags onto this).

    Attributes:
        target: gRPC "HOST:PORT" (always used for `GetModelInfo`).
        http_url: drive the OpenAI HTTP route at this base URL instead of gRPC.
        mode: "open" (Poisson at `rate`) or "closed" (`concurrency` in flight).
        rate: arrivals per second of the steps / experts / tier points.
        concurrency: closed-loop in-flight requests.
        steps: step counts to sweep ([] = none, None = spread over the model's range).
        experts: expert settings to sweep at the maximum steps ([] = none, None = all offered).
        draft_steps: self-speculative draft step counts to sweep at the maximum steps, after a
            `draft_steps=0` point ([] = none, None = every count below the maximum).
        draft_tokens: tokens drafted per round at those points (None = the server's default).
        tiers: quality tiers to sweep ([] = none, None = all offered).
        rates: rates to sweep at the maximum steps (open loop).
        overload: run the overload scenario.
        overload_rate: its rate (None = 1.5 x the closed-loop capacity measured at N_max).
        step_load: run the step-load scenario (`loadtest.stepload`).
        step_load_rate: its unit rate, the sustainable rate at N_max (None = the closed-loop
            capacity measured at N_max).
        phase_s: seconds per step-load phase.
        step_load_steps: fixed step counts compared in the step load (None = the whole range).
        stats_url: the server's `/stats`, polled for the controller's operating point.
        max_requests: per point.
        duration_s: per point send window; in-flight requests get `timeout_s` more.
        max_tokens: per request.
        prompt_lengths: prompt length distribution.
        prompt_source: "synthetic" or "bible".
        seed: schedule and prompt seed (the same for every point).
        slo: goodput objective.
        timeout_s: per-request deadline.
        retries: the gRPC channel retries UNAVAILABLE before a stream's first message
            (`runtime.client.channel_options`); False sends every request once.
        model_dir: model directory whose profile.json / config.json give quality and predictions.
        profile_path: a profile.json to use instead.
        progress: show a progress bar.
    """

    target: str = "127.0.0.1:9000"
    http_url: str | None = None
    mode: str = "open"
    rate: float = 2.0
    concurrency: int = 4
    steps: list[int] | None = None
    experts: list[int] | None = field(default_factory=list)
    draft_steps: list[int] | None = field(default_factory=list)
    draft_tokens: int | None = None
    tiers: list[str] | None = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    overload: bool = False
    overload_rate: float | None = None
    step_load: bool = False
    step_load_rate: float | None = None
    phase_s: float = 20.0
    step_load_steps: list[int] | None = None
    stats_url: str | None = None
    max_requests: int = 50
    duration_s: float = 30.0
    max_tokens: int = 32
    prompt_lengths: LengthSpec = field(default_factory=LengthSpec)
    prompt_source: str = "synthetic"
    seed: int = 0
    slo: SLO = field(default_factory=SLO)
    timeout_s: float = 60.0
    retries: bool = True
    model_dir: str | None = None
    profile_path: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"mode={self.mode!r}; use open or closed")
        for name in ("rate", "duration_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("concurrency", "max_requests", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass
class SweepReport:
    """A finished sweep: model info, every point, and derived comparisons."""

    model: dict[str, Any]
    config: dict[str, Any]
    points: list[PointResult]
    overload_rate: float | None = None
    cost_r2: float | None = None
    notes: list[str] = field(default_factory=list)
    step_load: Any = None  # loadtest.stepload.StepLoadResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "config": self.config,
            "overload_rate": self.overload_rate,
            "cost_model_r2": self.cost_r2,
            "notes": self.notes,
            "points": [asdict(p) for p in self.points],
            "step_load": None if self.step_load is None else self.step_load.to_dict(),
        }


def spread_steps(low: int, high: int, count: int = 5) -> list[int]:
    """Up to `count` distinct step counts from `low` to `high`, ends included."""
    if count <= 1 or low == high:
        return [high]
    return sorted({round(low + (high - low) * i / (count - 1)) for i in range(count)})


def model_summary(info: Any) -> dict[str, Any]:
    """The parts of `ModelInfo` a report needs, as plain data."""
    return {
        "name": info.name,
        "min_steps": info.min_steps,
        "max_steps": info.max_steps,
        "default_steps": info.default_steps,
        "ffn": info.ffn,
        "experts_top_k_options": list(info.experts_top_k_options),
        "expert_depth_options": list(info.expert_depth_options),
        "quality_tiers": {t.name: t.steps for t in info.quality_tiers},
        "backend": info.backend,
    }


class Sweep:
    """Runs the points of a `SweepConfig` against a server.

    Args:
        config: the sweep.
        transport: override the transport (tests); default gRPC or HTTP per config.
    """

    def __init__(self, config: SweepConfig, transport: Transport | None = None) -> None:
        self.cfg = config
        self.grpc = GrpcTransport(config.target, config.timeout_s, retries=config.retries)
        self.transport: Transport = transport or (
            HttpTransport(config.http_url, config.timeout_s) if config.http_url else self.grpc
        )
        self.profile = Profile.load(config.model_dir, config.profile_path)
        prompts = build_prompts(
            max(1, min(config.max_requests, 256)), config.prompt_lengths, config.prompt_source, config.seed
        )
        self.prompts = prompts
        self.schedule_cache: dict[float, list[float]] = {}
        self._bar: Any = None

    def specs(self, compute: dict[str, Any]) -> list[RequestSpec]:
        """The point's requests: the shared prompts with this compute setting."""
        return [
            RequestSpec(p, self.cfg.max_tokens, 0.0, self.cfg.seed + i, dict(compute))
            for i, p in enumerate(self.prompts)
        ]

    def _on_done(self, _: RequestResult) -> None:
        if self._bar is not None:
            self._bar.update(1)

    async def run_point(
        self, group: str, label: str, compute: dict[str, Any], rate: float | None = None,
        mode: str | None = None, max_requests: int | None = None, keep_series: bool = False,
    ) -> PointResult:  # fmt: skip
        """One point: an open-loop run at `rate` (default `cfg.rate`) or a closed-loop run."""
        cfg = self.cfg
        mode = mode or cfg.mode
        n = max_requests or cfg.max_requests
        if self._bar is not None:
            self._bar.set_description(f"{group}:{label}")
        if mode == "open":
            r = rate or cfg.rate
            schedule = poisson_schedule(r, n, cfg.duration_s, cfg.seed)
            run = await run_open_loop(
                self.transport, self.specs(compute), schedule, duration_s=cfg.duration_s,
                drain_s=cfg.timeout_s, rate=r, on_done=self._on_done,
            )  # fmt: skip
        else:
            run = await run_closed_loop(
                self.transport, self.specs(compute), concurrency=cfg.concurrency, max_requests=n,
                duration_s=cfg.duration_s, drain_s=cfg.timeout_s, on_done=self._on_done,
            )  # fmt: skip
        return summarize(group, label, compute, run, cfg.slo, self.profile, keep_series)

    def plan(self, info: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], float | None]]:
        """The regular points `(group, label, compute, rate)`; the overload scenario comes after."""
        cfg = self.cfg
        lo, hi = info["min_steps"], info["max_steps"]
        points: list[tuple[str, str, dict[str, Any], float | None]] = []
        steps = spread_steps(lo, hi) if cfg.steps is None else cfg.steps
        points += [("steps", f"N={s}", {"steps": s}, None) for s in steps]
        key, options = (
            ("expert_depth", info["expert_depth_options"])
            if info["ffn"] == "tree"
            else ("experts_top_k", info["experts_top_k_options"])
        )
        experts = options if cfg.experts is None else cfg.experts
        if experts and not options:
            raise ValueError(f"model {info['name']} has a {info['ffn']} FFN: no expert settings to sweep")
        points += [("experts", f"{key}={e}", {"steps": hi, key: e}, None) for e in experts]
        drafts = list(range(lo, hi)) if cfg.draft_steps is None else cfg.draft_steps
        if drafts:
            per_round = {} if cfg.draft_tokens is None else {"draft_tokens": cfg.draft_tokens}
            for d in [0, *(d for d in drafts if d)]:
                compute = {"steps": hi, "draft_steps": d, **(per_round if d else {})}
                points.append(("draft", f"draft_steps={d}", compute, None))
        tiers = list(info["quality_tiers"]) if cfg.tiers is None else cfg.tiers
        points += [("tier", t, {"quality": t}, None) for t in tiers]
        points += [("rate", f"{r:g}/s", {"steps": hi}, r) for r in cfg.rates]
        return points

    async def run(self, report_progress: Callable[[str], None] | None = None) -> SweepReport:
        """Run every point; returns the report data (nothing is written here)."""
        cfg = self.cfg
        await self.grpc.open()
        if self.transport is not self.grpc:
            await self.transport.open()
        try:
            info = model_summary(await self.grpc.model_info())
            plan = self.plan(info)
            total = len(plan) * cfg.max_requests + (3 * cfg.max_requests + 8 if cfg.overload else 0)
            if cfg.progress:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="req", dynamic_ncols=True)
            points = []
            for group, label, compute, rate in plan:
                mode = "open" if group == "rate" else None
                points.append(await self.run_point(group, label, compute, rate, mode))
            report = SweepReport(info, _config_dict(cfg), points)
            if cfg.overload:
                await self._overload(info, report)
            if cfg.step_load:
                await self._step_load(info, report)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self.transport is not self.grpc:
                await self.transport.close()
            await self.grpc.close()
        _compare_cost_model(report)
        return report

    async def _overload(self, info: dict[str, Any], report: SweepReport) -> None:
        """Fixed N_max, fixed N_max/2 and the server's default policy at one overload rate."""
        cfg = self.cfg
        hi, lo = info["max_steps"], info["min_steps"]
        rate = cfg.overload_rate
        if rate is None:
            # Capacity at N_max: a short closed loop, then 1.5x that, which N_max cannot sustain.
            probe = await self.run_point(
                "probe", f"N={hi} capacity", {"steps": hi}, mode="closed", max_requests=8
            )
            if not probe.ok:
                report.notes.append(
                    f"overload scenario skipped: no request succeeded at N_max {probe.errors}"
                )
                return
            rate = 1.5 * probe.throughput_rps
            report.notes.append(
                f"overload rate {rate:.2f}/s = 1.5 x closed-loop capacity at N_max "
                f"({probe.throughput_rps:.2f}/s at concurrency {cfg.concurrency})"
            )
        report.overload_rate = rate
        half = max(lo, hi // 2)
        for label, compute in ((f"fixed N={hi}", {"steps": hi}), (f"fixed N={half}", {"steps": half}),
                               ("SLO controller", {})):  # fmt: skip
            point = await self.run_point("overload", label, compute, rate, "open", keep_series=True)
            report.points.append(point)
        ctl = report.points[-1]
        if ctl.ok and set(ctl.policy_reasons) != {"default:slo"}:
            report.notes.append(
                f"the default-policy point ran with policy reasons {ctl.policy_reasons}, not only "
                f"'default:slo': start the server with --slo-target-itl-ms to compare its SLO controller"
            )

    async def _step_load(self, info: dict[str, Any], report: SweepReport) -> None:
        """The step-load scenario (`loadtest.stepload`) at `step_load_rate` or the probed capacity."""
        from loadtest.stepload import run_step_load

        cfg = self.cfg
        rate = cfg.step_load_rate
        if rate is None:
            hi = info["max_steps"]
            probe = await self.run_point(
                "probe", f"N={hi} capacity", {"steps": hi}, mode="closed", max_requests=16
            )
            if not probe.ok:
                report.notes.append(f"step load skipped: no request succeeded at N_max {probe.errors}")
                return
            rate = probe.throughput_rps
            report.notes.append(
                f"step-load unit rate {rate:.2f}/s = closed-loop capacity at N_max"
                f" (concurrency {cfg.concurrency})"
            )
        report.step_load = await run_step_load(
            self, info, rate, phase_s=cfg.phase_s, steps=cfg.step_load_steps, stats_url=cfg.stats_url
        )


def _compare_cost_model(report: SweepReport) -> None:
    """R^2 of measured mean E2E vs the cost model over the non-overload points."""
    pairs = [
        (p.e2e_mean_ms, p.predicted_e2e_ms)
        for p in report.points
        if p.group in ("steps", "experts", "tier") and p.e2e_mean_ms is not None
        and p.predicted_e2e_ms is not None
    ]  # fmt: skip
    if pairs:
        report.cost_r2 = r_squared([m for m, _ in pairs], [p for _, p in pairs])
    elif any(p.predicted_e2e_ms is not None for p in report.points):
        report.notes.append(
            "no cost-model R^2: it compares the steps, experts and tier points (settings at one load), "
            "and this run has none; the predicted E2E column is still filled per point"
        )
    else:
        report.notes.append("no cost-model comparison: pass --model-dir with profile.json and config.json")


def _config_dict(cfg: SweepConfig) -> dict[str, Any]:
    """The sweep's settings as JSON-safe data (nested dataclasses become dicts)."""
    return asdict(cfg)


def run_sweep(config: SweepConfig, transport: Transport | None = None) -> SweepReport:
    """Synchronous wrapper: run a sweep on a fresh event loop."""
    return asyncio.run(Sweep(config, transport).run())
