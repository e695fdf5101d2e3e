"""The client's gRPC retry policy against a real grpcio server on 127.0.0.1 (no Ray).

The server fails the first `fail_first` calls of each method with a chosen status
(UNAVAILABLE by default), then answers. gRPC's own retry machinery (the service
config of `runtime.client.channel_options`) must turn those failures into one
successful call on the client, for the unary methods and for a stream that failed
before its first message; never for a stream that already sent a delta, and never
for a code other than UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from runtime.client import (
    DEFAULT_MAX_ATTEMPTS,
    RETRIED_METHODS,
    SERVICE,
    Client,
    build_request,
    channel_options,
    retry_service_config,
)
from runtime.proto_build import load_stubs

pb2, pb2_grpc = load_stubs()


class FlakyServicer(pb2_grpc.TextGenerationServicer):
    """Fails the first `fail_first` calls of every method with `code`, then serves.

    `fail_after_first_message`: GenerateStream sends one delta before failing.
    """

    def __init__(self, fail_first: int, code: grpc.StatusCode, fail_after_first_message: bool) -> None:
        self.fail_first = fail_first
        self.code = code
        self.fail_after_first_message = fail_after_first_message
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def _failing(self, method: str) -> bool:
        with self.lock:
            self.calls[method] += 1
            return self.calls[method] <= self.fail_first

    def Generate(self, request: Any, context: Any) -> Any:  # noqa: N802 - the RPC's name
        if self._failing("Generate"):
            context.abort(self.code, "replica gone")
        return pb2.GenerateResponse(text="ok", token_ids=[1], finish_reason=pb2.FINISH_REASON_LENGTH)

    def GetModelInfo(self, request: Any, context: Any) -> Any:  # noqa: N802
        if self._failing("GetModelInfo"):
            context.abort(self.code, "replica gone")
        return pb2.ModelInfo(name="flaky", min_steps=2, max_steps=4)

    def GenerateStream(self, request: Any, context: Any) -> Iterator[Any]:  # noqa: N802
        failing = self._failing("GenerateStream")
        if failing and not self.fail_after_first_message:
            context.abort(self.code, "replica gone")
        yield pb2.GenerateResponse(text="a", token_ids=[1])
        if failing:
            context.abort(self.code, "replica gone mid-stream")
        yield pb2.GenerateResponse(text="b", token_ids=[2], finish_reason=pb2.FINISH_REASON_LENGTH)


@pytest.fixture
def flaky() -> Iterator[Any]:
    """`flaky(fail_first, code=UNAVAILABLE, fail_after_first_message=False)` -> (servicer, target)."""
    servers: list[grpc.Server] = []

    def make(
        fail_first: int,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        fail_after_first_message: bool = False,
    ) -> tuple[FlakyServicer, str]:
        servicer = FlakyServicer(fail_first, code, fail_after_first_message)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb2_grpc.add_TextGenerationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield make
    for server in servers:
        server.stop(0).wait(5)


def _request() -> Any:
    return build_request(pb2, "hello", max_tokens=2)


@pytest.mark.parametrize("fail_first", [1, DEFAULT_MAX_ATTEMPTS - 1])
def test_unary_calls_are_retried_on_unavailable_until_they_succeed(flaky, fail_first: int) -> None:
    servicer, target = flaky(fail_first)
    client = Client(target)
    try:
        assert client.generate(_request(), timeout=20).text == "ok"
        assert client.model_info(timeout=20).name == "flaky"
    finally:
        client.close()
    assert servicer.calls["Generate"] == fail_first + 1
    assert servicer.calls["GetModelInfo"] == fail_first + 1


@pytest.mark.parametrize(
    ("fail_first", "code", "retries", "calls"),
    [
        (100, grpc.StatusCode.UNAVAILABLE, True, DEFAULT_MAX_ATTEMPTS),  # retries stop after max attempts
        (1, grpc.StatusCode.INVALID_ARGUMENT, True, 1),  # other codes are not retried
        (1, grpc.StatusCode.INTERNAL, True, 1),
        (1, grpc.StatusCode.UNAVAILABLE, False, 1),  # retries can be turned off
    ],
)
def test_calls_that_end_in_an_error(
    flaky, fail_first: int, code: grpc.StatusCode, retries: bool, calls: int
) -> None:
    servicer, target = flaky(fail_first=fail_first, code=code)
    client = Client(target, retries=retries)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(_request(), timeout=20)
    finally:
        client.close()
    assert err.value.code() is code
    assert servicer.calls["Generate"] == calls


def test_stream_is_retried_only_before_its_first_message(flaky) -> None:
    servicer, target = flaky(fail_first=2)
    client = Client(target)
    try:
        assert "".join(d.text for d in client.stream(_request(), timeout=20)) == "ab"
    finally:
        client.close()
    assert servicer.calls["GenerateStream"] == 3

    servicer, target = flaky(fail_first=1, fail_after_first_message=True)
    client = Client(target)
    try:
        seen = []
        with pytest.raises(grpc.RpcError) as err:
            for delta in client.stream(_request(), timeout=20):
                seen.append(delta.text)
    finally:
        client.close()
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert seen == ["a"]  # the delta is not repeated by a hidden retry
    assert servicer.calls["GenerateStream"] == 1


def test_aio_channel_with_the_same_options_retries(flaky) -> None:
    """The load tester's channel (`grpc.aio`) gets the same policy."""
    servicer, target = flaky(fail_first=2)

    async def call() -> Any:
        async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
            stub = pb2_grpc.TextGenerationStub(channel)
            return await stub.Generate(_request(), timeout=20)

    assert asyncio.run(call()).text == "ok"
    assert servicer.calls["Generate"] == 3


