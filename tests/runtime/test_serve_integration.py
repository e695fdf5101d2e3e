"""Integration tier: a real Ray Serve (once per module), real gRPC/openai clients, real Prometheus.

One in-process Ray with Serve's gRPC and HTTP proxies is started by the
session fixture `server` on free 127.0.0.1 ports and always shut down. The
app serves a tiny model trained here (20 iterations), with a deliberately
small engine queue (max_batch_size=2, max_waiting=2) so a burst overflows it.
Ray's metric report interval is shortened to 1 s so metric checks are quick.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from runtime.client import Client, build_request
from tests.helpers import local_serve

pytestmark = pytest.mark.integration

MAX_BATCH, MAX_WAITING = 2, 2


def _wait(predicate, timeout_s: float, interval_s: float = 0.5) -> Any:
    """Poll `predicate` until it returns something truthy; bounded in time."""
    end, last = time.monotonic() + timeout_s, None
    while time.monotonic() < end:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    return last


def _http_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


# Module scope: Ray is shut down before the next module (deploy, loadtest) starts its own.
@pytest.fixture(scope="module")
def server(tiny_model_dir, free_port, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Ray + Serve + the leanserve app, once for this module; always shut down."""
    args = {
        "model_dir": str(tiny_model_dir),
        "threads": 1,
        "engine": {"max_batch_size": MAX_BATCH, "max_waiting": MAX_WAITING},
        # Let the whole burst reach the engine, whose bounded queue must reject the excess.
        "deployment": {"max_ongoing_requests": 64, "health_check_period_s": 2},
    }
    with local_serve(free_port, args, "lsray", system_config={"metrics_report_interval_ms": 1000}) as ports:
        client = Client(f"127.0.0.1:{ports['grpc']}")
        yield {**ports, "client": client, "target": f"127.0.0.1:{ports['grpc']}"}
        client.close()


def _req(client: Client, prompt: str = "God said", **kw: Any) -> Any:
    kw.setdefault("max_tokens", 12)
    kw.setdefault("steps", 2)
    return build_request(client.pb2, prompt, **kw)


