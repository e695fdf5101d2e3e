"""Step policy: which step count and expert setting a request runs, and why.

Precedence (the first rule that applies decides the step count; `reason` in
the response says which):

1. `compute.steps` given -> that count, reason "explicit".
2. `compute.quality` given -> the tier's setting from the model's
   profile.json (`quality_tiers`), reason "quality:<tier>". Without a
   profile the tiers default to fast = max(min, round(max / 4)),
   balanced = round(max / 2) (clamped to the range), best = max.
3. `compute.latency_budget_ms` given -> the largest step count whose
   predicted end-to-end time, at the predictor's upper quantile of its
   recent error, fits the budget (runtime/predictor.py: queueing, prefill,
   decode iterations at the batch the request will run in, the engine's own
   measured overheads, the client hop), reason "latency_budget". The gRPC
   deadline (`x-leanserve-timeout-ms`) arrives here as the same field when no
   compute field is set. If even the minimum does not fit, the server
   option `EngineConfig.latency_budget_unmet` decides: "min" (default) runs
   the request at the minimum with reason "latency_budget:min", a best
   effort the caller can see; "reject" refuses it before any work with an
   error naming `latency_budget_ms`: `InvalidRequestError` (INVALID_ARGUMENT
   / HTTP 400) when even an idle server is predicted to miss it,
   `OverloadedError` (RESOURCE_EXHAUSTED / HTTP 429, worth retrying) when
   only the current load makes it miss. Without a cost model the budget
   cannot be mapped and the default applies, with reason
   "latency_budget:uncalibrated".
4. Otherwise the server default: a fixed count ("default:fixed") or the
   current value of an `SLOController` ("default:slo", runtime/slo.py).

Steps as a memory dial (`EngineConfig.kv_min_steps`, off by default): a
request whose step count the server chose (rules 3 and 4; not an explicit
count or a quality tier, which the client asked for) carries
`PolicyDecision.min_steps`, the fewest steps the scheduler may admit it at
when the KV pool cannot hold it at its steps (runtime/scheduler.py): a
request's KV is proportional to its step count. Its response then reports
the steps it ran and a reason ending in "+kv".

Every decision with a cost model carries the predictor's end-to-end
prediction at the chosen steps (`PolicyDecision.predicted_s`, engine-side,
without the client hop), whatever rule chose the steps: the engine copies it
into `RequestStats.predicted_s`, which gives the prediction-error metric and
the ratios that correct the next predictions.

Experts: an explicit `experts_top_k` / `expert_depth` wins; else the tier's
`experts` when a quality tier chose the steps; else the model's maximum. The
decision always reports the concrete value used (None only for dense FFNs).
Predictions price the maximum expert setting (an upper bound for fewer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.cost import CostModel
from runtime.predictor import LatencyPredictor, Prediction
from runtime.settings import EngineConfig
from runtime.slo import SLOController
from runtime.types import ComputeParams, InvalidRequestError, OverloadedError

BUDGET_UNMET_MODES = ("min", "reject")


@dataclass(frozen=True)
class Tier:
    """A named quality tier: a step count and an expert setting (None = max)."""

    steps: int
    experts: int | None = None


@dataclass
class ModelProfile:
    """The runtime's view of a model directory's profile.json.

    Attributes:
        tiers: tier name -> setting.
        cost_model: calibrated decode-time model, if the profile has one.
        perplexity: measured perplexity per (steps, experts) setting (`settings`).
    """

    tiers: dict[str, Tier]
    cost_model: CostModel | None = None
    perplexity: dict[tuple[int, int | None], float] = field(default_factory=dict)

    def step_ladder(self, config: ModelConfig, step_range: tuple[int, int]) -> list[int]:
        """The step counts in `step_range` worth running at the maximum expert setting.

        A count is dropped when a smaller one has a perplexity at least as good
        (ode-tiny: N=8..12 measure 48.20..48.71 against 48.16 at N=7), since it
        would spend more time for no quality; counts without a measurement are
        kept. Without measurements this is every count in the range.
        """
        lo, hi = step_range
        top = config.max_expert_setting
        ladder: list[int] = []
        best = math.inf
        for n in range(lo, hi + 1):
            ppl = self.perplexity.get((n, top))
            if ppl is None:
                ladder.append(n)
            elif ppl < best:
                best = ppl
                ladder.append(n)
        return ladder

    @staticmethod
    def default_tiers(config: ModelConfig) -> dict[str, Tier]:
        """Tiers used when profile.json is absent (see the module docstring)."""
        lo, hi = config.step_range

        def clamp(n: int) -> int:
            return min(max(n, lo), hi)

        return {
            "fast": Tier(clamp(max(lo, round(hi / 4)))),
            "balanced": Tier(clamp(round(hi / 2))),
            "best": Tier(hi),
        }

    @classmethod
    def from_dict(cls, config: ModelConfig, data: dict[str, Any] | None) -> ModelProfile:
        """Parse profile.json contents (None = absent -> default tiers).

        Raises:
            ValueError: a tier is malformed or outside the model's ranges.
        """
        if data is None:
            return cls(cls.default_tiers(config))
        tiers = dict(cls.default_tiers(config))
        lo, hi = config.step_range
        for name, raw in (data.get("quality_tiers") or {}).items():
            try:
                tier = Tier(int(raw["steps"]), None if raw.get("experts") is None else int(raw["experts"]))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(
                    f"profile.json quality_tiers.{name}={raw!r}: needs an int 'steps' ({e})"
                ) from e
            if not lo <= tier.steps <= hi:
                raise ValueError(
                    f"profile.json quality_tiers.{name}.steps={tier.steps}: must lie in [{lo}, {hi}]"
                )
            tiers[name] = tier
        cost = data.get("cost_model")
        perplexity: dict[tuple[int, int | None], float] = {}
        for row in data.get("settings") or []:
            try:
                experts = None if row.get("experts") is None else int(row["experts"])
                perplexity[(int(row["steps"]), experts)] = float(row["perplexity"])
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a setting without a perplexity says nothing about quality
        return cls(tiers, CostModel.from_dict(cost) if cost else None, perplexity)

    @classmethod
    def load(cls, config: ModelConfig, model_dir: str | Path) -> ModelProfile:
        """Read `profile.json` (and `cost.json` if the profile has no cost model)."""
        from models.checkpoint import PROFILE_FILE, read_json

        profile = cls.from_dict(config, read_json(model_dir, PROFILE_FILE))
        if profile.cost_model is None:
            cost = read_json(model_dir, "cost.json")
            if cost:
                profile.cost_model = CostModel.from_dict(cost)
        return profile


@dataclass(frozen=True)
class PolicyDecision:
    """Chosen compute for one request.

    Attributes:
        steps: Euler steps.
        experts: expert setting to report (the maximum when not lowered;
            None for a dense FFN).
        model_experts: the value for the model's `experts` tensor row; None
            means "the trained maximum" (lets an all-maximum batch pass None).
        reason: why the steps were chosen.
        predicted_s: predicted end-to-end seconds of the request at the
            chosen steps (None when the policy made no prediction).
        min_steps: the fewest steps admission may lower `steps` to when the
            KV pool is short (the memory dial, module docstring); 0 = fixed.
    """

    steps: int
    experts: int | None
    model_experts: int | None
    reason: str
    predicted_s: float | None = None
    min_steps: int = 0


def automatic_steps(
    config: ModelConfig,
    profile: ModelProfile | None = None,
    default_steps: int | None = None,
    slo_range: tuple[int, int] | None = None,
) -> list[int]:
    """The step counts `StepPolicy` picks for requests that name neither `steps`
    nor `latency_budget_ms`: the server default (every count in `slo_range`
    when an SLO controller adapts it) and each quality tier's. The compiled
    backend builds its fastest graphs for these (runtime/backends/torch_backend.py).
    """
    tiers = (profile or ModelProfile.from_dict(config, None)).tiers
    if slo_range is not None:
        chosen = set(range(slo_range[0], slo_range[1] + 1))
    else:
        chosen = {int(default_steps if default_steps is not None else config.default_steps)}
    return sorted(chosen | {t.steps for t in tiers.values()})


class StepPolicy:
    """Chooses (steps, experts, reason, prediction) per request; see the module docstring."""

    def __init__(
        self,
        config: ModelConfig,
        profile: ModelProfile | None = None,
        default_steps: int | None = None,
        slo: SLOController | None = None,
        *,
        budget_unmet: str = "min",
        max_batch_size: int = 32,
        max_prefills: int = 8,
        predictor: LatencyPredictor | None = None,
        kv_min_steps: int | None = None,
    ) -> None:
        """Create a policy.

        Args:
            config: the model's configuration.
            profile: tiers and cost model (default tiers, no cost model if None).
            default_steps: fixed server default (default `config.default_steps`);
                ignored when `slo` is given.
            slo: adaptive default.
            budget_unmet: "min" or "reject", what a latency budget that even the
                minimum step count cannot meet gets (`EngineConfig.latency_budget_unmet`).
            max_batch_size: the engine's row limit (for the predictor's queue).
            max_prefills: the engine's admissions per iteration (likewise).
            predictor: the end-to-end predictor (default: one over the profile's
                cost model; None when the profile has no cost model).
            kv_min_steps: the memory dial's floor (`EngineConfig.kv_min_steps`;
                None = off).
        """
        self.config = config
        self.profile = profile or ModelProfile.from_dict(config, None)
        lo, hi = config.step_range
        self.fixed_steps = int(default_steps if default_steps is not None else config.default_steps)
        if not lo <= self.fixed_steps <= hi:
            raise ValueError(f"default_steps={self.fixed_steps}: must lie in [{lo}, {hi}]")
        if budget_unmet not in BUDGET_UNMET_MODES:
            raise ValueError(
                f"latency_budget_unmet={budget_unmet!r}: must be one of {', '.join(BUDGET_UNMET_MODES)}"
            )
        self.budget_unmet = budget_unmet
        k = kv_min_steps
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not lo <= k <= hi):
            raise ValueError(f"kv_min_steps={kv_min_steps!r}: must be unset or a step count in [{lo}, {hi}]")
        self.kv_min_steps = kv_min_steps
        self.slo = slo
        cost = self.profile.cost_model
        if predictor is None and cost is not None:
            predictor = LatencyPredictor(
                config, cost, max_batch_size=max_batch_size, max_prefills=max_prefills
            )
        self.predictor = predictor

    @classmethod
    def from_settings(
        cls, config: ModelConfig, profile: ModelProfile | None, settings: EngineConfig
    ) -> StepPolicy:
        """The engine's policy: the default from `settings` (fixed, or an
        `SLOController` when `slo_target_itl_ms` is set), the budget mode, and
        the batch limits the predictor and controller plan with."""
        slo = None
        slo_range = settings.slo_range(config)
        if slo_range is not None:
            prof = profile or ModelProfile.from_dict(config, None)
            ttft = settings.slo_target_ttft_ms
            slo = SLOController(
                settings.slo_target_itl_ms / 1000.0,  # type: ignore[operator]  # set when slo_range is
                *slo_range,
                window=settings.slo_window,
                hysteresis=settings.slo_hysteresis,
                initial_steps=settings.default_steps,
                config=config,
                cost_model=prof.cost_model,
                ladder=prof.step_ladder(config, slo_range) if settings.slo_quality_ladder else None,
                target_ttft_s=None if ttft is None else ttft / 1000.0,
                max_batch_size=settings.max_batch_size,
                max_prefills=settings.max_prefills,
            )
        return cls(
            config,
            profile,
            settings.default_steps,
            slo,
            budget_unmet=settings.latency_budget_unmet,
            max_batch_size=settings.max_batch_size,
            max_prefills=settings.max_prefills,
            kv_min_steps=settings.kv_min_steps,
        )

    @property
    def tiers(self) -> dict[str, Tier]:
        return self.profile.tiers

    def snapshot(self) -> dict[str, Any]:
        """What `/stats` shows of the policy (`EngineStats.policy`): the predictor's terms and error."""
        out: dict[str, Any] = {
            "default_steps": self.default_steps,
            "calibrated": self.profile.cost_model is not None,
            "latency_budget_unmet": self.budget_unmet,
        }
        if self.predictor is not None:
            out["predictor"] = self.predictor.snapshot()
        return out

    def on_stats(self, stats: Any) -> None:
        """The engine's stats stream (every `IterationStats` and `RequestStats`), for online terms."""
        if self.predictor is not None:
            self.predictor.on_stats(stats)
        if self.slo is not None:
            self.slo.on_stats(stats)

    @property
    def default_steps(self) -> int:
        return self.slo.steps if self.slo is not None else self.fixed_steps

    def decide(
        self, compute: ComputeParams, prompt_tokens: int, max_tokens: int, batch: int = 1
    ) -> PolicyDecision:
        """Choose the compute of one (already validated) request.

        Args:
            compute: the request's compute parameters.
            prompt_tokens: prompt length.
            max_tokens: tokens to generate at most.
            batch: rows running now plus this request (the batch it joins).

        Returns:
            The decision.

        Raises:
            InvalidRequestError: `latency_budget_ms` cannot be met even on an idle
                server and the policy rejects unmet budgets.
            OverloadedError: it cannot be met at the current load (same mode).
        """
        tier_experts: int | None = None
        prediction: Prediction | None = None
        if compute.steps is not None:
            steps, reason = int(compute.steps), "explicit"
        elif compute.quality is not None:
            tier = self.tiers[compute.quality]
            steps, reason, tier_experts = tier.steps, f"quality:{compute.quality}", tier.experts
        elif compute.latency_budget_ms is not None:
            steps, reason, prediction = self._from_budget(
                float(compute.latency_budget_ms), prompt_tokens, max_tokens, batch
            )
        elif self.slo is not None:
            steps, reason = self.slo.assign(), "default:slo"
        else:
            steps, reason = self.fixed_steps, "default:fixed"
        if self.slo is not None:
            # Every request is load; only the default ones follow the controller's operating point.
            self.slo.record_arrival(prompt_tokens, max_tokens, None if reason == "default:slo" else steps)
        predicted_s = None
        if self.predictor is not None:
            if prediction is None:
                prediction = self.predictor.predict(steps, prompt_tokens, max_tokens, batch)
            self.predictor.commit(prediction, prompt_tokens)
            predicted_s = prediction.predicted_s

        floor = self.kv_min_steps
        server_chosen = compute.steps is None and compute.quality is None  # rules 3 and 4
        min_steps = floor if floor is not None and server_chosen and floor < steps else 0
        explicit = compute.experts_top_k if self.config.ffn == "moe" else compute.expert_depth
        chosen = explicit if explicit is not None else tier_experts
        top = self.config.max_expert_setting
        if top is None:
            return PolicyDecision(steps, None, None, reason, predicted_s, min_steps)
        used = top if chosen is None else int(chosen)
        return PolicyDecision(steps, used, None if used == top else used, reason, predicted_s, min_steps)

    def _from_budget(
        self, budget_ms: float, prompt_tokens: int, max_tokens: int, batch: int
    ) -> tuple[int, str, Prediction | None]:
        """The largest step count whose predicted bound fits the budget (module docstring, rule 3)."""
        if self.predictor is None:
            return self.default_steps, "latency_budget:uncalibrated", None
        budget_s = budget_ms / 1000.0
        lo, hi = self.config.step_range
        lowest = None
        for n in range(hi, lo - 1, -1):
            lowest = self.predictor.predict(n, prompt_tokens, max_tokens, batch)
            if lowest.bound_s <= budget_s:
                return n, "latency_budget", lowest
        assert lowest is not None
        if self.budget_unmet == "reject":
            idle = self.predictor.predict(lo, prompt_tokens, max_tokens, 1, idle=True)
            loaded = f"{1000 * lowest.bound_s:.0f} ms at the current load"
            if idle.bound_s > budget_s:
                raise InvalidRequestError(
                    "latency_budget_ms",
                    budget_ms,
                    f"must be at least {1000 * idle.bound_s:.0f} ms for {max_tokens} tokens on this server "
                    f"(the fastest setting, steps={lo}, is predicted to take that long idle; {loaded})",
                )
            raise OverloadedError(
                f"latency_budget_ms={budget_ms:g} cannot be met now: the fastest setting (steps={lo}) is "
                f"predicted to take {loaded} ({1000 * idle.bound_s:.0f} ms idle); retry later or allow more"
            )
        return lo, "latency_budget:min", lowest


__all__ = [
    "BUDGET_UNMET_MODES",
    "ModelProfile",
    "PolicyDecision",
    "SLOController",
    "StepPolicy",
    "Tier",
    "automatic_steps",
]
