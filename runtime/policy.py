"""Step policy: which step count and expert setting a request runs, and why.

Precedence (the first rule that applies decides the step count; `reason` in
the response says which):

1. `compute.steps` given -> that count, reason "explicit".
2. `compute.quality` given -> the tier's setting from the model's
   profile.json (`quality_tiers`), reason "quality:<tier>". Without a
   profile the tiers default to fast = max(min, round(max / 4)),
   balanced = round(max / 2) (clamped to the range), best = max.
3. `compute.latency_budget_ms` given -> the largest step count whose
   predicted whole-request time (prefill + max_tokens decode iterations, at
   the current batch size) fits the budget under the calibrated cost model
   (`CostModel.max_steps_within`), reason "latency_budget". If even the
   minimum does not fit, the request still runs, at the minimum, with reason
   "latency_budget:min": a best effort that the caller can see, rather than a
   refusal (the deadline itself is enforced separately). Without a cost model
   the budget cannot be mapped and the default applies, with reason
   "latency_budget:uncalibrated".
4. Otherwise the server default: a fixed count ("default:fixed") or the
   current value of an `SLOController` ("default:slo").

Experts: an explicit `experts_top_k` / `expert_depth` wins; else the tier's
`experts` when a quality tier chose the steps; else the model's maximum. The
decision always reports the concrete value used (None only for dense FFNs).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.cost import CostModel
from runtime.types import ComputeParams


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
    """

    tiers: dict[str, Tier]
    cost_model: CostModel | None = None

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
        return cls(tiers, CostModel.from_dict(cost) if cost else None)

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


class SLOController:
    """Adapts the default step count to an inter-token-latency target.

    Inter-token latencies (ITLs) are collected in tumbling windows of
    `window` samples, each tagged with whether requests were waiting for
    admission when it was taken. At the end of each window, with
    `m = max(p50, mean)` and `queued` = requests waited during most of it:

    * lower by one step (not below `min_steps`) when `m > target * (1 + h)`
      or `queued`: a queue that does not drain means the server is over
      capacity even if the admitted requests' ITL still looks fine (measured:
      at 1.5x capacity ITL stayed ~16 ms while time to first token grew to
      seconds), and fewer steps is exactly what raises capacity;
    * raise by one step (not above `max_steps`) when nobody is queued and
      `m < target * (1 - h) * N / (N + 1)`: decode time is roughly
      proportional to N, so this says the *next* count is predicted to still
      sit below the target's lower band, which is what prevents raising into
      an immediate overload (oscillation);
    * otherwise keep N.

    The step count therefore changes at most once per window, stays within
    bounds, and holds still under steady load inside the band.
    """

    def __init__(
        self,
        target_itl_s: float,
        min_steps: int,
        max_steps: int,
        window: int = 64,
        hysteresis: float = 0.1,
        initial_steps: int | None = None,
    ) -> None:
        """Create a controller.

        Args:
            target_itl_s: target inter-token latency in seconds (> 0).
            min_steps: lower bound.
            max_steps: upper bound.
            window: ITL samples per decision (>= 1).
            hysteresis: relative dead band h in [0, 1).
            initial_steps: starting count (default `max_steps`).
        """
        if not target_itl_s > 0:
            raise ValueError(f"target_itl_s={target_itl_s}: must be > 0")
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"min_steps={min_steps}, max_steps={max_steps}: need 1 <= min <= max")
        if window < 1:
            raise ValueError(f"window={window}: must be >= 1")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis={hysteresis}: must lie in [0, 1)")
        self.target = target_itl_s
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.window = window
        self.hysteresis = hysteresis
        self.steps = max_steps if initial_steps is None else min(max(initial_steps, min_steps), max_steps)
        self._samples: deque[float] = deque()
        self._queued = 0  # samples of this window taken while requests waited
        self.changes = 0

    def observe(self, itl_s: float, waiting: int = 0) -> int:
        """Record one inter-token latency (and how many requests wait); return the step count."""
        self._samples.append(itl_s)
        self._queued += waiting > 0
        if len(self._samples) >= self.window:
            self._decide()
        return self.steps

    def _decide(self) -> None:
        m = max(statistics.median(self._samples), statistics.fmean(self._samples))
        queued = self._queued * 2 > len(self._samples)
        self._samples.clear()
        self._queued = 0
        n, h = self.steps, self.hysteresis
        if (m > self.target * (1 + h) or queued) and n > self.min_steps:
            self.steps, self.changes = n - 1, self.changes + 1
        elif not queued and m < self.target * (1 - h) * n / (n + 1) and n < self.max_steps:
            self.steps, self.changes = n + 1, self.changes + 1


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
    """

    steps: int
    experts: int | None
    model_experts: int | None
    reason: str


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
    """Chooses (steps, experts, reason) per request; see the module docstring."""

    def __init__(
        self,
        config: ModelConfig,
        profile: ModelProfile | None = None,
        default_steps: int | None = None,
        slo: SLOController | None = None,
    ) -> None:
        """Create a policy.

        Args:
            config: the model's configuration.
            profile: tiers and cost model (default tiers, no cost model if None).
            default_steps: fixed server default (default `config.default_steps`);
                ignored when `slo` is given.
            slo: adaptive default.
        """
        self.config = config
        self.profile = profile or ModelProfile.from_dict(config, None)
        lo, hi = config.step_range
        self.fixed_steps = int(default_steps if default_steps is not None else config.default_steps)
        if not lo <= self.fixed_steps <= hi:
            raise ValueError(f"default_steps={self.fixed_steps}: must lie in [{lo}, {hi}]")
        self.slo = slo

    @property
    def tiers(self) -> dict[str, Tier]:
        return self.profile.tiers

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
            batch: expected decode batch size (for the cost model).

        Returns:
            The decision.
        """
        tier_experts: int | None = None
        if compute.steps is not None:
            steps, reason = int(compute.steps), "explicit"
        elif compute.quality is not None:
            tier = self.tiers[compute.quality]
            steps, reason, tier_experts = tier.steps, f"quality:{compute.quality}", tier.experts
        elif compute.latency_budget_ms is not None:
            steps, reason = self._from_budget(compute, prompt_tokens, max_tokens, batch)
        elif self.slo is not None:
            steps, reason = self.slo.steps, "default:slo"
        else:
            steps, reason = self.fixed_steps, "default:fixed"

        explicit = compute.experts_top_k if self.config.ffn == "moe" else compute.expert_depth
        chosen = explicit if explicit is not None else tier_experts
        top = self.config.max_expert_setting
        if top is None:
            return PolicyDecision(steps, None, None, reason)
        used = top if chosen is None else int(chosen)
        return PolicyDecision(steps, used, None if used == top else used, reason)

    def _from_budget(
        self, compute: ComputeParams, prompt_tokens: int, max_tokens: int, batch: int
    ) -> tuple[int, str]:
        cost = self.profile.cost_model
        if cost is None:
            return self.default_steps, "latency_budget:uncalibrated"
        explicit = compute.experts_top_k if self.config.ffn == "moe" else compute.expert_depth
        fit = cost.max_steps_within(
            self.config,
            budget_s=float(compute.latency_budget_ms) / 1000.0,
            batch=max(batch, 1),
            context=0,
            new_tokens=max_tokens,
            prompt_tokens=prompt_tokens,
            experts=explicit,
        )
        if fit is None:
            return self.config.step_range[0], "latency_budget:min"
        return fit, "latency_budget"
