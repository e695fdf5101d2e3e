"""Ray Serve's proxies: a request cut off by its replica's death ends UNAVAILABLE / HTTP 503.

The contract (runtime/grpc_servicer.py) says a request the server could not
finish for reasons of its own, not the client's, is UNAVAILABLE, which
clients retry. Ray 2.60's proxies map only `DeploymentUnavailableError` to
UNAVAILABLE / 503; a replica that dies mid-request surfaces as
`RayActorError` (`ActorDiedError` over actor calls, `ActorUnavailableError`
over the proxy-to-replica gRPC transport) and became INTERNAL / a bare 500.

Two changes, both installed in the proxy actor by the servicer function Ray's
gRPC proxy imports there (`runtime.grpc_servicer.add_text_generation_servicer`;
the HTTP proxy runs in the same actor):

* `install` wraps the proxy module's two status mappers so that a replica's
  death (a `RayActorError` that is not a task error raised by our own code)
  maps to UNAVAILABLE / 503 with a message that says to retry.
* `make_unavailable_retryable` makes unary calls that end UNAVAILABLE end
  with `context.abort`: Ray's proxy sets the code and returns an empty
  message, and grpc.aio then sends headers and a message, which commits the
  call on the client side so that its retry policy can no longer retry it.

Ray has no public hook for either, so this patches private names of Ray
2.60 (`ray.serve._private.proxy.get_grpc_response_status`,
`get_http_response_status`, `gRPCGenericServer.service_handler_factory`);
`tests/runtime/test_proxy_errors.py` fails if an upgrade moves them.
"""

from __future__ import annotations

from typing import Any

import grpc

REPLICA_DIED = "the replica serving request {request_id} died or became unreachable; retry it"


def is_replica_death(exc: BaseException) -> bool:
    """True for Ray's "the actor is gone" errors, not for exceptions our handlers raised."""
    from ray.exceptions import RayActorError, RayTaskError

    return isinstance(exc, RayActorError) and not isinstance(exc, RayTaskError)


def install() -> None:
    """Map replica deaths to UNAVAILABLE / 503 in this process's Serve proxy (idempotent)."""
    from ray.serve._private import proxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    if getattr(proxy, "_leanserve_replica_death_mapped", False):
        return
    grpc_status, http_status = proxy.get_grpc_response_status, proxy.get_http_response_status

    def get_grpc_response_status(exc: BaseException, timeout_s: Any, request_id: str) -> Any:
        if is_replica_death(exc):
            message = REPLICA_DIED.format(request_id=request_id)
            return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=message)
        return grpc_status(exc, timeout_s, request_id)

    def get_http_response_status(exc: BaseException, timeout_s: Any, request_id: str) -> Any:
        if is_replica_death(exc):  # 503: a code whose message the proxy sends as the body
            return ResponseStatus(code=503, is_error=True, message=REPLICA_DIED.format(request_id=request_id))
        return http_status(exc, timeout_s, request_id)

    proxy.get_grpc_response_status = get_grpc_response_status
    proxy.get_http_response_status = get_http_response_status
    proxy._leanserve_replica_death_mapped = True


def _abort_unavailable_unary(handler: Any) -> Any:
    async def unary_unary(request_proto: Any, context: Any) -> Any:
        response = await handler(request_proto, context)
        if context.code() == grpc.StatusCode.UNAVAILABLE:  # a returned message commits the call
            await context.abort(grpc.StatusCode.UNAVAILABLE, context.details() or "unavailable")
        return response

    return unary_unary


def make_unavailable_retryable(server: Any) -> None:
    """Make `server`'s unary handlers end UNAVAILABLE calls with `abort` (idempotent).

    Args:
        server: Ray's `gRPCGenericServer` (anything else is left alone).
    """
    from ray.serve._private.proxy_request_response import gRPCStreamingType

    factory = getattr(server, "service_handler_factory", None)
    if factory is None or getattr(factory, "_leanserve_wrapped", False):
        return

    def service_handler_factory(service_method: str, streaming_type: Any) -> Any:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if streaming_type == gRPCStreamingType.UNARY_UNARY:
            return _abort_unavailable_unary(handler)
        return handler

    service_handler_factory._leanserve_wrapped = True  # type: ignore[attr-defined]
    server.service_handler_factory = service_handler_factory
