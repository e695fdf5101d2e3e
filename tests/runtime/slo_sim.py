"""A simulated leanserve engine for testing the SLO controller (no model, no threads).

The simulation keeps what makes step-count control hard on the real server:

* continuous batching with the engine's limits: at most `max_batch` rows,
  at most `max_prefills` admissions per iteration, a FIFO waiting queue;
* the delay: a request keeps the step count it was admitted with until it
  has generated all its tokens, so a new operating point reaches the batch
  only as the old rows finish (one request lifetime);
* a service curve from the real calibrated cost model (ode-tiny's
  profile.json), with rows of different step counts sharing each step as
  `run_trunk` does, scaled by `scale` and plus a loop overhead per
  iteration and per row that grows a little faster than linearly (neither
  of which the controller is told), and log-normal noise per iteration;
* Poisson arrivals at a rate that may change over time.

It drives the controller through the same calls the engine makes:
`StepPolicy.decide` at each arrival, `observe` per token, `on_stats` with
`IterationStats` per iteration and `RequestStats` per finished request,
on a simulated clock.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.stepload import count_reversals
from models.config import ModelConfig
from models.cost import CostModel
from runtime.policy import ModelProfile, SLOController, StepPolicy
from runtime.types import ComputeParams, IterationStats, RequestStats

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo" / "ode-tiny"


def ode_tiny() -> tuple[ModelConfig, ModelProfile]:
    """ode-tiny's configuration and profile (cost model, tiers, perplexities)."""
    config = ModelConfig.from_dict(json.loads((ZOO / "config.json").read_text(encoding="utf-8")))
    data = json.loads((ZOO / "profile.json").read_text(encoding="utf-8"))
    return config, ModelProfile.from_dict(config, data)


