"""gRPC client of `leanserve.v1.TextGeneration` (used by `leanserve generate --server`).

Plain grpcio, no Ray: the server is Ray Serve's gRPC proxy (one application,
so no `application` metadata is needed). When a timeout is given, it is both
the gRPC deadline and the `x-leanserve-timeout-ms` metadata the server feeds
to the step policy (see runtime/grpc_servicer.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import grpc

from runtime.grpc_servicer import TIMEOUT_METADATA_KEY
from runtime.proto_build import load_stubs


def build_request(
    pb2: Any,
    prompt: str,
    *,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    steps: int | None = None,
    quality: str | None = None,
    latency_budget_ms: float | None = None,
    experts_top_k: int | None = None,
    expert_depth: int | None = None,
    request_id: str | None = None,
) -> Any:
    """A `GenerateRequest`; None leaves a field unset (server default)."""
    sampling = {
        k: v
        for k, v in dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        ).items()
        if v is not None
    }
    compute = {
        k: v
        for k, v in dict(
            steps=steps,
            quality=quality,
            latency_budget_ms=latency_budget_ms,
            experts_top_k=experts_top_k,
            expert_depth=expert_depth,
        ).items()
        if v is not None
    }
    msg = pb2.GenerateRequest(
        prompt=prompt,
        sampling=pb2.SamplingParams(stop=stop or [], **sampling),
        compute=pb2.ComputeParams(**compute),
    )
    if request_id is not None:
        msg.request_id = request_id
    return msg


class Client:
    """A small synchronous client.

    Args:
        target: "HOST:PORT" of the gRPC endpoint.
    """

    def __init__(self, target: str) -> None:
        self.pb2, pb2_grpc = load_stubs()
        self.channel = grpc.insecure_channel(target)
        self.stub = pb2_grpc.TextGenerationStub(self.channel)

    @staticmethod
    def _metadata(timeout: float | None) -> list[tuple[str, str]]:
        return [] if timeout is None else [(TIMEOUT_METADATA_KEY, f"{timeout * 1000:.0f}")]

    def generate(self, request: Any, timeout: float | None = None) -> Any:
        """Unary `Generate`; raises `grpc.RpcError` with the server's status on failure."""
        return self.stub.Generate(request, timeout=timeout, metadata=self._metadata(timeout))

    def stream(self, request: Any, timeout: float | None = None) -> Iterator[Any]:
        """`GenerateStream`: the call object is an iterator of deltas (`.cancel()` stops it)."""
        return self.stub.GenerateStream(request, timeout=timeout, metadata=self._metadata(timeout))

    def model_info(self, timeout: float | None = 10.0) -> Any:
        """`GetModelInfo`."""
        return self.stub.GetModelInfo(self.pb2.GetModelInfoRequest(), timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def generate_remote(args: Any) -> int:
    """`leanserve generate PROMPT --server HOST:PORT`: print the text (streamed with --stream)."""
    client = Client(args.server)
    pb2 = client.pb2
    experts: dict[str, int] = {}
    if args.experts is not None:
        # --experts means top-k on MoE models and tree depth on tree models: ask which this is.
        kind = "expert_depth" if client.model_info().ffn == "tree" else "experts_top_k"
        experts[kind] = args.experts
    req = build_request(
        pb2,
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        steps=args.steps,
        quality=args.quality,
        latency_budget_ms=args.latency_budget_ms,
        **experts,
    )
    out = sys.stdout
    try:
        out.write(args.prompt)
        if args.stream:
            last = None
            for last in client.stream(req, timeout=args.timeout):
                out.write(last.text)
                out.flush()
        else:
            last = client.generate(req, timeout=args.timeout)
            out.write(last.text)
        out.write("\n")
    except grpc.RpcError as e:
        print(f"\nleanserve generate: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if last is not None:
        reason = pb2.FinishReason.Name(last.finish_reason)
        print(
            f"[{last.usage.completion_tokens} tokens, steps={last.compute.steps} "
            f"({last.compute.policy_reason}), {reason}, {last.timings.total_s * 1e3:.0f} ms, {args.server}]",
            file=sys.stderr,
        )
    return 0


def generate_main(args: Any) -> int:
    """`leanserve generate`: remote with --server, else the in-process model (runtime.local)."""
    if getattr(args, "server", None):
        return generate_remote(args)
    from runtime.local import generate_local

    return generate_local(args)