def test_health_check_serving_after_start(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server["target"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "leanserve.v1.TextGeneration"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert _http_json(f"http://127.0.0.1:{server['http']}/healthz") == {"ready": True}


def test_health_watch_streams_status_until_cancelled(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server["target"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service, want in (("", "SERVING"), ("nope", "SERVICE_UNKNOWN")):
            call = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
            first = next(call)
            assert health_pb2.HealthCheckResponse.ServingStatus.Name(first.status) == want
            call.cancel()
            with pytest.raises(grpc.RpcError) as err:
                next(call)
            assert err.value.code() is grpc.StatusCode.CANCELLED
        # The replica keeps answering after the watches went away.
        resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_model_info(server):
    info = server["client"].model_info()
    assert (info.name, info.min_steps, info.max_steps, info.ffn) == ("serve-tiny", 2, 4, "moe")
    assert list(info.experts_top_k_options) == [1, 2]
    assert {t.name for t in info.quality_tiers} == {"fast", "balanced", "best"}


def test_unary_and_stream_give_the_same_text_for_the_same_seed(server):
    client = server["client"]
    kw = dict(max_tokens=16, temperature=0.9, seed=11, steps=3)
    unary = client.generate(_req(client, **kw), timeout=60)
    deltas = list(client.stream(_req(client, **kw), timeout=60))
    assert len(deltas) > 1 and deltas[-1].finish_reason != 0
    assert all(d.finish_reason == 0 for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == unary.text
    assert [t for d in deltas for t in d.token_ids] == list(unary.token_ids)
    assert unary.usage.completion_tokens == len(unary.token_ids) > 0
    assert unary.compute.steps == 3 and unary.compute.policy_reason == "explicit"
    assert unary.compute.experts == 2  # the model's maximum top-k
    assert 0 < unary.timings.first_token_s <= unary.timings.total_s


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"prompt": ""}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": 2**63}, "seed"),
        ({"steps": 1}, "steps"),
        ({"steps": 99}, "steps"),
        ({"quality": "ultra"}, "quality"),
        ({"latency_budget_ms": -5.0}, "latency_budget_ms"),
        ({"experts_top_k": 3}, "experts_top_k"),
        ({"expert_depth": 1}, "expert_depth"),
        ({"stop_token_ids": [99999]}, "stop_token_ids"),
    ],
)
def test_each_invalid_field_is_invalid_argument_naming_it(server, fields, name):
    client = server["client"]
    kw: dict[str, Any] = {"steps": 2, "max_tokens": 4}
    prompt = fields.pop("prompt", "God said")
    stop_ids = fields.pop("stop_token_ids", None)
    kw.update(fields)
    msg = build_request(client.pb2, prompt, **kw)
    if stop_ids:
        msg.sampling.stop_token_ids.extend(stop_ids)
    for call in (client.generate, lambda m, timeout: list(client.stream(m, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(msg, timeout=30)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert name in err.value.details()
    # ...and the server still answers (unseeded sampling may draw end-of-text first).
    assert 1 <= client.generate(_req(client, max_tokens=2), timeout=30).usage.completion_tokens <= 2


def test_burst_beyond_the_queue_is_resource_exhausted_and_nothing_else_fails(server):
    client = server["client"]
    n = 3 * (MAX_BATCH + MAX_WAITING)
    reqs = [_req(client, max_tokens=40, steps=4, request_id=f"burst-{i}") for i in range(n)]
    futures = [client.stub.Generate.future(r, timeout=120) for r in reqs]
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
            if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "queue" in e.details().lower() or "full" in e.details().lower(), e.details()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1, codes
    assert codes.count(grpc.StatusCode.OK) >= MAX_BATCH + MAX_WAITING - 1, codes
    assert 1 <= client.generate(_req(client, max_tokens=2), timeout=30).usage.completion_tokens <= 2


def test_deadline_shorter_than_the_work_is_deadline_exceeded(server):
    client = server["client"]
    with pytest.raises(grpc.RpcError) as err:
        client.generate(_req(client, max_tokens=60, steps=4), timeout=0.02)
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as err:
        list(client.stream(_req(client, max_tokens=60, steps=4), timeout=0.05))
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # Documented: without explicit compute, the deadline is the latency budget of the step policy
    # (this model has no calibrated cost model, so the policy says so and uses the default).
    resp = client.generate(build_request(client.pb2, "God said", max_tokens=4), timeout=30)
    assert resp.compute.policy_reason.startswith("latency_budget"), resp.compute.policy_reason
    # Explicit compute wins over the deadline.
    assert (
        client.generate(_req(client, max_tokens=2, steps=3), timeout=30).compute.policy_reason == "explicit"
    )


def _scrape(port: int) -> dict[str, float]:
    """Ray's metrics endpoint -> {'name{labels}': value} for the leanserve series."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("ray_leanserve_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _kv_used(port: int) -> float | None:
    values = [
        v
        for k, v in _scrape(port).items()
        if k.startswith("ray_leanserve_kv_cache_bytes{") and 'state="used"' in k
    ]
    return values[0] if values else None


def test_cancelled_stream_frees_kv(server):
    client = server["client"]
    http = f"http://127.0.0.1:{server['http']}/stats"
    assert _wait(lambda: _http_json(http)["num_running"] == 0, 30)
    idle = _http_json(http)["kv_used_bytes"]
    assert _wait(lambda: _kv_used(server["metrics"]) == idle, 30), "kv metric never reached idle"
    call = client.stream(_req(client, max_tokens=60, steps=4), timeout=120)
    next(call)
    next(call)
    assert _http_json(http)["kv_used_bytes"] > idle  # the live request holds KV
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() is grpc.StatusCode.CANCELLED
    assert _wait(
        lambda: _http_json(http)["kv_used_bytes"] == idle and _http_json(http)["num_running"] == 0, 30
    )
    assert _wait(lambda: _kv_used(server["metrics"]) == idle, 30), "kv metric did not return to idle"


def test_openai_client_completions_and_streaming(server):
    import openai

    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{server['http']}/v1", api_key="unused", max_retries=0)
    models = oa.models.list()
    assert [m.id for m in models.data] == ["serve-tiny"]
    kw: dict[str, Any] = dict(model="serve-tiny", prompt="God said", max_tokens=10, temperature=0.7, seed=5)
    done = oa.completions.create(**kw, extra_body={"steps": 2})
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens > 0
    assert done.model_extra["leanserve"]["steps"] == 2
    chunks = list(oa.completions.create(**kw, stream=True, extra_body={"steps": 2}))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(**{**kw, "temperature": -1})
    assert err.value.status_code == 400 and "temperature" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(**kw, extra_body={"steps": 99})


def test_prometheus_server_scrapes_latency_and_steps_histograms(server, tmp_path, free_port):
    client = server["client"]
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: leanserve\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server['metrics']}']\n"
    )
    proc = subprocess.Popen(
        [
            "/usr/bin/prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for steps in (2, 4, 4):
            client.generate(_req(client, max_tokens=6, steps=steps, request_id=f"prom-{steps}-{time.time()}"))

        def query(promql: str) -> list[dict[str, Any]]:
            url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
            with contextlib.suppress(OSError, ValueError):
                body = _http_json(url, timeout=5)
                return body["data"]["result"] if body.get("status") == "success" else []
            return []

        latency = _wait(
            lambda: query('sum by (steps) (ray_leanserve_request_latency_seconds_count{steps="4"})'), 90, 1.0
        )
        assert latency and float(latency[0]["value"][1]) >= 2, latency
        p99 = query("histogram_quantile(0.99, sum by (le) (ray_leanserve_request_latency_seconds_bucket))")
        assert p99 and 0 < float(p99[0]["value"][1]) < 60, p99
        steps = _wait(lambda: query('sum by (le) (ray_leanserve_ode_steps_bucket{le="2.0"})'), 30, 1.0)
        assert steps and float(steps[0]["value"][1]) >= 1, steps
        four = query(
            'sum(ray_leanserve_ode_steps_bucket{le="4.0"}) - sum(ray_leanserve_ode_steps_bucket{le="3.0"})'
        )
        assert four and float(four[0]["value"][1]) >= 2, four
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_bench_serve_pairs_bare_unary_and_stream_rounds(server, tiny_model_dir, capsys):
    """`leanserve bench serve`'s measurement on this server: every path timed each round, the
    replica's engine time inside the unary wall time, and every table row printed."""
    import math

    from runtime.bench_serve import BareEngine, measure_paired, report

    bare = BareEngine(str(tiny_model_dir), {"max_batch_size": 2, "max_waiting": 2}, threads=1)
    try:
        samples = measure_paired(server["client"], bare, steps=2, new_tokens=4, runs=2, warmup=1)
    finally:
        bare.close()
    assert len(samples.bare) == len(samples.unary) == len(samples.unary_engine) == len(samples.stream) == 2
    assert all(0 < engine < wall for engine, wall in zip(samples.unary_engine, samples.unary))
    assert all(1 <= n <= 4 for n in samples.unary_tokens) and len(samples.unary_tokens) == 2
    assert math.isfinite(report(samples, stream_interval=1))
    out = capsys.readouterr().out
    rows = ("bare engine", "gRPC unary via Ray proxy", "of which replica engine", "gRPC stream", "transport")
    assert all(row in out for row in rows), out


def _http(port: int, path: str, raw: bytes | None = None, method: str = "POST") -> tuple[int, Any]:
    """(status, JSON body) of one HTTP call; error statuses are returned, not raised."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=raw, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_client_list_prompts_n_logprobs_echo_and_usage(server, tiny_model_dir):
    import openai

    from models.tokenizer import load_tokenizer

    oa = openai.OpenAI(base_url=f"http://127.0.0.1:{server['http']}/v1", api_key="unused", max_retries=0)
    kw: dict[str, Any] = dict(
        model="serve-tiny", max_tokens=4, temperature=0.8, seed=3, extra_body={"steps": 2}
    )
    # At most two choices per call: the fixture's engine queue holds two waiting requests.
    done = oa.completions.create(prompt=["God said", "In the beginning"], logprobs=2, **kw)
    assert [c.index for c in done.choices] == [0, 1]
    for choice in done.choices:
        lp = choice.logprobs
        assert lp is not None and 1 <= len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) <= 4
        assert all(t in top and 2 <= len(top) <= 3 for t, top in zip(lp.tokens, lp.top_logprobs, strict=True))
        assert all(x <= 0 for x in lp.token_logprobs) and lp.text_offset == sorted(lp.text_offset)
    assert done.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in done.choices)
    # One prompt, n=2: two choices, the prompt counted once.
    two = oa.completions.create(prompt="God said", n=2, **kw)
    alone = oa.completions.create(prompt="God said", **kw)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == alone.choices[0].text
    assert two.usage.prompt_tokens == alone.usage.prompt_tokens
    # Token-id prompts with echo: the prompt is decoded in front of the completion.
    prompt = load_tokenizer(tiny_model_dir / "tokenizer.json").decode([65, 66, 67])
    ids = oa.completions.create(prompt=[[65, 66, 67]], echo=True, **kw)
    assert ids.choices[0].text.startswith(prompt) and ids.usage.prompt_tokens == 3
    # Streaming two choices, with the usage of the whole request in a last chunk.
    usage = {"include_usage": True}
    chunks = list(oa.completions.create(prompt="God said", n=2, stream=True, stream_options=usage, **kw))
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
    assert texts[0] == two.choices[0].text and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == two.usage.completion_tokens
    # Fields that would change the output and are not implemented are refused by name.
    for bad in ({"suffix": "x"}, {"best_of": 3}, {"echo": True, "logprobs": 1}, {"logprobs": 21}):
        with pytest.raises(openai.BadRequestError) as err:
            oa.completions.create(prompt="God said", **{**kw, **bad})
        assert err.value.status_code == 400 and err.value.param == next(iter(bad)), err.value.body


def test_http_bad_bodies_are_openai_shaped_client_errors(server):
    port = server["http"]
    ok = b'{"prompt": "God said", "max_tokens": 2, "steps": 2'
    cases = [
        ("/nope", b"{}", "POST", 404, None),
        ("/v1/completions", None, "GET", 405, None),
        ("/v1/models", b"{}", "POST", 405, None),
        ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, "POST", 400, "body"),
        ("/v1/completions", b'{"prompt": "' + b"a" * (2**20) + b'"}', "POST", 413, "body"),
        ("/v1/completions", b"{", "POST", 400, "body"),
        ("/v1/completions", b'{"prompt": "\\ud800"}', "POST", 400, "prompt"),
        ("/v1/completions", ok + b', "quality": ["fast"]}', "POST", 400, "quality"),
        ("/v1/completions", ok + b', "temperature": 1' + b"0" * 400 + b"}", "POST", 400, "temperature"),
        ("/v1/completions", ok + b', "logit_bias": {"x": 1}}', "POST", 400, "logit_bias"),
        ("/v1/completions", ok + b', "n": 17}', "POST", 400, "n"),
        ("/v1/completions", ok + b', "user": 5}', "POST", 400, "user"),
    ]
    for path, raw, method, status, param in cases:
        got, body = _http(port, path, raw, method)
        assert got == status, (path, raw[:60] if raw else raw, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["param"] == param, body
    # null means absent, for every optional field; user and priority reach the engine.
    nulls = b', "n": null, "stream": null, "stop": null, "logprobs": null, "stream_options": null}'
    got, body = _http(port, "/v1/completions", ok + nulls)
    assert got == 200 and len(body["choices"]) == 1, body
    got, body = _http(port, "/v1/completions", ok + b', "user": "alice", "priority": 1}')
    assert got == 200 and body["usage"]["completion_tokens"] >= 1, body
