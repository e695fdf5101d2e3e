"""Async load driver: open-loop (scheduled) and closed-loop (concurrency) runs.

No coordinated omission: in an open-loop run every request has a scheduled
send time (its offset in the arrival schedule). The dispatcher never waits
for responses, and a request's latencies (TTFT, E2E) are measured from its
*scheduled* time, not from when the sender got round to sending it; if the
client or the server falls behind, the wait is in the numbers.

Measured per request (seconds, relative to the run's start `t0`):

* TTFT = first message carrying text or token ids - scheduled time;
* ITL  = gaps between consecutive token-carrying messages (one per stream delta), each stamped
  when it reached the client: gRPC messages as the stream yields them, HTTP server-sent events
  when the bytes holding them arrived (events that arrive in one read share a time, so a
  server that bunches events shows gaps of 0, as a client reading the stream sees them);
* E2E  = last message (or the error) - scheduled time.

Both transports use a single event loop and one connection: `GrpcTransport`
(`grpc.aio`, `TextGeneration/GenerateStream`) and `HttpTransport`
(OpenAI `/v1/completions` with `stream: true`, via aiohttp). Neither sends
the `x-leanserve-timeout-ms` metadata, so a request without compute fields
gets the server's default policy (a fixed count or the SLO controller), not a
latency budget derived from the client's deadline.

The gRPC channel carries the client's retry policy (`runtime.client.channel_options`):
a call that fails with UNAVAILABLE before its first message (a replica that died
or is not ready) is retried by gRPC with backoff, and its latencies include the
retries, since they are measured from the scheduled time. A stream that already
sent a delta is not retried; its error is what the run records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

CLIENT_CANCELLED = "CLIENT_CANCELLED"  # still running when the run's drain bound expired


@dataclass(frozen=True)
class RequestSpec:
    """What to send.

    Attributes:
        prompt: the prompt text.
        max_tokens: tokens to generate at most.
        temperature: sampling temperature (0 = greedy, so runs are repeatable).
        seed: per-request sampling seed (None = unset).
        compute: `ComputeParams` fields to set (steps, quality, experts_top_k,
            expert_depth, latency_budget_ms); empty = the server's default policy.
    """

    prompt: str
    max_tokens: int = 32
    temperature: float = 0.0
    seed: int | None = None
    compute: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestResult:
    """Timings and outcome of one request; times are seconds from the run's `t0`.

    Attributes:
        index: position in the run.
        scheduled_s: when it should have been sent (open loop) or was sent (closed loop).
        sent_s: when the call was actually started.
        first_token_s: first token-carrying message (None if none arrived).
        end_s: last message, error or cancellation.
        token_times: arrival time of every token-carrying message.
        tokens: completion tokens (the server's usage count when it sent one).
        prompt_tokens: prompt tokens as counted by the server (0 if unknown).
        code: "OK", a gRPC status code name, or `CLIENT_CANCELLED`.
        steps: steps per token the server used (None if unknown).
        experts: expert setting the server used.
        policy_reason: why the server chose those steps.
        detail: the error message when `code` is not "OK" (e.g. which field was invalid).
        drafted_tokens: tokens its self-speculative draft proposed (the server's
            speculation report; 0 when it did not speculate).
        accepted_tokens: drafted tokens the verification accepted.
    """

    index: int
    scheduled_s: float
    sent_s: float = 0.0
    first_token_s: float | None = None
    end_s: float = 0.0
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    code: str = "OK"
    steps: int | None = None
    experts: int | None = None
    policy_reason: str = ""
    detail: str = ""
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def ttft_s(self) -> float | None:
        """Scheduled send to first token."""
        return None if self.first_token_s is None else self.first_token_s - self.scheduled_s

    @property
    def e2e_s(self) -> float:
        """Scheduled send to completion."""
        return self.end_s - self.scheduled_s

    @property
    def itls_s(self) -> list[float]:
        """Gaps between consecutive token messages."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's TPOT): first token message to the
        last, over the tokens after the first. Equal to the mean of `itls_s` when every
        message carries one token; per token when a message carries several (a speculative
        round's). None below two tokens."""
        t = self.token_times
        if self.first_token_s is None or self.tokens < 2 or not t:
            return None
        return (t[-1] - self.first_token_s) / (self.tokens - 1)

    @property
    def send_lag_s(self) -> float:
        """How late the sender was (> 0 means the client fell behind its schedule)."""
        return self.sent_s - self.scheduled_s


class Transport(Protocol):
    """One way of sending a request; `run` fills `result` in place."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def run(self, spec: RequestSpec, result: RequestResult, now: Callable[[], float]) -> None: ...


class GrpcTransport:
    """`GenerateStream` over one `grpc.aio` channel.

    Args:
        target: "HOST:PORT".
        timeout_s: gRPC deadline of each call (enforced by the proxy and the client).
        retries: gRPC's retry policy on UNAVAILABLE (see the module docstring); False
            sends every request once, so each failure shows in the results.
    """

    def __init__(self, target: str, timeout_s: float = 60.0, retries: bool = True) -> None:
        from runtime.proto_build import load_stubs  # the generated stubs, nothing of the engine

        self.pb2, self.pb2_grpc = load_stubs()
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self.channel: grpc.aio.Channel | None = None
        self.stub: Any = None
        self.auth: list[tuple[str, str]] = []

    async def open(self) -> None:
        from runtime.client import auth_metadata, channel_options  # the client's retry policy, shared

        self.auth = auth_metadata()  # LEANSERVE_API_KEY, if set
        self.channel = grpc.aio.insecure_channel(self.target, options=channel_options(self.retries))
        self.stub = self.pb2_grpc.TextGenerationStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    def request(self, spec: RequestSpec) -> Any:
        """The `GenerateRequest` message of a spec."""
        pb2 = self.pb2
        sampling = pb2.SamplingParams(max_tokens=spec.max_tokens, temperature=spec.temperature)
        if spec.seed is not None:
            sampling.seed = spec.seed
        return pb2.GenerateRequest(
            prompt=spec.prompt, sampling=sampling, compute=pb2.ComputeParams(**spec.compute)
        )

    async def model_info(self, timeout_s: float = 10.0) -> Any:
        """`GetModelInfo` (step range, expert options, tiers)."""
        return await self.stub.GetModelInfo(self.pb2.GetModelInfoRequest(), timeout=timeout_s)

    async def run(self, spec: RequestSpec, result: RequestResult, now: Callable[[], float]) -> None:
        call = self.stub.GenerateStream(self.request(spec), timeout=self.timeout_s, metadata=self.auth)
        try:
            last = None
            tokens = 0
            async for msg in call:
                t = now()
                if msg.text or msg.token_ids:
                    if result.first_token_s is None:
                        result.first_token_s = t
                    result.token_times.append(t)
                tokens += len(msg.token_ids)
                last = msg
            result.end_s = now()
            if last is not None:
                result.tokens = last.usage.completion_tokens or tokens
                result.prompt_tokens = last.usage.prompt_tokens
                if last.HasField("compute"):
                    result.steps = last.compute.steps
                    result.experts = last.compute.experts if last.compute.HasField("experts") else None
                    result.policy_reason = last.compute.policy_reason
                    if last.compute.HasField("speculation"):
                        result.drafted_tokens = last.compute.speculation.drafted_tokens
                        result.accepted_tokens = last.compute.speculation.accepted_tokens
        except grpc.aio.AioRpcError as e:
            result.end_s = now()
            result.code = e.code().name
            result.detail = e.details() or ""
        except asyncio.CancelledError:
            call.cancel()  # tell the server to stop working on it
            raise


class HttpTransport:
    """OpenAI `/v1/completions` with `stream: true` (server-sent events), over aiohttp.

    Args:
        base_url: e.g. "http://127.0.0.1:8000".
        timeout_s: whole-request timeout.
    """

    def __init__(self, base_url: str, timeout_s: float = 60.0) -> None:
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.timeout_s = timeout_s
        self.session: Any = None
        self.headers: dict[str, str] = {}

    async def open(self) -> None:
        import aiohttp  # imported only when the HTTP route is driven

        from runtime.client import auth_metadata

        self.headers = {k.title(): v for k, v in auth_metadata()}  # LEANSERVE_API_KEY, if set
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def run(self, spec: RequestSpec, result: RequestResult, now: Callable[[], float]) -> None:
        body: dict[str, Any] = {
            "prompt": spec.prompt,
            "max_tokens": spec.max_tokens,
            "temperature": spec.temperature,
            "stream": True,
            **spec.compute,
        }
        if spec.seed is not None:
            body["seed"] = spec.seed
        try:
            async with self.session.post(self.url, json=body, headers=self.headers) as resp:
                if resp.status != 200:
                    text = await resp.text()
                    result.code = _http_error_code(text, resp.status)
                    result.detail = text[:500]
                    result.end_s = now()
                    return
                events = SSEEvents()
                done = False
                # iter_any: each chunk as soon as it arrives, stamped then; a buffered line reader
                # would stamp events that arrived together at the moments the loop got to them.
                async for data in resp.content.iter_any():
                    t = now()
                    for payload in events.feed(data):
                        if payload == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(payload)
                        if "error" in chunk:  # an error after the stream started (status already 200)
                            result.code = str(chunk["error"].get("code", "unknown")).upper()
                            result.detail = str(chunk["error"].get("message", ""))
                            done = True
                            break
                        _record_chunk(result, chunk, t)
                    if done:
                        break
            if not result.tokens:
                result.tokens = len(result.token_times)
        except asyncio.TimeoutError:
            result.code = "DEADLINE_EXCEEDED"
        except OSError as e:  # aiohttp.ClientError subclasses OSError for connection failures
            result.code, result.detail = f"HTTP_{type(e).__name__}", str(e)
        result.end_s = now()


class SSEEvents:
    """Incremental server-sent-events parser: bytes in (as they arrive), `data:` payloads out.

    Events end with a blank line; a chunk may hold several events or part of one, so the parser
    keeps the unfinished rest for the next chunk. Only `data:` fields are returned (one event's
    several data lines joined with newlines, as the SSE spec says); comments and other fields
    are skipped.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        """The payloads of the events this chunk completes."""
        self._buffer += data.replace(b"\r\n", b"\n")
        *complete, self._buffer = self._buffer.split(b"\n\n")
        payloads = []
        for event in complete:
            lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                payloads.append(b"\n".join(lines).decode("utf-8").strip())
        return payloads


def _record_chunk(result: RequestResult, chunk: dict[str, Any], t: float) -> None:
    """One completions stream chunk, arrived at `t`: token time, usage and compute."""
    if chunk["choices"][0].get("text"):
        if result.first_token_s is None:
            result.first_token_s = t
        result.token_times.append(t)
    usage = chunk.get("usage")
    if usage:
        result.tokens = usage["completion_tokens"]
        result.prompt_tokens = usage["prompt_tokens"]
    info = chunk.get("leanserve") or {}
    result.steps = info.get("steps", result.steps)
    result.experts = info.get("experts", result.experts)
    result.policy_reason = info.get("policy_reason", result.policy_reason)
    spec = info.get("speculation")
    if spec:
        result.drafted_tokens = spec.get("drafted_tokens", result.drafted_tokens)
        result.accepted_tokens = spec.get("accepted_tokens", result.accepted_tokens)


def _http_error_code(text: str, status: int) -> str:
    """The gRPC code name from an OpenAI error body (the server puts it in `error.code`)."""
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        return str(json.loads(text)["error"]["code"]).upper()
    return f"HTTP_{status}"


@dataclass
class RunResult:
    """One run: every request that was sent, plus the run's bounds.

    Attributes:
        results: per-request results, in send order.
        wall_s: run start to the last completion (or the drain bound).
        mode: "open" or "closed".
        rate: requested arrivals per second (open loop).
        concurrency: in-flight requests (closed loop).
    """

    results: list[RequestResult]
    wall_s: float
    mode: str
    rate: float | None = None
    concurrency: int | None = None


async def _one(
    transport: Transport,
    spec: RequestSpec,
    result: RequestResult,
    now: Callable[[], float],
    on_done: Callable[[RequestResult], None] | None,
) -> None:
    result.sent_s = now()
    try:
        await transport.run(spec, result, now)
    except asyncio.CancelledError:
        result.code, result.end_s = CLIENT_CANCELLED, now()
        raise
    finally:
        if on_done is not None:
            on_done(result)


async def _drain(tasks: Sequence[asyncio.Task[None]], until: float, now: Callable[[], float]) -> None:
    """Wait for `tasks` until time `until`, then cancel the rest (the run's hard bound)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, until - now()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


async def run_open_loop(
    transport: Transport,
    specs: Sequence[RequestSpec],
    schedule: Sequence[float],
    *,
    duration_s: float,
    drain_s: float = 30.0,
    rate: float | None = None,
    on_done: Callable[[RequestResult], None] | None = None,
) -> RunResult:
    """Send `specs[i % len(specs)]` at `schedule[i]`, never waiting for responses.

    Bounds: nothing is sent after `duration_s`, at most `len(schedule)` requests
    are sent, and requests still running at `duration_s + drain_s` are cancelled
    (code `CLIENT_CANCELLED`), so a run never takes longer than that.

    Args:
        transport: an opened transport.
        specs: requests to cycle through.
        schedule: increasing send offsets in seconds (e.g. `poisson_schedule`).
        duration_s: send window.
        drain_s: extra time allowed for in-flight requests.
        rate: the schedule's rate, recorded in the result.
        on_done: called after each request finishes (progress bars).
    """
    if not specs:
        raise ValueError("need at least one request spec")
    clock = time.perf_counter
    t0 = clock()

    def now() -> float:
        return clock() - t0

    tasks: list[asyncio.Task[None]] = []
    results: list[RequestResult] = []
    for i, offset in enumerate(schedule):
        if offset > duration_s:
            break
        delay = offset - now()
        if delay > 0:
            await asyncio.sleep(delay)
        # Even when the sender is late (delay < 0), the request keeps its scheduled time.
        result = RequestResult(index=i, scheduled_s=offset)
        results.append(result)
        tasks.append(asyncio.create_task(_one(transport, specs[i % len(specs)], result, now, on_done)))
    await _drain(tasks, duration_s + drain_s, now)
    wall = max((r.end_s for r in results), default=now())
    return RunResult(results, wall, "open", rate=rate)


async def run_closed_loop(
    transport: Transport,
    specs: Sequence[RequestSpec],
    *,
    concurrency: int,
    max_requests: int,
    duration_s: float,
    drain_s: float = 30.0,
    on_done: Callable[[RequestResult], None] | None = None,
) -> RunResult:
    """`concurrency` workers, each sending its next request when the previous one ends.

    Here the scheduled time is the send time (a closed loop has no schedule to
    fall behind). Bounds as in `run_open_loop`: at most `max_requests`, no new
    request after `duration_s`, everything cancelled at `duration_s + drain_s`.
    """
    if concurrency < 1 or max_requests < 1:
        raise ValueError(f"concurrency={concurrency} and max_requests={max_requests} must be >= 1")
    clock = time.perf_counter
    t0 = clock()

    def now() -> float:
        return clock() - t0

    results: list[RequestResult] = []

    async def worker() -> None:
        while len(results) < max_requests and now() < duration_s:
            i = len(results)  # single-threaded event loop: no race between check and append
            result = RequestResult(index=i, scheduled_s=now())
            results.append(result)
            await _one(transport, specs[i % len(specs)], result, now, on_done)

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await _drain(workers, duration_s + drain_s, now)
    for r in results:  # a cancelled worker leaves its in-flight request marked by _one
        if r.end_s == 0.0 and r.code == "OK":
            r.code, r.end_s = CLIENT_CANCELLED, now()
    wall = max((r.end_s for r in results), default=now())
    return RunResult(results, wall, "closed", concurrency=concurrency)
