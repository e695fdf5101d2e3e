"""Integration tier of issue 17: a served replica against hostile and greedy clients.

One Ray Serve (module scope, 127.0.0.1 only, always shut down) serves the tiny
test model with an API key, so every call here also checks the key. Each test
ends by checking that the replica still serves.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from models.tokenizer import EOT_TOKEN
from runtime.client import build_request
from runtime.proto_build import load_stubs
from tests.helpers import local_serve

pytestmark = pytest.mark.integration

KEY = "test-key-0123"
AUTH = [("authorization", f"Bearer {KEY}")]
MAX_BATCH = 2


@pytest.fixture(scope="module")
def server(tiny_model_dir, free_port) -> Iterator[dict[str, Any]]:
    args = {
        "model_dir": str(tiny_model_dir),
        "threads": 1,
        "api_key": KEY,
        "engine": {"max_batch_size": MAX_BATCH, "max_waiting": 128, "fair_quantum": 16},
        "deployment": {"max_ongoing_requests": 200},
    }
    with local_serve(free_port, args, "lsharden") as ports:
        pb2, pb2_grpc = load_stubs()
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
        yield {**ports, "pb2": pb2, "stub": pb2_grpc.TextGenerationStub(channel), "channel": channel}
        channel.close()


def _req(pb2: Any, prompt: str = "God said", **kw: Any) -> Any:
    kw.setdefault("max_tokens", 4)
    kw.setdefault("steps", 2)
    return build_request(pb2, prompt, **kw)


def _still_serving(server: dict[str, Any]) -> None:
    out = server["stub"].Generate(_req(server["pb2"], max_tokens=2), timeout=30, metadata=AUTH)
    assert 1 <= out.usage.completion_tokens <= 2


def _http(server: dict[str, Any], path: str, body: Any = None, key: str | None = KEY) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"http://127.0.0.1:{server['http']}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# --- who may call ---------------------------------------------------------------------------
def test_api_key_is_required_except_for_health(server):
    pb2, stub = server["pb2"], server["stub"]
    for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", KEY)]):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(_req(pb2), timeout=30, metadata=metadata)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(_req(pb2), timeout=30, metadata=metadata))
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=30)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=30, metadata=AUTH).name == "serve-tiny"
    from runtime.client import Client

    client = Client(f"127.0.0.1:{server['grpc']}", api_key=KEY)  # what `leanserve generate --server` uses
    try:
        assert client.model_info().name == "serve-tiny"
        assert client.generate(_req(pb2), timeout=30).usage.completion_tokens >= 1
    finally:
        client.close()

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(server["channel"])
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    status, body = _http(server, "/v1/completions", {"prompt": "God", "max_tokens": 2}, key="nope")
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert _http(server, "/healthz", key=None) == (200, {"ready": True})
    status, body = _http(server, "/v1/completions", {"prompt": "God", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert _http(server, "/stats", key=None)[0] == 401
    status, stats = _http(server, "/stats")
    assert status == 200 and stats["rss_bytes"] > 10 * 2**20 and stats["state"] == "running"


# --- inputs that used to take the replica down or leak internals -----------------------------
@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1e-45},
        {"temperature": 1.0, "top_p": 1e-45},
        {"temperature": 3e38},
        {"top_k": 2**32 - 1},
    ],
)
def test_float32_edge_values_are_served_or_refused_never_fatal(server, sampling):
    pb2, stub = server["pb2"], server["stub"]
    msg = _req(pb2)
    for k, v in sampling.items():
        setattr(msg.sampling, k, v)
    try:
        out = stub.Generate(msg, timeout=30, metadata=AUTH)
        assert out.usage.completion_tokens >= 1
    except grpc.RpcError as e:
        assert e.code() is grpc.StatusCode.INVALID_ARGUMENT, e.details()
        assert next(iter(sampling)) in e.details()
    _still_serving(server)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda m: setattr(m, "request_id", "r" * 1_000_000), "request_id"),
        (lambda m: setattr(m, "prompt", "x" * 1_000_000), "prompt"),
        (lambda m: m.sampling.stop.extend(["s"] * 100), "stop"),
        (lambda m: m.sampling.stop.append("s" * 10_000), "stop"),
        (lambda m: m.sampling.logit_bias.update({3: 1e9}), "logit_bias"),
        (lambda m: setattr(m.sampling, "logprobs", 1000), "logprobs"),
        (lambda m: setattr(m, "priority", 10**6), "priority"),
    ],
)
def test_oversized_and_out_of_range_fields_are_invalid_argument(server, mutate, field):
    pb2, stub = server["pb2"], server["stub"]
    msg = _req(pb2)
    mutate(msg)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(msg, timeout=30, metadata=AUTH)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details() and len(err.value.details()) < 500
    _still_serving(server)


def test_a_message_over_the_limit_is_refused_by_the_proxy_not_internal(server):
    msg = _req(server["pb2"], prompt="x" * (5 * 2**20))
    with pytest.raises(grpc.RpcError) as err:
        server["stub"].Generate(msg, timeout=60, metadata=AUTH)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    _still_serving(server)


def test_malformed_protobuf_is_invalid_argument(server):
    raw = server["channel"].unary_unary(
        "/leanserve.v1.TextGeneration/Generate", request_serializer=None, response_deserializer=None
    )
    good = _req(server["pb2"]).SerializeToString()
    for data in (b"\xff\xff\xff\xff", good[:-3], b"\x0a\x02\xc3\x28"):  # junk, truncated, bad UTF-8
        with pytest.raises(grpc.RpcError) as err:
            raw(data, timeout=30, metadata=AUTH)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (data, err.value.details())
        assert "GenerateRequest" in err.value.details()
    _still_serving(server)


def test_prompt_spelling_a_control_token_is_text(server):
    """`<|endoftext|>` typed into a prompt is text: counted as several tokens, never a boundary."""
    pb2, stub = server["pb2"], server["stub"]
    plain = stub.Generate(_req(pb2, prompt="God"), timeout=30, metadata=AUTH)
    spelled = stub.Generate(_req(pb2, prompt=f"God{EOT_TOKEN}"), timeout=30, metadata=AUTH)
    assert spelled.usage.prompt_tokens > plain.usage.prompt_tokens + 1


def test_completions_echo_keeps_a_spelled_control_token(server):
    prompt = f"God said{EOT_TOKEN}and"
    status, body = _http(server, "/v1/completions", {"prompt": prompt, "max_tokens": 3, "echo": True})
    assert status == 200, body
    assert body["choices"][0]["text"].startswith(prompt)
    _, plain = _http(server, "/v1/completions", {"prompt": "God saidand", "max_tokens": 1})
    assert body["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 1  # spelled out, not id 0


def test_logprobs_over_grpc(server):
    pb2, stub = server["pb2"], server["stub"]
    msg = _req(pb2, max_tokens=5, temperature=0.0)
    msg.sampling.logprobs = 3
    out = stub.Generate(msg, timeout=30, metadata=AUTH)
    assert len(out.logprobs) == len(out.token_ids) > 0
    for lp, token in zip(out.logprobs, out.token_ids):
        assert lp.token.token_id == token and len(lp.top) == 3 and lp.top[0].token_id == token


# --- fairness --------------------------------------------------------------------------------
def test_one_clients_burst_does_not_starve_another(server):
    """Client A holds 40 long streams; client B's short request waits for one admission, not 40.

    Bound: B's queue time is below a quarter of the median queue time of A's requests
    (strict FCFS would put B behind all 40, i.e. above their median).
    """
    pb2, stub = server["pb2"], server["stub"]
    a_meta = [*AUTH, ("x-leanserve-client", "A")]
    b_meta = [*AUTH, ("x-leanserve-client", "B")]
    a_calls = [
        stub.Generate.future(_req(pb2, max_tokens=24, request_id=f"a{i}", temperature=0.0), timeout=240,
                             metadata=a_meta)
        for i in range(40)
    ]  # fmt: skip
    time.sleep(1.0)  # A's burst reaches the replica's queue first
    b = stub.Generate(_req(pb2, max_tokens=4, request_id="b0"), timeout=240, metadata=b_meta)
    a = [f.result() for f in a_calls]
    a_queue = statistics.median(r.timings.queue_s for r in a)
    print(f"fairness: B queued {b.timings.queue_s * 1000:.0f} ms, A median {a_queue * 1000:.0f} ms")
    assert b.timings.queue_s < a_queue / 4
    _still_serving(server)
