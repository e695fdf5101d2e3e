"""The SLO controller: the server's default step count from a prediction, not from stepping.

`StepPolicy` (runtime/policy.py) asks it for the step count of every request
that names no compute of its own when the server runs with
`--slo-target-itl-ms`; explicit steps, quality tiers and latency budgets keep
their own paths and count as load.

`SLOController` chooses the default step count from a prediction, not by
stepping on measured latency. Every `tick_s` (0.25 s) it computes, for a
candidate operating point, the steady state the engine would reach:

* feed-forward: the committed arrival rate (requests/s, all requests: explicit
  and tier requests are load at their own step counts), the mean prompt and
  generated lengths, and the calibrated cost model give the time of one decode
  iteration for a batch of B rows whose step counts are mixed as the operating
  point mixes them (rows share every step, so step k costs what the rows still
  running it cost), plus the prefills that arrive meanwhile. Little's law,
  B = rate x tokens x period(B), gives the batch and the inter-token latency;
  the operating point is feasible when B fits `max_batch_size` and the
  latency at B + sqrt(B) (Poisson fluctuation) meets the ITL target, and the
  TTFT target if set, for (1 + hysteresis) x the demand;
* feedback: measured error corrects the model, not the step count. The scale
  is measured model time / predicted model time of the same iterations (the
  prediction is made for each iteration's actual batch composition, old rows
  at old step counts included); the loop's overhead is the measured time
  between busy iterations beyond their model time, fitted as a + b x rows;
* the demand is the committed rate plus the queue beyond one iteration's
  admissions, planned away over `drain_s`;
* the answer is the highest point on the quality ladder (profile.json's step
  counts that some smaller count does not beat; for ode-tiny 2..7, since
  N=8..12 measure no better perplexity than N=7) that is feasible, as a
  fractional point between two rungs: new default requests get the two
  adjacent counts in that proportion (error diffusion, exact over any window).

Why it does not oscillate. The textbook oscillation of a step-per-window
controller comes from the delay: requests admitted at the old count keep
decoding for a whole request lifetime, so the measured latency and queue
answer a change only a lifetime later, and a controller that keeps stepping
on them overshoots, then overshoots back. Here (1) the decision's main input,
the arrival rate, is exogenous: no step count changes it, so the
feed-forward path has no loop at all; (2) the model corrections are measured
against predictions for the batches that were actually running, so a change
of the operating point does not show up as model error, and they are smoothed
(time constant 5 s, 1.5 s when the server is slower than predicted) and
bounded; (3) the only loop through the delay is the queue term, an integrator
with gain 1 / drain_s, and drain_s >= 3 x the request lifetime D: a delayed
integrator x' = -x(t - D) / T does not overshoot while D / T < 1/e; (4) the
rate is committed only on statistically significant changes (a step seen in
both halves of the last second, a drift of 2.5 Poisson sigmas over the window,
or one sigma on the same side for 4 s), cuts smaller than 0.2 rungs and raises
smaller than 0.3 rungs are ignored, a raise waits for an empty queue and a
measured ITL within target, and no raise follows a queue-driven cut for 3 s.
Latency itself never moves the arrival-rate estimate: a rule that raised the
rate when the measured ITL ran over target (tried) closed exactly the delayed
loop above and doubled the reversals in simulation. In the simulated step load
(tests/runtime/test_slo_controller.py, seeds 0-4) the overloaded phase shows
0-2 reversals after its first 5 s.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

from models.config import ModelConfig
from models.cost import CostModel
from runtime.batch_cost import BatchCost
from runtime.types import IterationStats, RequestStats

log = logging.getLogger(__name__)

# SLO controller constants (see "The SLO controller" above).
_RATE_WINDOW_S = 8.0  # long arrival-rate window
_SHORT_WINDOW_S = 1.0  # short window that detects a step in the load
_STEP_SIGMAS = 2.5  # a step: each half of the short window this many Poisson sigmas (+1/s) above the rate
_FALL_SIGMAS = 2.0  # ... or this many below it (a fall in the load)
_DRIFT_SIGMAS = 2.5  # a drift: the long window is this many sigmas off
_PERSIST_S = 4.0  # ... or one sigma off, on the same side, for this long
_FEEDBACK_TAU_S = 5.0  # time constant of the measured scale and overhead when they fall
_FEEDBACK_UP_TAU_S = 1.5  # ... and when they rise (the server is slower than predicted)
_GAP_FORGET = 0.95  # per tick, of the overhead regression's sums
_SCALE_MIN, _SCALE_MAX = 0.05, 50.0  # bounds of the measured / predicted model-time ratio
_MIN_DRAIN_S = 1.0  # the queue is planned away over max(this, _DRAIN_DELAYS x request lifetime)
_DRAIN_DELAYS = 3.0  # > e: a delayed integrator with gain 1 / (3 x delay) does not overshoot
_DEAD_BAND_DOWN = 0.2  # rungs: smaller predicted cuts are ignored
_DEAD_BAND_UP = 0.3  # rungs: smaller predicted raises are ignored
_HOLD_S = 3.0  # no raise for this long after a cut the queue asked for
_RAISE_PER_S = 4.0  # rungs per second at most when raising
_RESOLUTION = 0.02  # rungs: bisection resolution of the operating point
_LOG_MIN_GAP_S = 2.0  # at most one change line per this many seconds
# Without a calibrated cost model: the analytic bytes at a nominal rate (ode-tiny's fit, rounded);
# the measured scale corrects it from the first iterations on.
_NOMINAL_COST = CostModel(
    a_bytes=2.5e-10, b_flops=0.0, c=7.5e-4, r2_bytes=0.0, r2_flops=0.0, r2_both=0.0, n_samples=0,
    config_name="nominal",
)  # fmt: skip


def _index_of(ladder: Sequence[int], steps: int) -> int:
    """Index of the highest rung <= steps (the lowest rung if none is)."""
    below = [i for i, n in enumerate(ladder) if n <= steps]
    return below[-1] if below else 0


class SLOController:
    """Predictive default step count for inter-token-latency and TTFT targets.

    See "The SLO controller" in the module docstring for the model and why it
    settles. Feed it with `record_arrival` (every request, from
    `StepPolicy.decide`), `on_stats` (the engine's `IterationStats` and
    `RequestStats`) and `observe` (each measured inter-token latency); ask
    it with `assign` (the step count of the next default request) and
    `snapshot` (decision, inputs and predictions, for `/stats` and metrics).
    """

    def __init__(
        self,
        target_itl_s: float,
        min_steps: int,
        max_steps: int,
        window: int = 64,
        hysteresis: float = 0.1,
        initial_steps: int | None = None,
        *,
        config: ModelConfig,
        cost_model: CostModel | None = None,
        ladder: Sequence[int] | None = None,
        target_ttft_s: float | None = None,
        max_batch_size: int = 32,
        max_prefills: int = 8,
        clock: Callable[[], float] = time.monotonic,
        tick_s: float = 0.25,
        log_interval_s: float = 30.0,
    ) -> None:
        """Create a controller.

        Args:
            target_itl_s: inter-token latency target in seconds (> 0).
            min_steps: lower bound.
            max_steps: upper bound.
            window: measured inter-token latencies kept for `snapshot` (>= 1).
            hysteresis: capacity headroom h in [0, 1): the controller plans
                for (1 + h) x the measured demand.
            initial_steps: starting operating point (default: the top of the ladder).
            config: the model's configuration (the cost model's shapes).
            cost_model: the calibrated cost model; None = the analytic byte
                count at a nominal rate, which the measured scale then corrects.
            ladder: the step counts to operate on, increasing (default every
                count in [min_steps, max_steps]; see `ModelProfile.step_ladder`).
            target_ttft_s: time-to-first-token target in seconds (None = not checked).
            max_batch_size: the engine's row limit (`EngineConfig.max_batch_size`).
            max_prefills: the engine's admissions per iteration.
            clock: monotonic seconds (simulations pass their own).
            tick_s: seconds between decisions.
            log_interval_s: seconds between summary log lines.
        """
        if not target_itl_s > 0:
            raise ValueError(f"target_itl_s={target_itl_s}: must be > 0")
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"min_steps={min_steps}, max_steps={max_steps}: need 1 <= min <= max")
        if window < 1:
            raise ValueError(f"window={window}: must be >= 1")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis={hysteresis}: must lie in [0, 1)")
        if target_ttft_s is not None and not target_ttft_s > 0:
            raise ValueError(f"target_ttft_s={target_ttft_s}: must be > 0")
        if max_batch_size < 1 or max_prefills < 1:
            raise ValueError(f"max_batch_size={max_batch_size}, max_prefills={max_prefills}: must be >= 1")
        rungs = sorted({int(n) for n in (ladder or range(min_steps, max_steps + 1))})
        rungs = [n for n in rungs if min_steps <= n <= max_steps] or [max_steps]
        self.target = target_itl_s
        self.target_ttft = target_ttft_s
        self.min_steps, self.max_steps = min_steps, max_steps
        self.window, self.hysteresis = window, hysteresis
        self.ladder = rungs
        self.config = config
        self.calibrated = cost_model is not None
        self.cost_model = cost_model or _NOMINAL_COST
        self.max_batch = max_batch_size
        self.max_prefills = max_prefills
        self.clock = clock
        self.tick_s = tick_s
        self.log_interval_s = log_interval_s
        top = len(rungs) - 1
        self.u = float(top if initial_steps is None else _index_of(rungs, initial_steps))
        self.changes = 0
        self.reversals = 0
        self._last_dir = 0
        self._acc = 0.0  # error diffusion of the fractional operating point
        self._raising = False
        self._hold_until = 0.0
        t = clock()
        self._start = t
        self._last_tick = t
        self._last_log = t
        self._last_change = t
        self._suppressed = 0
        # Inputs.
        self._arrivals: deque[tuple[float, int, int, int]] = deque()  # (t, prompt, max_tokens, steps or 0)
        self._rate_since = t  # arrivals before this belong to an earlier, different rate
        self._dev_side, self._dev_since = 0, t
        self.rate = 0.0  # committed arrival rate (requests/s)
        self.rate_short = self.rate_long = 0.0
        self.prompt_tokens = 16.0
        self.gen_tokens: float | None = None  # mean generated tokens (finished requests)
        self.waiting = 0
        self.running = 0
        self._itls: deque[float] = deque(maxlen=window)
        # Feedback: measured / predicted model time, and the loop's time per iteration outside it.
        self.scale = 1.0
        self.overhead = (0.0, 0.0)  # (seconds per iteration, seconds per row)
        self._sum_dur = self._sum_pred = 0.0
        self._gap: list[float] = [0.0] * 5  # forgetting sums of 1, B, B^2, g, g*B
        self._last_iter: float | None = None
        self._nominal = 0.0  # the last iteration's predicted model seconds
        self._busy = False
        self._batch = BatchCost(self.cost_model, config, max_batch_size)
        self._capacity: tuple[float, float, float] | None = None  # (tick, now, at top)
        self.decision: dict[str, Any] = {"reason": "initial", "limit": "none"}
        self._predict(self.rate)

    # --- public state ----------------------------------------------------------
    @property
    def operating_point(self) -> float:
        """Mean step count of new default requests (fractional between two rungs)."""
        i = min(int(self.u), len(self.ladder) - 1)
        if i == len(self.ladder) - 1:
            return float(self.ladder[i])
        return self.ladder[i] + (self.u - i) * (self.ladder[i + 1] - self.ladder[i])

    @property
    def steps(self) -> int:
        """The operating point rounded to a step count (what `EngineStats.default_steps` shows)."""
        lo = self.ladder[min(int(self.u), len(self.ladder) - 1)]
        hi = self.ladder[min(int(self.u) + 1, len(self.ladder) - 1)]
        return hi if self.u - int(self.u) >= 0.5 else lo

    # --- inputs --------------------------------------------------------------
    def record_arrival(self, prompt_tokens: int, max_tokens: int, steps: int | None = None) -> None:
        """Count one request (`steps` = the count it asked for; None = it takes the default)."""
        now = self.clock()
        self._tick(now)
        self._arrivals.append((now, int(prompt_tokens), int(max_tokens), int(steps or 0)))
        self.prompt_tokens += 0.05 * (prompt_tokens - self.prompt_tokens)

    def assign(self) -> int:
        """The step count of the next default request: the rungs around the operating
        point in the proportion that makes their mean the operating point."""
        self._tick(self.clock())
        i = min(int(self.u), len(self.ladder) - 1)
        if i == len(self.ladder) - 1:
            return self.ladder[i]
        self._acc += self.u - i
        if self._acc >= 1.0 - 1e-9:
            self._acc -= 1.0
            return self.ladder[i + 1]
        return self.ladder[i]

    def observe(self, itl_s: float, waiting: int = 0) -> int:
        """Record one measured inter-token latency (and the queue length); return `steps`."""
        self._itls.append(itl_s)
        self.waiting = waiting
        return self.steps

    def on_stats(self, stats: Any) -> None:
        """The `Engine.stats_callbacks` entry: iterations feed the feedback, requests the lengths."""
        if isinstance(stats, IterationStats):
            self._on_iteration(stats)
        elif isinstance(stats, RequestStats) and stats.generated_tokens > 0:
            g = float(stats.generated_tokens)
            self.gen_tokens = g if self.gen_tokens is None else self.gen_tokens + 0.05 * (g - self.gen_tokens)

    def _on_iteration(self, s: IterationStats) -> None:
        now = self.clock()
        self.waiting, self.running = s.num_waiting, s.num_running
        if s.batch_size > 0 and s.steps_histogram:
            rows = float(sum(s.steps_histogram.values()))
            shares = {n: c / rows for n, c in s.steps_histogram.items()}
            mean_steps = sum(n * w for n, w in shares.items())
            pred = self._model_seconds(rows, shares, self._context()) + s.num_prefill * self._prefill_seconds(
                mean_steps
            )
            self._sum_dur += s.duration_s
            self._sum_pred += pred
            self._nominal = pred
            if self._busy and self._last_iter is not None:
                # The loop went straight on from the last iteration: the time this one took
                # beyond its model work is the engine's own (and the machine's other load).
                g = max(0.0, now - self._last_iter - s.duration_s)
                b = float(s.batch_size)
                for k, v in enumerate((1.0, b, b * b, g, g * b)):
                    self._gap[k] += v
        self._last_iter = now
        self._busy = s.num_running > 0 or s.num_waiting > 0
        self._tick(now)

    # --- the decision ----------------------------------------------------------
    def _tick(self, now: float) -> None:
        dt = now - self._last_tick
        if dt < self.tick_s:
            return
        self._last_tick = now
        self._update_rate(now)
        self._update_feedback(dt)
        lifetime = self._tokens() * max(self.decision.get("predicted_itl_s") or self.target, 1e-4)
        drain_s = max(_MIN_DRAIN_S, _DRAIN_DELAYS * lifetime)
        excess = max(0, self.waiting - self.max_prefills)
        demand = self.rate + excess / drain_s
        target_u, limit = self._best_u(demand * (1.0 + self.hysteresis))
        old = self.u
        if target_u < self.u - _DEAD_BAND_DOWN:
            self.u, reason = target_u, "lower"
            if excess:  # a cut for a queue (a burst): hold it while the queue drains
                self._hold_until = now + _HOLD_S
        elif (
            (target_u > self.u + _DEAD_BAND_UP or (self._raising and target_u > self.u))
            and self._calm()
            and now >= self._hold_until
        ):
            # A raise, once worth starting, ramps all the way to its target (at a bounded rate).
            self.u, reason = min(target_u, self.u + _RAISE_PER_S * dt), "raise"
        else:
            reason = ""
        self._raising = reason == "raise" and self.u < target_u
        self._predict(self.rate)
        self.decision.update(
            demand_rps=demand, drain_s=drain_s, target_operating_point=self._steps_at(target_u), limit=limit
        )
        if self.u != old:
            direction = 1 if self.u > old else -1
            self.changes += 1
            self.reversals += self._last_dir not in (0, direction)
            self._last_dir = direction
            self._last_change = now
            self.decision["reason"] = reason
            self._log_change(now, old)
        elif now - self._last_log >= self.log_interval_s:
            self._last_log = now
            log.info("slo controller: %s", self._summary())

    def _calm(self) -> bool:
        """Nothing waits and the measured inter-token latency is within target: a raise may start."""
        recent = list(self._itls)[-16:]
        return self.waiting == 0 and (not recent or statistics.fmean(recent) <= self.target)

    def _update_rate(self, now: float) -> None:
        """Committed arrival rate: re-committed only on a statistically significant change.

        A step (both halves of the last second `_STEP_SIGMAS` Poisson sigmas off) commits the last second's
        rate and restarts the long window there; while that window is young ("settling", less
        than `_RATE_WINDOW_S` old) it is re-committed at one sigma, so the estimate converges on
        the new rate within seconds; after that only a `_DRIFT_SIGMAS` move, or a one-sigma
        deviation that stays on one side for `_PERSIST_S`, is committed.
        """
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] < now - _RATE_WINDOW_S:
            arrivals.popleft()
        since = max(self._rate_since, now - _RATE_WINDOW_S)
        span = max(now - since, _SHORT_WINDOW_S)
        n_long = sum(1 for a in arrivals if a[0] >= since)
        n_short = sum(1 for a in arrivals if a[0] >= now - _SHORT_WINDOW_S)
        self.rate_long = n_long / span
        self.rate_short = n_short / _SHORT_WINDOW_S
        ref = max(self.rate, 1.0)
        settling = now - self._rate_since < _RATE_WINDOW_S
        # A step shows in both halves of the short window (a burst is shorter). A fall is safe
        # to believe sooner: a raise still waits for an empty queue (`_calm`).
        half = _SHORT_WINDOW_S / 2
        n_late = sum(1 for a in arrivals if a[0] >= now - half)
        halves = ((n_short - n_late) / half, n_late / half)
        sigmas = _STEP_SIGMAS if self.rate_short > self.rate else _FALL_SIGMAS
        bound = sigmas * math.sqrt(ref / half) + 1.0
        if all(
            abs(r - self.rate) > bound and (r > self.rate) == (self.rate_short > self.rate) for r in halves
        ):
            # A step in the load: follow the short window and forget the old rate's arrivals.
            self.rate, self._rate_since = self.rate_short, now - _SHORT_WINDOW_S
        else:
            sigma = math.sqrt(ref / span)
            side = (
                0 if abs(self.rate_long - self.rate) <= sigma else (1 if self.rate_long > self.rate else -1)
            )
            if side != self._dev_side:
                self._dev_side, self._dev_since = side, now
            # Noise crosses the committed rate often; a bias stays on one side.
            persistent = side != 0 and now - self._dev_since >= _PERSIST_S
            if abs(self.rate_long - self.rate) > (1.0 if settling else _DRIFT_SIGMAS) * sigma or persistent:
                self.rate, self._dev_side = self.rate_long, 0

    def _update_feedback(self, dt: float) -> None:
        """Measured error -> the scale of the cost model and the loop's overhead (bounded, smoothed:
        fast when the measurement says the server is slower than predicted, slow otherwise)."""
        scale, overhead = self.scale, self.overhead
        if self._sum_pred > 0 and self._sum_dur > 0:
            scale = min(max(self._sum_dur / self._sum_pred, _SCALE_MIN), _SCALE_MAX)
            if not self.calibrated and self.changes == 0 and self.scale == 1.0:
                self.scale = scale  # no cost model: take the first measurement as the scale
        self._sum_dur = self._sum_pred = 0.0
        n, b, bb, g, gb = self._gap
        if n >= 4:
            # Least squares gap = o0 + o1 * B; the ridge on o0 makes an unvarying batch size
            # put the overhead per row, which over- rather than under-predicts a larger batch.
            ridge = 1e-3 * n
            det = (n + ridge) * bb - b * b
            o0 = (g * bb - b * gb) / det if det > 0 else 0.0
            o1 = ((n + ridge) * gb - b * g) / det if det > 0 else 0.0
            if o1 < 0:
                o0, o1 = g / n, 0.0
            elif o0 < 0:
                o0, o1 = 0.0, gb / bb if bb > 0 else 0.0
            overhead = (o0, o1)
        self._gap = [v * _GAP_FORGET for v in self._gap]
        rows = max(float(self.running), 1.0)
        before = self.scale * self._nominal + self.overhead[0] + self.overhead[1] * rows
        after = scale * self._nominal + overhead[0] + overhead[1] * rows
        gain = min(1.0, dt / (_FEEDBACK_UP_TAU_S if after > before else _FEEDBACK_TAU_S))
        self.scale *= (scale / self.scale) ** gain
        self.overhead = tuple(p + gain * (q - p) for p, q in zip(self.overhead, overhead, strict=True))  # type: ignore[assignment]

    # --- the model -------------------------------------------------------------
    def _tokens(self) -> float:
        if self.gen_tokens is not None:
            return max(self.gen_tokens, 1.0)
        recent = [a[2] for a in self._arrivals]
        return float(statistics.fmean(recent)) if recent else 16.0

    def _context(self) -> float:
        return min(self.prompt_tokens + self._tokens() / 2, self.config.context_length - 1)

    def _model_seconds(self, rows: float, shares: dict[int, float], context: float) -> float:
        """Predicted model time of one decode iteration of `rows` rows, `shares[n]` of them at n
        steps (runtime/batch_cost.py)."""
        return self._batch.model_seconds(rows, shares, context)

    def _prefill_seconds(self, steps: float) -> float:
        return self._batch.prefill_seconds(min(steps, self.max_steps), self.prompt_tokens)

    def _shares(self, u: float) -> dict[int, float]:
        """Row shares per step count at operating point u: the default mix plus the fixed requests."""
        fixed = Counter(a[3] for a in self._arrivals if a[3])
        total = len(self._arrivals)
        p_default = 1.0 - (sum(fixed.values()) / total if total else 0.0)
        i = min(int(u), len(self.ladder) - 1)
        f = u - i if i < len(self.ladder) - 1 else 0.0
        shares: dict[int, float] = Counter()
        shares[self.ladder[i]] += p_default * (1.0 - f)
        if f > 0:
            shares[self.ladder[i + 1]] += p_default * f
        for n, c in fixed.items():
            shares[n] += c / total
        return dict(shares)

    def _steady(self, rate: float, u: float) -> tuple[float, float] | None:
        """Steady state at an arrival rate: (rows in the batch, seconds per iteration), or None
        when it does not exist (the batch limit or the prefills cannot keep up)."""
        shares = self._shares(u)
        mean_steps = sum(n * w for n, w in shares.items())
        context = self._context()
        tokens = self._tokens()
        o0, o1 = self.overhead
        prefill = self.scale * self._prefill_seconds(mean_steps)
        if rate * prefill >= 1.0:
            return None

        def period(rows: float) -> float:  # seconds per iteration with `rows` decoding
            model = self.scale * self._model_seconds(max(rows, 1.0), shares, context)
            return (model + o0 + o1 * rows) / (1.0 - rate * prefill)  # prefills of the arrivals meanwhile

        # Little's law: each request holds a row for `tokens` iterations, so rows = k * period(rows).
        # period is nearly affine in rows: solve the secant line exactly, then refine on the curve.
        k = rate * tokens
        p1, p2 = period(1.0), period(float(self.max_batch))
        slope = (p2 - p1) / (self.max_batch - 1) if self.max_batch > 1 else 0.0
        if k * slope >= 1.0:
            return None
        rows = k * (p1 - slope) / (1.0 - k * slope)
        for _ in range(3):
            rows = k * period(rows)
        if rows > self.max_batch:
            return None
        return rows, period(rows)

    def _check(self, rate: float, u: float) -> tuple[bool, str, dict[str, float]]:
        """Whether operating point u meets the targets at `rate`, the binding limit, predictions."""
        state = self._steady(rate, u)
        if state is None:
            return False, "capacity", {}
        rows, period = state
        # The batch fluctuates around its mean (Poisson arrivals): check one standard deviation up.
        busy = rows + math.sqrt(rows)
        shares = self._shares(u)
        o0, o1 = self.overhead
        prefill = self.scale * self._prefill_seconds(sum(n * w for n, w in shares.items()))
        itl = (self.scale * self._model_seconds(max(busy, 1.0), shares, self._context()) + o0 + o1 * busy) / (
            1.0 - rate * prefill
        )
        ttft = 1.5 * itl + prefill
        out = {"predicted_batch": rows, "predicted_itl_s": itl, "predicted_ttft_s": ttft}
        if itl > self.target:
            return False, "itl", out
        if self.target_ttft is not None and ttft > self.target_ttft:
            return False, "ttft", out
        return True, "none", out

    def _best_u(self, demand: float) -> tuple[float, str]:
        """The highest operating point (fractional rung index) that meets the targets at `demand`."""
        top = float(len(self.ladder) - 1)
        ok, limit, _ = self._check(demand, top)
        if ok:
            return top, "none"
        if not self._check(demand, 0.0)[0]:
            return 0.0, f"infeasible:{limit}"
        lo, hi = 0.0, top
        while hi - lo > _RESOLUTION:
            mid = (lo + hi) / 2
            ok, limit_mid, _ = self._check(demand, mid)
            if ok:
                lo = mid
            else:
                hi, limit = mid, limit_mid
        return lo, limit

    def capacity(self, u: float | None = None) -> float:
        """Predicted arrival rate (requests/s) that operating point u (default: now) sustains in target."""
        u = self.u if u is None else u
        lo, hi = 0.0, 1.0
        while self._check(hi, u)[0] and hi < 1e5:
            lo, hi = hi, hi * 2
        for _ in range(14):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self._check(mid, u)[0] else (lo, mid)
        return lo

    def _predict(self, rate: float) -> None:
        _, _, out = self._check(rate, self.u)
        self.decision.update(out)

    def _steps_at(self, u: float) -> float:
        saved, self.u = self.u, u
        try:
            return self.operating_point
        finally:
            self.u = saved

    # --- reporting ---------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Decision, inputs and predictions as plain data (`Engine.stats()`, `/stats`, metrics)."""
        i = min(int(self.u), len(self.ladder) - 1)
        itls = list(self._itls)
        if self._capacity is None or self._capacity[0] != self._last_tick:  # once per decision
            top = float(len(self.ladder) - 1)
            self._capacity = (self._last_tick, self.capacity(), self.capacity(top))
        _, capacity, at_top = self._capacity
        return {
            "operating_point": round(self.operating_point, 3),
            "steps": self.steps,
            "steps_low": self.ladder[i],
            "steps_high": self.ladder[min(i + 1, len(self.ladder) - 1)],
            "fraction_high": round(self.u - i, 3) if i < len(self.ladder) - 1 else 0.0,
            "ladder": list(self.ladder),
            "target_itl_s": self.target,
            "target_ttft_s": self.target_ttft,
            "arrival_rate_rps": round(self.rate, 3),
            "arrival_rate_short_rps": round(self.rate_short, 3),
            "arrival_rate_long_rps": round(self.rate_long, 3),
            "waiting": self.waiting,
            "running": self.running,
            "mean_prompt_tokens": round(self.prompt_tokens, 2),
            "mean_generated_tokens": round(self._tokens(), 2),
            "model_scale": round(self.scale, 4),
            "overhead_s": round(self.overhead[0], 6),
            "overhead_per_row_s": round(self.overhead[1], 7),
            "calibrated": self.calibrated,
            "capacity_rps": round(capacity, 3),
            "capacity_at_top_rps": round(at_top, 3),
            "measured_itl_mean_s": statistics.fmean(itls) if itls else None,
            "measured_itl_p50_s": statistics.median(itls) if itls else None,
            "changes": self.changes,
            "reversals": self.reversals,
            **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.decision.items()},
        }

    def _summary(self) -> str:
        d = self.decision
        return (
            f"steps {self.operating_point:.2f} (target {d.get('target_operating_point', 0):.2f}, limit "
            f"{d.get('limit')}), arrivals {self.rate:.2f}/s, demand {d.get('demand_rps', 0):.2f}/s, waiting "
            f"{self.waiting}, predicted itl {1e3 * (d.get('predicted_itl_s') or 0):.1f} ms, scale "
            f"{self.scale:.2f}, overhead {1e3 * self.overhead[0]:.2f} ms"
            f" + {1e3 * self.overhead[1]:.3f} ms/row"
        )

    def _log_change(self, now: float, old_u: float) -> None:
        if now - self._last_log < _LOG_MIN_GAP_S:
            self._suppressed += 1
            return
        extra = f" ({self._suppressed} changes since the last line)" if self._suppressed else ""
        self._suppressed = 0
        self._last_log = now
        log.info("slo controller: %s -> %s", f"{self._steps_at(old_u):.2f}", self._summary() + extra)
