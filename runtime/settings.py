"""Settings, each resolved once: the engine's (`EngineConfig`) and the compiled path's (`CompileSpec`).

Every front end (the `leanserve` subcommands, the Ray Serve application's
YAML, the benchmarks) turns its own input into these two objects at its edge
and passes them on; nothing downstream re-parses or re-defaults them.

    EngineConfig  one replica's engine: KV budget, batching, the SLO controller
    CompileSpec   the torch backend's AOT-compiled decode: on or off, which
                  step counts get a whole-decode graph, the artifact cache

The model's own ranges (step range, the expert setting's name and range) are
defined once in `models.config.ModelConfig` (`step_range`, `expert_setting`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from runtime.types import MAX_DRAFT_TOKENS


@dataclass
class EngineConfig:
    """Engine settings (one per replica).

    Attributes:
        kv_cache_bytes: byte budget of the paged KV pool.
        page_size: tokens per KV page.
        max_batch_size: most requests running (holding KV) at once.
        max_waiting: waiting-queue bound; beyond it `submit` raises
            `OverloadedError`.
        max_prefills: most requests admitted (prefilled) per iteration.
        default_steps: fixed default step count (None = the model's default).
        slo_target_itl_ms: when set, the default step count is chosen by an
            `SLOController` (runtime/policy.py) for this inter-token latency target.
        slo_target_ttft_ms: the controller's time-to-first-token target (None = not checked).
        slo_window: measured ITL samples the controller reports.
        slo_hysteresis: the controller's capacity headroom (plans for (1 + h) x demand).
        slo_min_steps: lower bound for the controller (None = model minimum).
        slo_max_steps: upper bound for the controller (None = model maximum).
        slo_quality_ladder: the controller skips step counts that profile.json
            measures no better than a smaller count (`ModelProfile.step_ladder`).
        inline_decode_ms: a decode iteration whose forward is expected to
            take less than this (the previous decode iteration's time) runs
            on the event-loop thread instead of the worker thread: the
            thread hand-off and its cache misses cost ~0.1-0.2 ms per
            iteration on CPU, 10-20 % of a small model's token. Loop work
            that arrives meanwhile (new requests, I/O) waits for at most
            about two such forwards. Prefills and longer decodes always run
            in the worker. 0 = never inline. The 5 ms default is Python's
            GIL switch interval, which already bounds how long a forward in
            the worker can keep the loop waiting.
        max_waiting_per_client: waiting-queue bound per client (None =
            `max_waiting`); see runtime/scheduler.py for fair admission.
        fair_quantum: tokens a client earns per turn of the scheduler's
            deficit round robin.
        max_consecutive_failures: an iteration that raises fails only its
            own requests; this many failing in a row mark the engine dead
            (health checks then fail and Ray replaces the replica).
        tokenize_inline_chars: `submit_async` tokenises text prompts longer
            than this in a thread, so a large prompt never holds up the event
            loop (and with it every other stream of the replica).
        latency_budget_unmet: what a request gets whose `latency_budget_ms`
            (or gRPC deadline) the predictor says even the minimum step count
            cannot meet: "min" runs it at the minimum (policy_reason
            "latency_budget:min"); "reject" refuses it before any work, naming
            `latency_budget_ms` (INVALID_ARGUMENT / HTTP 400 if even an idle
            server would miss it, else RESOURCE_EXHAUSTED / HTTP 429); see
            runtime/policy.py.
        draft_steps: the server's default for requests that leave
            `ComputeParams.draft_steps` unset (self-speculative decoding,
            runtime/speculation.py): None or 0 = off; an integer = draft with
            that many steps wherever it is below the request's steps; "auto" =
            speculate where it pays, per request and batch
            (`runtime.speculation.AutoSpeculation`).
        draft_tokens: tokens drafted per round when the request leaves
            `draft_tokens` unset (the most "auto" drafts), in [1, `MAX_DRAFT_TOKENS`].
        kv_allocation: "on_demand" (KV pages as a request grows, preemption
            by recompute when the pool runs dry) or "reserve" (its whole
            `prompt + max_tokens` at admission, never preempted);
            runtime/scheduler.py. The default: at the same 32 MiB pool
            (`taskset -c 1 python -m runtime.bench_kv`: 64 requests,
            max_tokens=256, stopping after 16-256 tokens, 12 steps) on
            demand ran 6.4x the peak (2.2x the mean) concurrency and
            1.15-2.3x the tokens/s of "reserve" (shared CPU, run to run),
            with every token identical.
        kv_watermark: fraction of the KV pool on-demand admission leaves free
            for running requests to grow into.
        max_preemptions: times one request may be preempted (on demand);
            chosen once more, it fails with an error naming the cause.
        kv_min_steps: steps as a memory dial: a request whose step count the
            server chose (no explicit `steps` or `quality`, not speculating)
            that does not fit the KV pool at its steps when its turn comes is
            admitted at the most steps >= this that fit, instead of waiting
            (its reason then ends in "+kv"); None = off (it waits).
            runtime/scheduler.py.
    """

    kv_cache_bytes: int = 64 * 2**20
    page_size: int = 16
    max_batch_size: int = 32
    max_waiting: int = 256
    max_prefills: int = 8
    default_steps: int | None = None
    slo_target_itl_ms: float | None = None
    slo_target_ttft_ms: float | None = None
    slo_window: int = 64
    slo_hysteresis: float = 0.1
    slo_min_steps: int | None = None
    slo_max_steps: int | None = None
    slo_quality_ladder: bool = True
    inline_decode_ms: float = 5.0
    max_waiting_per_client: int | None = None
    fair_quantum: int = 256
    max_consecutive_failures: int = 3
    tokenize_inline_chars: int = 2048
    latency_budget_unmet: str = "min"
    draft_steps: int | str | None = None
    draft_tokens: int = 4
    kv_allocation: str = "on_demand"
    kv_watermark: float = 0.05
    max_preemptions: int = 8
    kv_min_steps: int | None = None

    def __post_init__(self) -> None:
        """Checks of the settings no other component owns (the scheduler, pool
        and policy check theirs when the engine builds them)."""
        n = self.max_consecutive_failures
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"max_consecutive_failures={n!r}: must be an integer >= 1")
        ms = self.inline_decode_ms
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < math.inf:
            raise ValueError(f"inline_decode_ms={ms!r}: must be a number >= 0 (0 = never inline)")
        d = self.draft_steps
        if isinstance(d, str) and d.strip().isdigit():
            self.draft_steps = d = int(d)  # from a flag or an environment variable
        if d is not None and d != "auto" and (not isinstance(d, int) or isinstance(d, bool) or d < 0):
            raise ValueError(f"draft_steps={d!r}: must be 'auto', an integer >= 0 (0 = off) or unset")
        k = self.draft_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_TOKENS:
            raise ValueError(f"draft_tokens={k!r}: must be an integer in [1, {MAX_DRAFT_TOKENS}]")

    def slo_range(self, model: ModelConfig) -> tuple[int, int] | None:
        """The SLO controller's step bounds for `model` (None: no controller)."""
        if self.slo_target_itl_ms is None:
            return None
        lo, hi = model.step_range
        return (
            self.slo_min_steps if self.slo_min_steps is not None else lo,
            self.slo_max_steps if self.slo_max_steps is not None else hi,
        )


@dataclass(frozen=True)
class CompileSpec:
    """The torch backend's compiled decode (runtime/backends/aot_decode.py), one typed value.

    Attributes:
        steps: step counts that get a whole-decode graph (the fastest path;
            other step counts run compiled block by block): a tuple of step
            counts, "all" (the model's whole step range) or "auto" (the step
            counts the engine's step policy picks by itself,
            `runtime.policy.automatic_steps`).
        cache_dir: where compiled artifacts are kept (None =
            `$LEANSERVE_CACHE` or ~/.cache/leanserve).
    """

    steps: tuple[int, ...] | str = "auto"
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        s = self.steps
        if isinstance(s, str):
            if s not in ("all", "auto"):
                raise ValueError(f"compile_steps={s!r}: must be 'all', 'auto' or a list of step counts")
        elif not all(isinstance(n, int) and not isinstance(n, bool) for n in s):
            raise ValueError(f"compile_steps={list(s)!r}: must be 'all', 'auto' or a list of step counts")

    @classmethod
    def parse(cls, steps: Any = None, cache_dir: str | Path | None = None) -> CompileSpec:
        """From a flag ("2,3,12", "all", "auto") or a YAML value (a list, "all", "auto", None = auto).

        Raises:
            ValueError: naming `compile_steps` and the accepted forms.
        """
        if steps is None:
            steps = "auto"
        elif isinstance(steps, str) and steps.strip() not in ("all", "auto"):
            try:
                steps = tuple(int(part) for part in steps.split(","))
            except ValueError:
                raise ValueError(
                    f"compile_steps={steps!r}: must be 'all', 'auto' or comma-separated step counts "
                    "such as 2,3,12"
                ) from None
        elif isinstance(steps, str):
            steps = steps.strip()
        elif isinstance(steps, Iterable):
            steps = tuple(steps)
        else:
            raise ValueError(f"compile_steps={steps!r}: must be 'all', 'auto' or a list of step counts")
        return cls(steps, None if cache_dir is None else Path(cache_dir))

    def graph_steps(self, config: ModelConfig, automatic: Iterable[int] | None = None) -> tuple[int, ...]:
        """The concrete, validated step counts for `config`.

        Args:
            config: the model (its step range).
            automatic: what "auto" means for this engine (its policy's step
                counts); None = `runtime.policy.automatic_steps(config)`.

        Raises:
            ValueError: a step count outside the model's range (named).
        """
        lo, hi = config.step_range
        if self.steps == "all":
            return tuple(range(lo, hi + 1))
        if self.steps == "auto":
            if automatic is None:
                from runtime.policy import automatic_steps  # the policy imports this module

                automatic = automatic_steps(config)
            return tuple(sorted(set(automatic)))
        bad = [n for n in self.steps if not lo <= n <= hi]
        if bad:
            raise ValueError(f"compile_steps={bad}: each must be an integer in [{lo}, {hi}] for this model")
        return tuple(sorted(set(self.steps)))
