"""gRPC client of `leanserve.v1.TextGeneration` (used by `leanserve generate --server`).

Plain grpcio, no Ray: the server is Ray Serve's gRPC proxy (one application,
so no `application` metadata is needed). When a timeout is given, it is both
the gRPC deadline and the `x-leanserve-timeout-ms` metadata the server feeds
to the step policy (see runtime/grpc_servicer.py).

Retries. Every channel made here (and the load tester's, loadtest/driver.py)
carries a gRPC service config whose `retryPolicy` retries `UNAVAILABLE`, the
status of a replica that is gone or not ready yet, with exponential backoff:
gRPC's own retry machinery, not a loop in this module. It covers the
idempotent `Generate` and `GetModelInfo` and also `GenerateStream`, which
gRPC retries only while the call is uncommitted, i.e. before the client got
the response headers or a message: a stream that has sent a delta is never
re-run (its text would repeat). Retries stay within the call's deadline; the
`x-leanserve-timeout-ms` metadata is not shortened on a retry, so the server
may allow a retried attempt slightly more time than is left. A throttle
(`retryThrottling`) stops retrying when most calls keep failing, so a dead
cluster is not hammered.

Only a call whose UNAVAILABLE arrives as a trailers-only response can be
retried: a server that sends headers (or a message) first has committed the
call. Ray Serve's gRPC proxy does that for unary calls unless leanserve's
servicer function makes it end UNAVAILABLE calls with `abort()` (issue 17).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import grpc

from runtime.grpc_servicer import TIMEOUT_METADATA_KEY
from runtime.proto_build import load_stubs

SERVICE = "leanserve.v1.TextGeneration"
RETRIED_METHODS = ("Generate", "GetModelInfo", "GenerateStream")
DEFAULT_MAX_ATTEMPTS = 5  # gRPC caps maxAttempts at 5 (first call + 4 retries)


def retry_service_config(
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    initial_backoff_s: float = 0.2,
    max_backoff_s: float = 2.0,
    multiplier: float = 2.0,
) -> dict[str, Any]:
    """gRPC service config retrying `UNAVAILABLE` on the methods in `RETRIED_METHODS`.

    gRPC waits a random time in [0, b] before retry k, with b = initial *
    multiplier^(k-1) capped at `max_backoff_s`; with the defaults the four
    retries wait at most 0.2 + 0.4 + 0.8 + 1.6 = 3.0 s in all.

    Args:
        max_attempts: calls in all, first one included (2..5; gRPC caps it at 5).
        initial_backoff_s: backoff bound before the first retry, seconds.
        max_backoff_s: the largest backoff bound, seconds.
        multiplier: growth of the bound per retry.

    Raises:
        ValueError: an argument out of range (gRPC would ignore the policy silently).
    """
    if not 2 <= max_attempts <= 5:
        raise ValueError(f"max_attempts={max_attempts}: must be in [2, 5] (use retries=False for none)")
    if not (0 < initial_backoff_s <= max_backoff_s and multiplier > 0):
        raise ValueError(
            f"backoff initial={initial_backoff_s}, max={max_backoff_s}, multiplier={multiplier}: "
            "need 0 < initial <= max and multiplier > 0"
        )
    return {
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": m} for m in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": f"{initial_backoff_s}s",
                    "maxBackoff": f"{max_backoff_s}s",
                    "backoffMultiplier": multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        # Per channel: each failed attempt costs 1 token, each success earns 0.1, and retries
        # stop while half of the tokens or fewer are left. 100 tokens let the calls in flight on
        # a killed replica (dozens on one load-test channel) all retry, but a channel whose
        # calls keep failing stops retrying after ~50 net failures.
        "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
    }


API_KEY_ENV = "LEANSERVE_API_KEY"


def auth_metadata(api_key: str | None = None) -> list[tuple[str, str]]:
    """The `authorization` metadata for a server started with `--api-key` ([] without a key).

    Args:
        api_key: the key; None reads the environment variable `LEANSERVE_API_KEY`.
    """
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    return [("authorization", f"Bearer {key}")] if key else []


def channel_options(
    retries: bool = True, max_attempts: int = DEFAULT_MAX_ATTEMPTS, **backoff: float
) -> list[tuple[str, Any]]:
    """Channel options of every leanserve client channel (sync or `grpc.aio`).

    Args:
        retries: False turns gRPC retries off (each call is tried once).
        max_attempts: see `retry_service_config`.
        backoff: `initial_backoff_s`, `max_backoff_s`, `multiplier` of `retry_service_config`.
    """
    if not retries:
        return [("grpc.enable_retries", 0)]
    config = retry_service_config(max_attempts, **backoff)
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


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
    truncate_prompt_tokens: int | None = None,
    messages: list[dict[str, str]] | None = None,
    add_generation_prompt: bool | None = None,
) -> Any:
    """A `GenerateRequest`; None leaves a field unset (server default).

    Args:
        prompt: the text to continue ("" with `messages`).
        messages: a conversation instead of a prompt, `[{"role", "content"[, "name"]}]`,
            rendered by the server with the model's chat template.
        add_generation_prompt: with `messages`: open the assistant's turn (server default: true).
        truncate_prompt_tokens: keep only the last N prompt tokens.
        The others: `SamplingParams` / `ComputeParams` fields of the proto.
    """
    sampling = {
        k: v
        for k, v in dict(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            truncate_prompt_tokens=truncate_prompt_tokens,
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
        messages=[pb2.ChatMessage(**m) for m in messages or []],
    )
    if request_id is not None:
        msg.request_id = request_id
    if add_generation_prompt is not None:
        msg.add_generation_prompt = add_generation_prompt
    return msg


class Client:
    """A small synchronous client.

    Args:
        target: "HOST:PORT" of the gRPC endpoint.
        retries: retry `UNAVAILABLE` with backoff (see the module docstring).
        options: extra channel options, after leanserve's.
        api_key: sent as `authorization: Bearer KEY` (None: `LEANSERVE_API_KEY`, if set).
    """

    def __init__(
        self,
        target: str,
        retries: bool = True,
        options: list[tuple[str, Any]] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.pb2, pb2_grpc = load_stubs()
        self._auth = auth_metadata(api_key)
        self.channel = grpc.insecure_channel(target, options=channel_options(retries) + list(options or []))
        self.stub = pb2_grpc.TextGenerationStub(self.channel)

    def _metadata(self, timeout: float | None) -> list[tuple[str, str]]:
        deadline = [] if timeout is None else [(TIMEOUT_METADATA_KEY, f"{timeout * 1000:.0f}")]
        return self._auth + deadline

    def generate(self, request: Any, timeout: float | None = None) -> Any:
        """Unary `Generate`; raises `grpc.RpcError` with the server's status on failure."""
        return self.stub.Generate(request, timeout=timeout, metadata=self._metadata(timeout))

    def stream(self, request: Any, timeout: float | None = None) -> Iterator[Any]:
        """`GenerateStream`: the call object is an iterator of deltas (`.cancel()` stops it)."""
        return self.stub.GenerateStream(request, timeout=timeout, metadata=self._metadata(timeout))

    def model_info(self, timeout: float | None = 10.0) -> Any:
        """`GetModelInfo`."""
        return self.stub.GetModelInfo(self.pb2.GetModelInfoRequest(), timeout=timeout, metadata=self._auth)

    def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
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
    last = None
    try:
        started = False
        # The prompt is echoed once the server has answered, so an error is never printed after it.
        if args.stream:
            for last in client.stream(req, timeout=args.timeout):
                out.write(last.text if started else args.prompt + last.text)
                started = True
                out.flush()
        else:
            last = client.generate(req, timeout=args.timeout)
            out.write(args.prompt + last.text)
        out.write("\n")
    except grpc.RpcError as e:
        if last is not None:
            out.write("\n")
        out.flush()
        print(f"leanserve generate: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        out.flush()  # the text and its newline before the stats line on stderr
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
