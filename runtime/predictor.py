"""Load-aware, self-calibrating prediction of a request's end-to-end time (what `latency_budget_ms` promises).

The model. A request that arrives now with N steps, a P-token prompt and M
tokens to generate spends, from arrival to its last token,

    T = queue + first + (M - 1) * period

* `period`: one engine iteration at the batch it will run in, measured
  between consecutive iterations (so the engine loop, sampling,
  detokenisation, streaming and the other coroutines between forwards are in
  it, not only the forward). It is a small regression refreshed from the
  recent iterations,

      period = a * D(B, mix) + b * prefills * F + c + d * B      (a, b, c, d >= 0)

  where D is the calibrated cost model's decode time of the iteration's rows
  with their mix of step counts (runtime/batch_cost.py: rows share every
  matmul), F the model time of one prefill, B the rows. The prior is the
  cost model itself (a = b = 1, c = d = 0); a ridge of 5 % of the data's
  weight pulls toward it only where the recent iterations do not tell
  (e.g. step counts not run lately). Weights halve every 64 iterations, so a
  change of speed (a slower machine, another process) is learnt within about
  a hundred iterations.
* For the request, B is the rows running now plus those waiting plus itself
  (capped at the batch limit); the mix is the last iteration's plus its own N;
  other requests' prefills land in its iterations at the measured arrival rate
  (lambda * period per iteration, so period = base / (1 - b * lambda * F)).
* `first` is one iteration plus its own prefill; `queue` is half the current
  iteration (it waits for the one in flight), plus an iteration per
  `max_prefills` requests ahead of it, plus, when the batch is full, the time
  for enough running requests to finish.
* The fixed per-request remainder (arrival to the loop picking it up, the
  last delivery) and whatever else the model misses is corrected per request:
  every finished request gives measured / predicted, the prediction redone
  for the tokens it actually generated (a request that stops early says
  nothing about speed), and the ratios of the last 64 requests are kept per
  (step count, batch bucket), per batch bucket and overall. The reported
  prediction (`PolicyDecision.predicted_s`, `RequestStats.predicted_s`) is
  the model times the median ratio of the most specific key with >= 8
  samples.

Why the margin keeps the promise. The budget is checked against the model
times the *upper quantile* (`quantile`, 0.95) of the same recent ratios, plus
a fixed allowance for the hop from the client to the replica and back
(`transport_s`, 5 ms: the Ray proxy's measured gRPC hop; the engine cannot
see it). If the recent ratios describe the next requests, a request run at a
step count whose bound fits the budget finishes within it with probability
>= `quantile`, whatever the model's bias, because the bias is in the ratios.
The choice is the largest step count whose bound fits; with fewer than 8
ratios a default margin of 1.3 (what serving adds to the isolated cost-model
calibration at concurrency 1, issue 26) stands in. What it cannot cover: a
change of load faster than the windows (a burst arriving after the choice),
which is why the windows are short, and the client's own delays.

All times are seconds; `clock` is injectable so traces replay exactly
(tests/runtime/test_predictor.py).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.config import ModelConfig
from models.cost import CostModel
from runtime.batch_cost import BatchCost
from runtime.types import IterationStats, RequestStats

TRANSPORT_S = 0.005  # client -> Ray proxy -> replica and back (README, `leanserve bench serve`)
QUANTILE = 0.95  # of the recent measured / predicted ratios, for the budget check
DEFAULT_MARGIN = 1.3  # bound / model before enough ratios are measured
MIN_RATIOS = 8  # ratios a key needs before its quantiles are used
RATIO_WINDOW = 64  # ratios kept per key
ITER_WINDOW = 256  # iterations kept for the period regression
HALF_LIFE_ITERS = 64.0  # recency weight of an iteration halves over this many
RIDGE = 0.05  # prior weight, as a fraction of the data's
REFIT_EVERY = 8  # new iterations before the period model is refitted (lazily, when next read)
RATE_WINDOW_S = 10.0  # arrival-rate window
FEATURES = ("model", "prefill", "constant", "rows")
PRIOR = (1.0, 1.0, 0.0, 0.0)
_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # batch buckets: upper bounds
_PENDING_MAX = 4096  # predictions awaiting their request's stats
_MEMO_MAX = 1024  # batch shapes whose model time is remembered


def batch_bucket(rows: float) -> int:
    """The bucket (its upper bound) of an expected batch size: 1, 2, 4, 8, ..."""
    for b in _BUCKETS:
        if rows <= b:
            return b
    return _BUCKETS[-1] * 2


@dataclass(frozen=True)
class Prediction:
    """One request's predicted end-to-end time at one step count.

    Attributes:
        steps: the step count.
        tokens: tokens predicted for (max_tokens).
        batch: expected rows of the iterations it runs in.
        queue_s: arrival to admission.
        first_s: the admitting iteration (its own prefill included).
        period_s: each later iteration.
        model_s: queue + first + (tokens - 1) x period (the model, uncorrected).
        predicted_s: model_s x the median measured / predicted ratio (engine-side).
        bound_s: model_s x the `quantile` ratio + transport: what the budget is checked against.
        source: the ratio key used ("steps=N,batch<=B", "batch<=B", "all" or "default").
    """

    steps: int
    tokens: int
    batch: float
    queue_s: float
    first_s: float
    period_s: float
    model_s: float
    predicted_s: float
    bound_s: float
    source: str

    def model_for(self, tokens: int) -> float:
        """The uncorrected model time had the request generated `tokens` tokens."""
        return self.queue_s + self.first_s + max(tokens - 1, 0) * self.period_s


class _Ratios:
    """Recent measured / predicted ratios under one key."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: deque[float] = deque(maxlen=RATIO_WINDOW)

    def quantiles(self, q: float) -> tuple[float, float]:
        v = sorted(self.values)
        return v[len(v) // 2], v[min(len(v) - 1, math.ceil(q * len(v)) - 1)]


class LatencyPredictor:
    """End-to-end time predictions from the cost model plus online terms (module docstring).

    Feed it `on_stats` (every `IterationStats` and `RequestStats` of the engine) and
    `commit` (each prediction a request was admitted with); ask it `predict`.

    Args:
        config: the model's configuration.
        cost_model: the calibrated cost model (profile.json).
        max_batch_size: the engine's row limit.
        max_prefills: the engine's admissions per iteration.
        clock: monotonic seconds (traces pass their own).
        transport_s: allowance for the client <-> replica hop, added to the bound.
        quantile: of the recent ratios, for the bound.
    """

    def __init__(
        self,
        config: ModelConfig,
        cost_model: CostModel,
        *,
        max_batch_size: int = 32,
        max_prefills: int = 8,
        clock: Callable[[], float] = time.monotonic,
        transport_s: float = TRANSPORT_S,
        quantile: float = QUANTILE,
    ) -> None:
        if not 0.5 <= quantile < 1:
            raise ValueError(f"quantile={quantile}: must lie in [0.5, 1)")
        if transport_s < 0:
            raise ValueError(f"transport_s={transport_s}: must be >= 0")
        self.config = config
        self.batch = BatchCost(cost_model, config, max_batch_size)
        self.max_batch = int(max_batch_size)
        self.max_prefills = max(1, int(max_prefills))
        self.clock = clock
        self.transport_s = transport_s
        self.quantile = quantile
        self._theta = np.array(PRIOR, dtype=np.float64)
        self._samples: deque[tuple[float, float, float, float, float]] = deque(maxlen=ITER_WINDOW)
        self._since_fit = 0
        self._model_memo: dict[tuple[int, tuple[tuple[int, int], ...], int], float] = {}
        self._last_iter_t: float | None = None
        self._last_busy = False
        self.last_period_s: float | None = None
        self.waiting = 0
        self.running = 0
        self._pending_arrivals = 0
        self._mix: dict[int, float] = {}
        self._arrivals: deque[float] = deque()
        self._first_arrival: float | None = None
        self.prompt_tokens = 16.0
        self.gen_tokens = 16.0
        self._ratios: dict[str, _Ratios] = {}
        self._pending: dict[tuple[float, int, int], Prediction] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=256)
        self.errors: deque[float] = deque(maxlen=256)  # measured / predicted_s of finished requests

    # --- inputs --------------------------------------------------------------
    def on_stats(self, stats: Any) -> None:
        """The engine's stats stream: iterations feed the period model, requests the ratios."""
        if isinstance(stats, IterationStats):
            self._on_iteration(stats)
        elif isinstance(stats, RequestStats):
            self._on_request(stats)

    def _context(self) -> float:
        return min(self.prompt_tokens + self.gen_tokens / 2, self.config.context_length - 1)

    def _features(self, s: IterationStats) -> tuple[float, float, float, float]:
        rows = float(sum(s.steps_histogram.values())) or 1.0
        shares = {n: c / rows for n, c in s.steps_histogram.items()}
        mean_steps = sum(n * w for n, w in shares.items())
        model = 0.0
        if s.num_decode:
            # Steady decoding repeats the same batch shape every iteration: price it once
            # (~30 us of cost-table lookups at N=12), per whole token of context.
            context = self._context()
            key = (s.num_decode, tuple(sorted(s.steps_histogram.items())), int(context))
            cached = self._model_memo.get(key)
            if cached is None:
                if len(self._model_memo) >= _MEMO_MAX:
                    self._model_memo.clear()
                cached = self._model_memo[key] = self.batch.model_seconds(
                    float(s.num_decode), shares, context
                )
            model = cached
        prefill = (
            s.num_prefill * self.batch.prefill_seconds(mean_steps, self.prompt_tokens)
            if s.num_prefill
            else 0.0
        )
        return model, prefill, 1.0, float(s.batch_size)

    def _on_iteration(self, s: IterationStats) -> None:
        now = self.clock()
        if s.batch_size > 0 and s.steps_histogram:
            if self._last_busy and self._last_iter_t is not None:
                # The loop went straight on from the last iteration: this is one period as a
                # running request sees it (an iteration after an idle wait is not).
                period = now - self._last_iter_t
                self._samples.append((*self._features(s), period))
                self._since_fit += 1
                self.last_period_s = period
            rows = float(sum(s.steps_histogram.values()))
            self._mix = {n: c / rows for n, c in s.steps_histogram.items()}
        self._last_iter_t = now
        self._last_busy = s.num_running > 0 or s.num_waiting > 0
        self.waiting, self.running = s.num_waiting, s.num_running
        self._pending_arrivals = 0

    @property
    def theta(self) -> np.ndarray:
        """The period model's coefficients (FEATURES), refitted when read after REFIT_EVERY new
        iterations: the fit (~0.4 ms) runs when a prediction or a snapshot needs it, at most once
        per admitted request, not on the engine loop every few decode iterations."""
        if self._since_fit >= REFIT_EVERY:
            self._fit()
        return self._theta

    def _fit(self) -> None:
        """Weighted, ridge-to-prior, non-negative least squares of the period on the features."""
        self._since_fit = 0
        data = np.array(self._samples, dtype=np.float64)
        x, y = data[:, :4], data[:, 4]
        age = np.arange(len(y) - 1, -1, -1, dtype=np.float64)
        w = 0.5 ** (age / HALF_LIFE_ITERS)
        prior = np.array(PRIOR)
        # The ridge is a fraction of the data's own weight per feature, so it is unit-free.
        lam = RIDGE * (w[:, None] * x * x).sum(axis=0) + 1e-18
        active = [True] * 4
        theta = prior.copy()
        for _ in range(4):
            idx = [j for j in range(4) if active[j]]
            xa = x[:, idx]
            a = (xa * w[:, None]).T @ xa + np.diag(lam[idx])
            rhs = (xa * w[:, None]).T @ y + lam[idx] * prior[idx]  # dropped features stay at 0
            sol = np.linalg.solve(a, rhs)
            theta = np.zeros(4)
            theta[idx] = sol
            negative = [j for j in idx if theta[j] < 0]
            if not negative:
                break
            active[min(negative, key=lambda j: theta[j])] = False
        self._theta = np.maximum(theta, 0.0)

    def record_arrival(self, prompt_tokens: int) -> None:
        """Count one admitted request (arrival rate, queue ahead of the next one, lengths)."""
        now = self.clock()
        self._arrivals.append(now)
        if self._first_arrival is None:
            self._first_arrival = now
        while self._arrivals and self._arrivals[0] < now - RATE_WINDOW_S:
            self._arrivals.popleft()
        self._pending_arrivals += 1
        self.prompt_tokens += 0.05 * (prompt_tokens - self.prompt_tokens)

    def commit(self, prediction: Prediction, prompt_tokens: int) -> None:
        """The request was given `prediction`: count it and wait for its stats to measure the error."""
        self.record_arrival(prompt_tokens)
        key = (round(prediction.predicted_s, 9), prediction.steps, int(prompt_tokens))
        self._pending[key] = prediction
        while len(self._pending) > _PENDING_MAX:
            self._pending.pop(next(iter(self._pending)))

    def _on_request(self, s: RequestStats) -> None:
        if s.generated_tokens > 0:
            self.gen_tokens += 0.05 * (s.generated_tokens - self.gen_tokens)
        if s.predicted_s is None:
            return
        pred = self._pending.pop((round(s.predicted_s, 9), s.steps, s.prompt_tokens), None)
        if s.finish_reason not in ("stop", "length") or s.generated_tokens < 1:
            return  # failed or cancelled: says nothing about speed
        if s.predicted_s > 0:
            self.errors.append(s.total_s / s.predicted_s)
        self.recent.append(
            {
                "request_id": s.request_id,
                "steps": s.steps,
                "predicted_s": round(s.predicted_s, 6),
                "total_s": round(s.total_s, 6),
                "generated_tokens": s.generated_tokens,
            }
        )
        if pred is None:
            return
        model = pred.model_for(s.generated_tokens)
        if model <= 0:
            return
        ratio = s.total_s / model
        for key in self._keys(pred.steps, pred.batch):
            self._ratios.setdefault(key, _Ratios()).values.append(ratio)

    # --- predictions -------------------------------------------------------------
    @property
    def arrival_rate(self) -> float:
        """Admitted requests per second over the last `RATE_WINDOW_S`."""
        if self._first_arrival is None:
            return 0.0
        now = self.clock()
        n = sum(1 for t in self._arrivals if t >= now - RATE_WINDOW_S)
        span = min(RATE_WINDOW_S, max(now - self._first_arrival, 1.0))
        return n / span

    @staticmethod
    def _keys(steps: int, batch: float) -> tuple[str, str, str]:
        b = batch_bucket(batch)
        return f"steps={steps},batch<={b}", f"batch<={b}", "all"

    def _correction(self, steps: int, batch: float) -> tuple[float, float, str]:
        """(median ratio, quantile ratio, key) of the most specific key with enough ratios."""
        for key in self._keys(steps, batch):
            r = self._ratios.get(key)
            if r is not None and len(r.values) >= MIN_RATIOS:
                median, upper = r.quantiles(self.quantile)
                return median, max(upper, median), key
        return 1.0, DEFAULT_MARGIN, "default"

    def predict(
        self, steps: int, prompt_tokens: int, max_tokens: int, batch: int = 1, idle: bool = False
    ) -> Prediction:
        """Predicted end-to-end time of a request arriving now.

        Args:
            steps: its step count.
            prompt_tokens: its prompt length.
            max_tokens: tokens it may generate (predicted as all of them).
            batch: the engine's rows running now plus this request (`Engine.submit` passes it).
            idle: predict for an idle server instead (nothing running, waiting or arriving).
        """
        a, b_pf, c, d = (float(v) for v in self.theta)
        running = 0 if idle else max(int(batch) - 1, 0)
        ahead = 0 if idle else self.waiting + self._pending_arrivals
        rows = float(min(self.max_batch, running + ahead + 1))
        others = rows - 1.0
        shares: dict[int, float] = {}
        mix = self._mix if self._mix else {steps: 1.0}
        for n, w in mix.items():
            shares[n] = shares.get(n, 0.0) + w * others / rows
        shares[steps] = shares.get(steps, 0.0) + 1.0 / rows
        model = self.batch.model_seconds(rows, shares, self._context())
        mean_steps = sum(n * w for n, w in shares.items())
        prefill_mean = self.batch.prefill_seconds(mean_steps, self.prompt_tokens)
        rate_others = 0.0 if idle else self.arrival_rate * others / rows
        base = a * model + c + d * rows
        period = base / max(1.0 - b_pf * rate_others * prefill_mean, 0.25)
        own_prefill = b_pf * self.batch.prefill_seconds(steps, prompt_tokens)
        first = period + own_prefill
        queue = 0.0
        if not idle:
            busy = running > 0 or ahead > 0
            current = self.last_period_s if self.last_period_s is not None else period
            queue = (0.5 * current if busy else 0.0) + (ahead // self.max_prefills) * period
            excess = running + ahead + 1 - self.max_batch
            if excess > 0:  # wait for that many running requests to finish
                queue += excess * max(self.gen_tokens, 1.0) / max(running, 1) * period
        tokens = max(int(max_tokens), 1)
        total = queue + first + (tokens - 1) * period
        median, upper, source = self._correction(steps, rows)
        return Prediction(
            steps=int(steps),
            tokens=tokens,
            batch=rows,
            queue_s=queue,
            first_s=first,
            period_s=period,
            model_s=total,
            predicted_s=total * median,
            bound_s=total * upper + self.transport_s,
            source=source,
        )

    # --- reporting ---------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The predictor's terms and its measured error, as plain data (`/stats` under `policy`)."""
        errors = sorted(self.errors)
        ratios = {}
        for key, r in sorted(self._ratios.items()):
            if len(r.values) >= MIN_RATIOS:
                median, upper = r.quantiles(self.quantile)
                ratios[key] = {"n": len(r.values), "median": round(median, 4), "upper": round(upper, 4)}
        return {
            "period_model": {name: float(f"{v:.6g}") for name, v in zip(FEATURES, self.theta, strict=True)},
            "iterations_fitted": len(self._samples),
            "last_period_s": None if self.last_period_s is None else round(self.last_period_s, 6),
            "arrival_rate_rps": round(self.arrival_rate, 3),
            "waiting": self.waiting,
            "running": self.running,
            "mean_prompt_tokens": round(self.prompt_tokens, 2),
            "mean_generated_tokens": round(self.gen_tokens, 2),
            "quantile": self.quantile,
            "transport_s": self.transport_s,
            "ratios": ratios,
            "error_n": len(errors),
            "error_median": round(statistics.median(errors), 4) if errors else None,
            "error_p90": round(errors[min(len(errors) - 1, math.ceil(0.9 * len(errors)) - 1)], 4)
            if errors
            else None,
            "recent": list(self.recent),
        }