def test_backoff_grows_but_stays_bounded(flaky) -> None:
    """Four retries with bounds 0.2, 0.4, 0.8, 1.6 s wait at most 3 s in all (gRPC jitters in [0, b])."""
    servicer, target = flaky(fail_first=DEFAULT_MAX_ATTEMPTS - 1)
    client = Client(target)
    try:
        t0 = time.monotonic()
        assert client.generate(_request(), timeout=20).text == "ok"
        elapsed = time.monotonic() - t0
    finally:
        client.close()
    assert elapsed < 3.0 + 1.0


def test_service_config_shape() -> None:
    config = retry_service_config()
    (method_config,) = config["methodConfig"]
    assert {(n["service"], n["method"]) for n in method_config["name"]} == {
        (SERVICE, m) for m in RETRIED_METHODS
    }
    policy = method_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["maxAttempts"] == DEFAULT_MAX_ATTEMPTS
    options = dict(channel_options())
    assert options["grpc.enable_retries"] == 1
    assert json.loads(options["grpc.service_config"]) == config
    assert dict(channel_options(retries=False)) == {"grpc.enable_retries": 0}
    for bad in ({"max_attempts": 1}, {"max_attempts": 6}, {"initial_backoff_s": 0}):
        with pytest.raises(ValueError):
            retry_service_config(**bad)


def test_a_burst_of_failures_on_one_channel_is_all_retried(flaky) -> None:
    """The calls in flight on a killed replica fail together; the throttle must not stop their retries."""
    n = 30
    servicer, target = flaky(fail_first=n)

    async def burst() -> list[Any]:
        async with grpc.aio.insecure_channel(target, options=channel_options()) as channel:
            stub = pb2_grpc.TextGenerationStub(channel)
            return await asyncio.gather(*(stub.Generate(_request(), timeout=20) for _ in range(n)))

    assert [r.text for r in asyncio.run(burst())] == ["ok"] * n
    assert servicer.calls["Generate"] == 2 * n


def test_auth_metadata_from_argument_or_environment(monkeypatch):
    from runtime.client import auth_metadata

    monkeypatch.delenv("LEANSERVE_API_KEY", raising=False)
    assert auth_metadata() == [] and auth_metadata("") == []
    assert auth_metadata("k1") == [("authorization", "Bearer k1")]
    monkeypatch.setenv("LEANSERVE_API_KEY", "k2")
    assert auth_metadata() == [("authorization", "Bearer k2")]
    assert auth_metadata("") == []  # an explicit empty key wins over the environment


def test_build_request_carries_messages_and_truncation() -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ann"}]
    msg = build_request(pb2, "", messages=chat, add_generation_prompt=False, truncate_prompt_tokens=7)
    assert [(m.role, m.content) for m in msg.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert msg.messages[1].name == "ann" and not msg.messages[0].HasField("name")
    assert msg.add_generation_prompt is False and msg.HasField("add_generation_prompt")
    assert msg.sampling.truncate_prompt_tokens == 7 and msg.prompt == ""
    plain = build_request(pb2, "God said")
    assert not plain.messages and not plain.HasField("add_generation_prompt")
    assert not plain.sampling.HasField("truncate_prompt_tokens")
