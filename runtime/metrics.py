"""Prometheus metrics of the engine: the one module that turns engine stats into series.

`EngineMetrics` subscribes to `Engine.stats_callbacks` (`RequestStats` once per
request, `IterationStats` once per iteration) and to periodic `EngineStats`
snapshots (`refresh`), and writes them through a swappable set of metric
classes, as vLLM's loggers do:

* `PrometheusMetrics` (prometheus_client; a private `CollectorRegistry`) for use
  outside Ray: `generate_latest(metrics.registry)` renders the text format.
* `RayMetrics` (`ray.serve.metrics` Counter/Gauge/Histogram) inside a Ray Serve
  replica. Ray exports them on its metrics export port with a `ray_` prefix
  and Serve's tags (application, deployment, replica, ...): e.g.
  `ray_leanserve_requests_total`, `ray_leanserve_request_latency_seconds_bucket`.
  Scrape `http://127.0.0.1:<metrics-port>/metrics` (`leanserve serve
  --metrics-port 8080`, or `ray start --metrics-export-port`). Ray reports
  them every `metrics_report_interval_ms` (10 s by default).

Series (names below without the `ray_` prefix; counters end in `_total`):

  leanserve_requests_total{model,finish_reason}            counter
  leanserve_request_latency_seconds{model,steps}           histogram
  leanserve_time_to_first_token_seconds{model,steps}       histogram
  leanserve_inter_token_latency_seconds{model,steps}       histogram
  leanserve_queue_time_seconds{model}                      histogram
  leanserve_prompt_tokens_total{model}                     counter
  leanserve_generated_tokens_total{model}                  counter
  leanserve_ode_steps{model}                               histogram of chosen step counts
  leanserve_expert_tokens_total{model,expert}              counter
  leanserve_num_requests_running{model}                    gauge
  leanserve_num_requests_waiting{model}                    gauge
  leanserve_kv_cache_bytes{model,state="used"|"capacity"}  gauge ("used": allocated to requests)
  leanserve_kv_pages{model,state="used"|"reserved"|"capacity"}  gauge: pages holding tokens,
                                                           allocated to requests, in the pool
  leanserve_preemptions_total{model}                       counter: requests preempted (KV on demand;
                                                           runtime/scheduler.py), exported from 0
  leanserve_recomputed_tokens_total{model}                 counter: tokens recompute prefills fed again
  leanserve_kv_lowered_admissions_total{model}             counter: admissions at fewer steps for
                                                           lack of KV (kv_min_steps), exported from 0
  leanserve_process_resident_memory_bytes{model}           gauge
  leanserve_slo_operating_steps{model}                     gauge: the SLO controller's mean step count
  leanserve_slo_arrival_rate{model}                        gauge: its committed arrival rate, requests/s
  leanserve_slo_predicted_capacity{model}                  gauge: requests/s it predicts its steps sustain
  leanserve_slo_predicted_itl_seconds{model}               gauge: inter-token latency it predicts
  leanserve_slo_model_scale{model}                         gauge: measured / cost-model model time
  leanserve_slo_step_changes{model}                        gauge: operating-point changes since start
  leanserve_latency_prediction_ratio{model,steps}          histogram: measured / predicted end-to-end
                                                           time of finished requests (runtime/predictor.py)
  leanserve_device_memory_bytes{model,device}              gauge (CUDA only)
  leanserve_spec_drafted_tokens_total{model,draft_steps,mode}   counter: tokens speculative drafts proposed
  leanserve_spec_accepted_tokens_total{model,draft_steps,mode}  counter: drafted tokens verification kept
  leanserve_spec_acceptance_rate{model,draft_steps,mode}   histogram: accepted / drafted per finished
                                                           request that speculated (runtime/speculation.py)

Label sets are bounded: steps and draft_steps by the model's step range, expert by
its expert count, finish_reason by the engine's few reasons, mode (how the draft
setting was chosen: explicit, default, auto) by three values.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

from runtime.types import EngineStats, IterationStats, RequestStats

# Latency buckets (seconds): 1 ms resolution at the low end for millisecond SLOs, up to 60 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0,
)  # fmt: skip
# Inter-token latency is per token: finer still below 10 ms.
ITL_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02,
    0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
)  # fmt: skip
# Step counts are small integers: one bucket per count up to 32, then coarse.
STEP_BUCKETS: tuple[float, ...] = tuple(float(n) for n in range(1, 33)) + (48.0, 64.0, 128.0)

# Prediction error, measured / predicted: fine around 1, where a promise is kept or just missed.
RATIO_BUCKETS: tuple[float, ...] = (
    0.25, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5, 2.0, 3.0, 5.0,
)  # fmt: skip

# Speculative acceptance (accepted / drafted tokens of a request), in [0, 1].
ACCEPTANCE_BUCKETS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)

_RSS_PERIOD_S = 1.0  # reading /proc costs a syscall: at most once a second


class Metric(Protocol):
    """One metric family with labels; the operations both backends provide."""

    def inc(self, value: float, labels: dict[str, str]) -> None: ...

    def set(self, value: float, labels: dict[str, str]) -> None: ...

    def observe(self, value: float, labels: dict[str, str]) -> None: ...


class MetricFactory(Protocol):
    """Creates metric families: the swappable part (prometheus_client or Ray)."""

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> Metric: ...

    def gauge(self, name: str, doc: str, labels: Sequence[str]) -> Metric: ...

    def histogram(self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> Metric: ...


class _PromMetric:
    """Adapter: `prometheus_client` metric with labels -> `Metric`."""

    def __init__(self, metric: Any) -> None:
        self._m = metric

    def inc(self, value: float, labels: dict[str, str]) -> None:
        self._m.labels(**labels).inc(value)

    def set(self, value: float, labels: dict[str, str]) -> None:
        self._m.labels(**labels).set(value)

    def observe(self, value: float, labels: dict[str, str]) -> None:
        self._m.labels(**labels).observe(value)


class PrometheusMetrics:
    """prometheus_client metric classes in a private registry (outside Ray, tests)."""

    def __init__(self, registry: Any = None) -> None:
        import prometheus_client

        self._pc = prometheus_client
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> Metric:
        # prometheus_client appends `_total` itself.
        return _PromMetric(self._pc.Counter(name, doc, list(labels), registry=self.registry))

    def gauge(self, name: str, doc: str, labels: Sequence[str]) -> Metric:
        return _PromMetric(self._pc.Gauge(name, doc, list(labels), registry=self.registry))

    def histogram(self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> Metric:
        return _PromMetric(
            self._pc.Histogram(name, doc, list(labels), buckets=list(buckets), registry=self.registry)
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return self._pc.generate_latest(self.registry)


class _RayMetric:
    """Adapter: `ray.serve.metrics` metric -> `Metric` (labels are Ray 'tags')."""

    def __init__(self, metric: Any) -> None:
        self._m = metric

    def inc(self, value: float, labels: dict[str, str]) -> None:
        if value == 0:  # Counter.inc refuses 0; a zero point exports the series before its first event
            self._m._record(0, tags=labels)
        else:
            self._m.inc(value, tags=labels)

    def set(self, value: float, labels: dict[str, str]) -> None:
        self._m.set(value, tags=labels)

    def observe(self, value: float, labels: dict[str, str]) -> None:
        self._m.observe(value, tags=labels)


class RayMetrics:
    """`ray.serve.metrics` classes, used inside a Serve replica (exported with a `ray_` prefix)."""

    def __init__(self) -> None:
        from ray.serve import metrics as ray_metrics

        self._rm = ray_metrics

    def counter(self, name: str, doc: str, labels: Sequence[str]) -> Metric:
        # Ray's exporter appends `_total` to counters, like prometheus_client.
        return _RayMetric(self._rm.Counter(name, description=doc, tag_keys=tuple(labels)))

    def gauge(self, name: str, doc: str, labels: Sequence[str]) -> Metric:
        return _RayMetric(self._rm.Gauge(name, description=doc, tag_keys=tuple(labels)))

    def histogram(self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> Metric:
        return _RayMetric(
            self._rm.Histogram(name, description=doc, boundaries=list(buckets), tag_keys=tuple(labels))
        )


def resident_memory_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class EngineMetrics:
    """Engine stats -> metric families; see the module docstring for the series.

    Args:
        model: value of the `model` label (the model's name).
        factory: metric classes (`PrometheusMetrics()` or `RayMetrics()`).
        device: the engine's torch device; on CUDA, device memory is exported too.
    """

    def __init__(self, model: str, factory: MetricFactory, device: str = "cpu") -> None:
        self.model = model
        self.factory = factory
        self.device = str(device)
        self._base = {"model": model}
        self._last_rss = 0.0
        f, m = factory, ("model",)
        ms = ("model", "steps")
        self.requests = f.counter(
            "leanserve_requests", "Requests that left the engine.", ("model", "finish_reason")
        )
        self.latency = f.histogram(
            "leanserve_request_latency_seconds", "Arrival to finish, seconds.", ms, LATENCY_BUCKETS
        )
        self.ttft = f.histogram(
            "leanserve_time_to_first_token_seconds", "Arrival to first token, seconds.", ms, LATENCY_BUCKETS
        )
        self.itl = f.histogram(
            "leanserve_inter_token_latency_seconds",
            "Time between consecutive tokens, seconds.",
            ms,
            ITL_BUCKETS,
        )
        self.queue = f.histogram(
            "leanserve_queue_time_seconds", "Arrival to admission, seconds.", m, LATENCY_BUCKETS
        )
        self.prompt_tokens = f.counter("leanserve_prompt_tokens", "Prompt tokens of finished requests.", m)
        self.generated_tokens = f.counter("leanserve_generated_tokens", "Tokens generated.", m)
        self.ode_steps = f.histogram(
            "leanserve_ode_steps", "ODE step count chosen per request.", m, STEP_BUCKETS
        )
        self.expert_tokens = f.counter(
            "leanserve_expert_tokens", "Tokens routed to each expert or tree node.", ("model", "expert")
        )
        self.running = f.gauge("leanserve_num_requests_running", "Requests holding KV memory.", m)
        self.waiting = f.gauge("leanserve_num_requests_waiting", "Requests waiting for admission.", m)
        self.prediction_ratio = f.histogram(
            "leanserve_latency_prediction_ratio",
            "Measured / predicted end-to-end time of finished requests (the step policy's prediction).",
            ms,
            RATIO_BUCKETS,
        )
        spec = ("model", "draft_steps", "mode")
        self.spec_drafted = f.counter(
            "leanserve_spec_drafted_tokens", "Tokens proposed by self-speculative drafts.", spec
        )
        self.spec_accepted = f.counter(
            "leanserve_spec_accepted_tokens", "Drafted tokens the verification accepted.", spec
        )
        self.spec_acceptance = f.histogram(
            "leanserve_spec_acceptance_rate",
            "Accepted / drafted tokens of each finished request that speculated.",
            spec,
            ACCEPTANCE_BUCKETS,
        )
        self.kv = f.gauge("leanserve_kv_cache_bytes", "KV cache bytes by state.", ("model", "state"))
        self.kv_pages = f.gauge(
            "leanserve_kv_pages",
            "KV pages holding tokens, allocated to requests, in the pool.",
            ("model", "state"),
        )
        # Counted from the engine's running totals (deltas), and exported at 0 from the start: a
        # counter bumped only under preemption would otherwise not exist until the first one.
        self.preemptions = f.counter("leanserve_preemptions", "Requests preempted (KV pool ran dry).", m)
        self.recomputed_tokens = f.counter(
            "leanserve_recomputed_tokens", "Tokens recompute prefills fed again after a preemption.", m
        )
        self.kv_lowered = f.counter(
            "leanserve_kv_lowered_admissions",
            "Admissions at fewer steps: the KV pool could not hold the request at its own (kv_min_steps).",
            m,
        )
        self.preemptions.inc(0, self._base)
        self.recomputed_tokens.inc(0, self._base)
        self.kv_lowered.inc(0, self._base)
        self._totals = [0, 0, 0]  # the engine's running totals of these three, last seen
        self.rss = f.gauge("leanserve_process_resident_memory_bytes", "Resident memory of the replica.", m)
        # SLO controller (set from `EngineStats.slo` by `refresh`; absent without a controller).
        self.slo_gauges = {
            key: f.gauge(name, doc, m)
            for key, name, doc in (
                ("operating_point", "leanserve_slo_operating_steps", "SLO controller: mean step count."),
                ("arrival_rate_rps", "leanserve_slo_arrival_rate", "SLO controller: arrivals/s."),
                ("capacity_rps", "leanserve_slo_predicted_capacity", "SLO controller: sustainable req/s."),
                ("predicted_itl_s", "leanserve_slo_predicted_itl_seconds", "SLO controller: predicted ITL."),
                ("model_scale", "leanserve_slo_model_scale", "SLO controller: measured/predicted time."),
                ("changes", "leanserve_slo_step_changes", "SLO controller: operating-point changes."),
            )
        }
        self.device_memory = (
            f.gauge("leanserve_device_memory_bytes", "CUDA memory allocated by torch.", ("model", "device"))
            if self.device.startswith("cuda")
            else None
        )
        self._update_memory(force=True)

    def __call__(self, stats: RequestStats | IterationStats) -> None:
        """The `Engine.stats_callbacks` entry point."""
        if isinstance(stats, RequestStats):
            self.observe_request(stats)
        elif isinstance(stats, IterationStats):
            self.observe_iteration(stats)

    def observe_request(self, s: RequestStats) -> None:
        """Record one finished (or failed) request."""
        b = self._base
        ms = {"model": self.model, "steps": str(s.steps)}
        self.requests.inc(1, {"model": self.model, "finish_reason": s.finish_reason})
        self.latency.observe(s.total_s, ms)
        if s.ttft_s is not None:
            self.ttft.observe(s.ttft_s, ms)
        for itl in s.itl_s:
            self.itl.observe(itl, ms)
        if s.queue_time_s is not None:
            self.queue.observe(s.queue_time_s, b)
        self.prompt_tokens.inc(s.prompt_tokens, b)
        if s.generated_tokens:
            self.generated_tokens.inc(s.generated_tokens, b)
        self.ode_steps.observe(s.steps, b)
        if s.predicted_s is not None and s.predicted_s > 0 and s.finish_reason in ("stop", "length"):
            self.prediction_ratio.observe(s.total_s / s.predicted_s, ms)
        r = s.speculation
        if r is not None and r.drafted_tokens:
            labels = {"model": self.model, "draft_steps": str(r.draft_steps), "mode": r.mode}
            self.spec_acceptance.observe(r.accepted_tokens / r.drafted_tokens, labels)

    def observe_iteration(self, s: IterationStats) -> None:
        """Record one engine iteration (gauges and expert routing)."""
        for expert, count in enumerate(s.expert_token_counts):
            if count:
                self.expert_tokens.inc(count, {"model": self.model, "expert": str(expert)})
        for (draft_steps, mode), (drafted, accepted) in s.speculation.items():
            labels = {"model": self.model, "draft_steps": str(draft_steps), "mode": mode}
            self.spec_drafted.inc(drafted, labels)
            if accepted:
                self.spec_accepted.inc(accepted, labels)
        self._set_gauges(s)

    def refresh(self, s: EngineStats) -> None:
        """Set the gauges from a snapshot; call periodically, since an idle engine emits no iterations."""
        self._set_gauges(s)
        for key, gauge in self.slo_gauges.items():
            value = (s.slo or {}).get(key)
            if isinstance(value, (int, float)):
                gauge.set(float(value), self._base)

    def _set_gauges(self, s: IterationStats | EngineStats) -> None:
        b = self._base
        self.running.set(s.num_running, b)
        self.waiting.set(s.num_waiting, b)
        self.kv.set(s.kv_used_bytes, {"model": self.model, "state": "used"})
        self.kv.set(s.kv_capacity_bytes, {"model": self.model, "state": "capacity"})
        for state, pages in (
            ("used", s.kv_pages_used),
            ("reserved", s.kv_pages_reserved),
            ("capacity", s.kv_pages_capacity),
        ):
            self.kv_pages.set(pages, {"model": self.model, "state": state})
        for i, (counter, total) in enumerate(
            (
                (self.preemptions, s.preemptions_total),
                (self.recomputed_tokens, s.recomputed_tokens_total),
                (self.kv_lowered, s.kv_lowered_total),
            )
        ):
            if total > self._totals[i]:
                counter.inc(total - self._totals[i], b)
            self._totals[i] = total  # a smaller total: a new engine, counting from 0 again
        self._update_memory()

    def _update_memory(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_rss < _RSS_PERIOD_S:
            return
        self._last_rss = now
        self.rss.set(resident_memory_bytes(), self._base)
        if self.device_memory is not None:
            import torch

            self.device_memory.set(
                torch.cuda.memory_allocated(self.device), {"model": self.model, "device": self.device}
            )