class Clock:
    """A settable clock for the controller."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Server:
    """The simulated server's true service curve (what the controller has to learn).

    Attributes:
        config: model shapes.
        cost: the calibrated cost model the truth is derived from.
        scale: true model time / cost-model prediction.
        overhead_s: loop time per iteration outside the model.
        overhead_row_s: loop time per row (at a small batch; grows by B / 64).
        noise: log-normal sigma of each iteration's time.
        max_batch: row limit.
        max_prefills: admissions per iteration.
    """

    config: ModelConfig
    cost: CostModel
    scale: float = 2.5
    overhead_s: float = 0.0004
    overhead_row_s: float = 0.00035
    noise: float = 0.1
    max_batch: int = 32
    max_prefills: int = 8

    def model_seconds(self, steps: list[int], context: int) -> float:
        """Model time of one decode iteration whose rows run `steps`."""
        rows = len(steps)
        total = self.cost.predict_decode_seconds(self.config, 0, rows, context)
        for k in range(max(steps)):
            b = sum(1 for n in steps if n > k)
            if b:
                total += self.cost.predict_decode_seconds(
                    self.config, k + 1, b, context
                ) - self.cost.predict_decode_seconds(self.config, k, b, context)
        return self.scale * total

    def prefill_seconds(self, steps: int, prompt: int) -> float:
        return self.scale * self.cost.predict_remaining_seconds(self.config, steps, 0, prompt, 1)

    def loop_seconds(self, rows: int) -> float:
        return self.overhead_s + self.overhead_row_s * rows * (1 + rows / 64)

    def sustainable_rate(self, steps: int, tokens: int, prompt: int, itl_s: float) -> float:
        """The largest arrival rate whose steady batch at `steps` keeps the mean ITL within `itl_s`
        (noise-free, by bisection on Little's law)."""

        def period(rows: int, rate: float) -> float:
            base = self.model_seconds([steps] * max(rows, 1), prompt + tokens // 2) + self.loop_seconds(rows)
            return base / (1 - rate * self.prefill_seconds(steps, prompt))

        lo, hi = 0.0, 500.0
        for _ in range(40):
            rate = (lo + hi) / 2
            rows, ok = 1, False
            for _ in range(100 if rate * self.prefill_seconds(steps, prompt) < 1 else 0):
                new = max(1, math.ceil(rate * tokens * period(rows, rate)))
                if new > self.max_batch:
                    break
                if new == rows:
                    ok = period(rows, rate) <= itl_s
                    break
                rows = new
            lo, hi = (rate, hi) if ok else (lo, rate)
        return lo


@dataclass
class Req:
    arrival: float
    steps: int
    tokens: int
    prompt: int
    admitted: float | None = None
    first: float | None = None
    last: float | None = None
    done: int = 0
    itls: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return (self.first if self.first is not None else math.inf) - self.arrival

    @property
    def mean_itl(self) -> float:
        return sum(self.itls) / len(self.itls) if self.itls else 0.0


@dataclass
class Run:
    """What a simulation produced: the requests and the controller's trajectory."""

    requests: list[Req]
    trajectory: list[tuple[float, float]]  # (time, operating point) after each iteration
    controller: SLOController | None

    def phase(self, start: float, end: float) -> list[Req]:
        return [r for r in self.requests if start <= r.arrival < end]

    def good_fraction(self, start: float, end: float, ttft_s: float = 0.5, itl_s: float = 0.05) -> float:
        rs = self.phase(start, end)
        good = sum(1 for r in rs if r.ttft <= ttft_s and r.mean_itl <= itl_s)
        return good / len(rs) if rs else 1.0

    def points(self, start: float, end: float) -> list[float]:
        return [x for t, x in self.trajectory if start <= t < end]

    def reversals(self, start: float, end: float) -> int:
        """Direction changes of the operating point between start and end."""
        return count_reversals(self.points(start, end))

    def mean_steps(self, start: float, end: float) -> float:
        rs = self.phase(start, end)
        return sum(r.steps for r in rs) / len(rs)


def simulate(
    server: Server,
    rate: Callable[[float], float],
    duration_s: float,
    policy: StepPolicy,
    compute: ComputeParams | None = None,
    tokens: int = 32,
    prompt: int = 20,
    seed: int = 0,
    clock: Clock | None = None,
) -> Run:
    """Run the simulated server for `duration_s` of arrivals (then drain).

    Args:
        server: the service curve.
        rate: arrivals per second at time t (thinning of a Poisson process).
        duration_s: arrivals stop after this.
        policy: chooses each request's steps (with or without a controller).
        compute: the requests' compute fields (default none: the server default).
        tokens: tokens per request.
        prompt: prompt tokens per request.
        seed: arrival and noise seed.
        clock: the controller's clock (required when the policy has one).
    """
    rng = random.Random(seed)
    compute = compute or ComputeParams()
    ctrl = policy.slo
    clock = clock or Clock()
    peak = max(rate(i * duration_s / 400) for i in range(401)) * 1.01 + 1e-9
    arrivals: deque[float] = deque()
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t > duration_s:
            break
        if rng.random() < rate(t) / peak:
            arrivals.append(t)
    requests: list[Req] = []
    waiting: deque[Req] = deque()
    running: list[Req] = []
    trajectory: list[tuple[float, float]] = []
    now = 0.0

    def arrive(upto: float) -> None:
        while arrivals and arrivals[0] <= upto:
            a = arrivals.popleft()
            clock.t = max(clock.t, a)
            d = policy.decide(compute, prompt, tokens, batch=len(running) + 1)
            r = Req(a, d.steps, tokens, prompt)
            requests.append(r)
            waiting.append(r)

    while arrivals or waiting or running:
        arrive(now)
        if not waiting and not running:
            now = arrivals[0]
            continue
        admitted = []
        while (
            waiting
            and len(running) + len(admitted) < server.max_batch
            and len(admitted) < server.max_prefills
        ):
            r = waiting.popleft()
            r.admitted = now
            admitted.append(r)
        decode = list(running)
        context = prompt + tokens // 2
        model = server.model_seconds([r.steps for r in decode], context) if decode else 0.0
        model += sum(server.prefill_seconds(r.steps, r.prompt) for r in admitted)
        noise = math.exp(rng.gauss(0.0, server.noise) - server.noise**2 / 2)
        model *= noise
        rows = len(decode) + len(admitted)
        end = now + model + server.loop_seconds(rows)
        arrive(end)  # requests arriving during the iteration are decided meanwhile, as in the engine
        now = end
        clock.t = max(clock.t, now)
        hist: dict[int, int] = {}
        finished = []
        for r in decode + admitted:
            hist[r.steps] = hist.get(r.steps, 0) + 1
            if r.first is None:
                r.first = now
            else:
                itl = now - (r.last or now)
                r.itls.append(itl)
                if ctrl is not None:
                    ctrl.observe(itl, len(waiting))
            r.last = now
            r.done += 1
            if r.done >= r.tokens:
                finished.append(r)
        running = [r for r in decode + admitted if r not in finished]
        if ctrl is not None:
            ctrl.on_stats(
                IterationStats(
                    batch_size=rows,
                    num_prefill=len(admitted),
                    num_decode=len(decode),
                    steps_histogram=hist,
                    expert_token_counts=[],
                    kv_used_bytes=0,
                    kv_capacity_bytes=1,
                    num_waiting=len(waiting),
                    num_running=len(running),
                    duration_s=model,
                )
            )
            for r in finished:
                ctrl.on_stats(
                    RequestStats(
                        request_id="",
                        queue_time_s=(r.admitted or now) - r.arrival,
                        ttft_s=r.ttft,
                        itl_s=r.itls,
                        total_s=now - r.arrival,
                        steps=r.steps,
                        experts=None,
                        policy_reason="",
                        prompt_tokens=r.prompt,
                        generated_tokens=r.done,
                        finish_reason="length",
                    )
                )
            trajectory.append((now, ctrl.operating_point))
        if now > duration_s + 120:
            raise AssertionError("simulation did not drain: the server is hopelessly overloaded")
    return Run(requests, trajectory, ctrl)


def controller(
    config: ModelConfig,
    profile: ModelProfile,
    clock: Clock,
    target_itl_s: float = 0.04,
    target_ttft_s: float | None = 0.5,
    calibrated: bool = True,
    step_range: tuple[int, int] | None = None,
    **kwargs: object,
) -> SLOController:
    """A controller set up as `Engine.__init__` does, on the simulated clock."""
    lo, hi = step_range or config.step_range
    return SLOController(
        target_itl_s,
        lo,
        hi,
        config=config,
        cost_model=profile.cost_model if calibrated else None,
        ladder=profile.step_ladder(config, (lo, hi)),
        target_ttft_s=target_ttft_s,
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )
