"""runtime/proxy_errors.py against the Ray internals it patches (fails if a Ray upgrade moves them)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve._private import proxy
from ray.serve._private.proxy_request_response import gRPCStreamingType

from runtime import proxy_errors
from runtime.client import channel_options


@pytest.fixture
def patched_proxy(monkeypatch):
    for name in ("get_grpc_response_status", "get_http_response_status"):
        monkeypatch.setattr(proxy, name, getattr(proxy, name))
    monkeypatch.setattr(proxy, "_leanserve_replica_death_mapped", False, raising=False)
    proxy_errors.install()
    return proxy


@pytest.mark.parametrize(
    "exc", [ActorUnavailableError("Actor is unavailable.", b"\0" * 16), ActorDiedError()], ids=type
)
def test_a_dead_replica_maps_to_unavailable_and_503(patched_proxy, exc):
    status = patched_proxy.get_grpc_response_status(exc, None, "req-1")
    assert status.code is grpc.StatusCode.UNAVAILABLE and "retry" in status.message
    assert patched_proxy.get_http_response_status(exc, None, "req-1").code == 503


def test_other_errors_keep_rays_mapping(patched_proxy):
    status = patched_proxy.get_grpc_response_status(ValueError("boom"), None, "req-2")
    assert status.code is grpc.StatusCode.INTERNAL
    assert (
        patched_proxy.get_grpc_response_status(TimeoutError(), 5.0, "r").code
        is grpc.StatusCode.DEADLINE_EXCEEDED
    )
    proxy_errors.install()  # idempotent: wrapping twice would still work, but it does not wrap again
    assert patched_proxy.get_grpc_response_status(ValueError("x"), None, "r").code is grpc.StatusCode.INTERNAL


class _Server:
    """Stands in for Ray's gRPCGenericServer: only its `service_handler_factory` matters."""

    def __init__(self, handlers):
        self.handlers = handlers

    def service_handler_factory(self, service_method: str, streaming_type):
        return self.handlers[streaming_type]


def test_unary_unavailable_ends_with_abort_so_clients_can_retry():
    """Ray's handler sets UNAVAILABLE and returns a message; wrapped, the call is aborted instead,
    and a client with leanserve's retry policy retries it until the replica answers."""
    attempts = []

    async def rays_unary(request, context):  # what Ray's proxy does for a failed request
        attempts.append(1)
        if len(attempts) < 3:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("replica died")
            return b""
        return b"ok"

    async def rays_stream(request, context):
        yield b"s"

    fake = _Server({gRPCStreamingType.UNARY_UNARY: rays_unary, gRPCStreamingType.UNARY_STREAM: rays_stream})
    proxy_errors.make_unavailable_retryable(fake)
    proxy_errors.make_unavailable_retryable(fake)  # idempotent
    unary = fake.service_handler_factory(service_method="/s/m", streaming_type=gRPCStreamingType.UNARY_UNARY)
    stream = fake.service_handler_factory(
        service_method="/s/m", streaming_type=gRPCStreamingType.UNARY_STREAM
    )
    assert stream is rays_stream

    async def scenario() -> bytes:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(unary)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("leanserve.v1.TextGeneration", {"Generate": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
                return await channel.unary_unary("/leanserve.v1.TextGeneration/Generate")(b"", timeout=20)
        finally:
            await server.stop(None)

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == b"ok"
    assert len(attempts) == 3
