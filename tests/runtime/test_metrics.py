"""runtime/metrics.py with prometheus_client: series values, and `promtool check metrics` passes."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.metrics import LATENCY_BUCKETS, EngineMetrics, PrometheusMetrics
from runtime.types import EngineStats, IterationStats, RequestStats


def _request(steps: int, reason: str = "length", total_s: float = 0.004) -> RequestStats:
    return RequestStats(
        request_id="r", queue_time_s=0.0005, ttft_s=0.002, itl_s=[0.001, 0.0012], total_s=total_s,
        steps=steps, experts=2, policy_reason="explicit", prompt_tokens=5, generated_tokens=3,
        finish_reason=reason,
    )  # fmt: skip


def _iteration(kv_used: int) -> IterationStats:
    return IterationStats(
        batch_size=2, num_prefill=1, num_decode=1, steps_histogram={2: 1, 4: 1},
        expert_token_counts=[3, 0, 1],
        kv_used_bytes=kv_used, kv_capacity_bytes=1000, num_waiting=1, num_running=2, duration_s=0.001,
    )  # fmt: skip


def _samples(text: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def fed() -> tuple[PrometheusMetrics, EngineMetrics]:
    factory = PrometheusMetrics()
    m = EngineMetrics("tiny", factory)
    m(_request(2))
    m(_request(4, "stop", total_s=0.03))
    m(_iteration(kv_used=400))
    return factory, m


def test_series_carry_the_engine_stats(fed):
    factory, m = fed
    s = _samples(factory.render())
    assert s[("leanserve_requests_total", (("finish_reason", "length"), ("model", "tiny")))] == 1
    assert s[("leanserve_requests_total", (("finish_reason", "stop"), ("model", "tiny")))] == 1
    # Millisecond buckets: a 4 ms request lands in le=0.005 but not le=0.003.
    lat = (("le", "0.005"), ("model", "tiny"), ("steps", "2"))
    assert s[("leanserve_request_latency_seconds_bucket", lat)] == 1
    assert (
        s[("leanserve_request_latency_seconds_bucket", (("le", "0.003"), ("model", "tiny"), ("steps", "2")))]
        == 0
    )
    assert s[("leanserve_inter_token_latency_seconds_count", (("model", "tiny"), ("steps", "4")))] == 2
    assert s[("leanserve_ode_steps_bucket", (("le", "2.0"), ("model", "tiny")))] == 1
    assert s[("leanserve_ode_steps_bucket", (("le", "4.0"), ("model", "tiny")))] == 2
    assert s[("leanserve_generated_tokens_total", (("model", "tiny"),))] == 6
    assert s[("leanserve_prompt_tokens_total", (("model", "tiny"),))] == 10
    assert s[("leanserve_expert_tokens_total", (("expert", "0"), ("model", "tiny")))] == 3
    assert ("leanserve_expert_tokens_total", (("expert", "1"), ("model", "tiny"))) not in s
    assert s[("leanserve_kv_cache_bytes", (("model", "tiny"), ("state", "used")))] == 400
    assert s[("leanserve_kv_cache_bytes", (("model", "tiny"), ("state", "capacity")))] == 1000
    assert s[("leanserve_num_requests_running", (("model", "tiny"),))] == 2
    assert s[("leanserve_process_resident_memory_bytes", (("model", "tiny"),))] > 1e6
    # An idle engine emits no iterations: refresh() brings the gauges back to the snapshot.
    m.refresh(EngineStats("running", "tiny", "torch", 0, 0, 0, 1000, 10, 5, 2, 6, 4))
    s = _samples(factory.render())
    assert s[("leanserve_kv_cache_bytes", (("model", "tiny"), ("state", "used")))] == 0
    assert s[("leanserve_num_requests_running", (("model", "tiny"),))] == 0


def test_latency_buckets_resolve_milliseconds():
    assert LATENCY_BUCKETS[0] <= 0.001 and all(
        b - a < 0.0051 for a, b in zip(LATENCY_BUCKETS[:8], LATENCY_BUCKETS[1:8])
    )


def test_promtool_check_metrics_passes(fed):
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    text = fed[0].render()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_prediction_error_is_a_histogram_of_measured_over_predicted():
    factory = PrometheusMetrics()
    m = EngineMetrics("tiny", factory)
    for total, predicted, reason in ((0.011, 0.010, "length"), (0.019, 0.020, "stop"), (0.5, 0.01, "error")):
        r = _request(3, reason, total_s=total)
        r.predicted_s = predicted
        m(r)
    m(_request(3))  # no prediction: not observed
    s = _samples(factory.render())
    labels = (("model", "tiny"), ("steps", "3"))
    assert s[("leanserve_latency_prediction_ratio_count", labels)] == 2  # failed requests say nothing
    assert s[("leanserve_latency_prediction_ratio_bucket", (("le", "1.0"), *labels))] == 1  # 0.95
    assert s[("leanserve_latency_prediction_ratio_bucket", (("le", "1.1"), *labels))] == 2  # 1.1
    assert s[("leanserve_latency_prediction_ratio_sum", labels)] == pytest.approx(1.1 + 0.95)
