"""`leanserve bench serve`: what serving adds over the bare engine, in one run.

The same request (a greedy generation of `--new-tokens` tokens at a fixed step
count, prompt fixed) is timed end to end over three paths:

1. the bare engine (`Engine.submit`; no Ray, no gRPC) in a subprocess of its
   own: an in-process Ray driver would slow it down;
2. Ray Serve's native gRPC proxy with unary `Generate`;
3. the proxy with `GenerateStream` (a message per `--stream-interval` tokens).

The paths are measured *paired*: Ray and the replica are started first, then
each round runs one request on every path, one after another (never two at
once, so they do not compete for cores), in an order that rotates from round
to round. Background load (a freshly started Ray settling down, other
processes) then falls on all paths alike instead of on whichever ran during it.
The replica gets the same engine settings and torch thread count as the bare
engine.

The table prints p50 / p99 and the p50 overhead of each served path over the
paired bare engine (target: unary p50 overhead <= 15 %). For reference it
also prints the bare engine measured before Ray started: on a small machine
Ray's own processes (proxy, controller, GCS) finishing their share of each
served request slow the paired bare runs too, and this row shows by how much.
The unary overhead is split into the replica's own engine time (`timings.total_s` of the response, from
arrival in the engine to the last token) and the rest, the transport: client
-> proxy -> replica -> proxy -> client.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

PROMPT = "In the beginning God created the heavens and the earth."
WARMUP = 3  # untimed requests per path before the timed ones


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class Samples:
    """Seconds per request on each path, one entry per measured round."""

    bare: list[float] = field(default_factory=list)
    unary: list[float] = field(default_factory=list)
    unary_engine: list[float] = field(default_factory=list)  # the replica's own engine time
    stream: list[float] = field(default_factory=list)
    bare_without_ray: list[float] = field(default_factory=list)  # reference: before Ray started
    unary_tokens: list[int] = field(default_factory=list)  # completion tokens of each unary response


def _bare_worker(
    conn: Any, model_dir: str, engine_args: dict[str, Any], threads: int, backend_args: dict[str, Any]
) -> None:
    """Subprocess body: the bare engine, one timed request per `(steps, new_tokens, prompt)` received.

    It runs in a process of its own because an in-process Ray driver slowed the
    engine by ~15 % here (93.8 vs 80 ms p50; its core-worker threads share the
    process), which would flatter the served paths."""
    from runtime.engine import Engine, EngineConfig
    from runtime.types import ComputeParams, GenerationRequest, SamplingParams

    torch.set_num_threads(threads)
    engine = Engine.from_model_dir(model_dir, EngineConfig(**engine_args), **backend_args)

    async def serve() -> None:
        await engine.start()
        try:
            i = 0
            while (job := await asyncio.to_thread(conn.recv)) is not None:
                steps, new_tokens, prompt = job
                request = GenerationRequest(
                    f"bench-{i}",
                    prompt=prompt,
                    sampling=SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True),
                    compute=ComputeParams(steps=steps),
                )
                t0 = time.perf_counter()
                async for _ in engine.submit(request):
                    pass
                conn.send(time.perf_counter() - t0)
                i += 1
        finally:
            await engine.stop()

    asyncio.run(serve())


class BareEngine:
    """The bare engine in a spawned subprocess (no Ray there); `run()` times one request."""

    def __init__(
        self,
        model_dir: str,
        engine_args: dict[str, Any],
        threads: int,
        backend_args: dict[str, Any] | None = None,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        worker_args = (child, model_dir, engine_args, threads, backend_args or {})
        self._proc = ctx.Process(target=_bare_worker, args=worker_args, daemon=True)
        self._proc.start()

    def run(self, steps: int, new_tokens: int, prompt: str = PROMPT, timeout_s: float = 120.0) -> float:
        """Seconds from submit to the last token of one greedy request."""
        self._conn.send((steps, new_tokens, prompt))
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"bare engine gave no answer in {timeout_s} s")
        return self._conn.recv()

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()


def measure_paired(
    client: Any, bare_engine: BareEngine, steps: int, new_tokens: int, runs: int, warmup: int = WARMUP,
    prompt: str = PROMPT,
) -> Samples:  # fmt: skip
    """Time `runs` rounds of (bare engine, unary, stream) after `warmup` untimed rounds.

    Args:
        client: a `runtime.client.Client` of the served app.
        bare_engine: the same model and engine settings outside Ray.
        steps, new_tokens: the request's step count and `max_tokens` (greedy).
    """
    from runtime.client import build_request

    served = build_request(client.pb2, prompt, max_tokens=new_tokens, temperature=0.0, steps=steps)
    samples = Samples()

    def bare(i: int) -> None:
        elapsed = bare_engine.run(steps, new_tokens, prompt)
        if i >= warmup:
            samples.bare.append(elapsed)

    def unary(i: int) -> None:
        t0 = time.perf_counter()
        response = client.generate(served, timeout=60)
        if i >= warmup:
            samples.unary.append(time.perf_counter() - t0)
            samples.unary_engine.append(response.timings.total_s)
            samples.unary_tokens.append(response.usage.completion_tokens)

    def stream(i: int) -> None:
        t0 = time.perf_counter()
        for _ in client.stream(served, timeout=60):
            pass
        if i >= warmup:
            samples.stream.append(time.perf_counter() - t0)

    paths: list[Callable[[int], None]] = [bare, unary, stream]
    for i in range(warmup + runs):
        for k in range(len(paths)):
            paths[(i + k) % len(paths)](i)
    return samples


def report(samples: Samples, stream_interval: int, new_tokens: int | None = None) -> float:
    """Print the table; returns the unary p50 overhead (0.15 = +15 %)."""
    fewest = min(samples.unary_tokens, default=new_tokens)
    if new_tokens is not None and fewest is not None and fewest < new_tokens:
        # ignore_eos is not on the wire: a served request may stop at end-of-text, the bare one not.
        print(
            f"warning: served requests stopped after {fewest} of {new_tokens} tokens "
            "(end-of-text); the paths did not do the same work, choose another prompt"
        )
    base, unary = statistics.median(samples.bare), statistics.median(samples.unary)
    print(f"{'path':<30} {'p50 ms':>8} {'p99 ms':>8} {'p50 overhead':>13}")
    for name, values in (
        ("bare engine", samples.bare),
        ("gRPC unary via Ray proxy", samples.unary),
        ("  of which replica engine", samples.unary_engine),
        (f"gRPC stream, {stream_interval} tok/msg", samples.stream),
        ("bare engine, Ray not started", samples.bare_without_ray),
    ):
        if not values:
            continue
        p50 = statistics.median(values)
        print(
            f"{name:<30} {p50 * 1e3:>8.1f} {_percentile(values, 0.99) * 1e3:>8.1f} {p50 / base - 1:>+12.1%}"
        )
    transport = statistics.median(u - e for u, e in zip(samples.unary, samples.unary_engine))
    print(f"unary transport (wall - replica engine) p50 {transport * 1e3:.1f} ms")
    if samples.bare_without_ray:
        alone = unary / statistics.median(samples.bare_without_ray) - 1
        print(f"unary p50 over the bare engine before Ray started {alone:+.1%} (reference)")
    over = unary / base - 1
    print(f"unary p50 overhead {over:+.1%} (target <= +15%: {'met' if over <= 0.15 else 'missed'})")
    return over


def main(args: Any) -> int:
    """Start Ray + Serve locally, run the paired comparison, print the table, stop Ray."""
    from runtime.client import Client
    from runtime.local import resolve_model_dir
    from runtime.serve_app import deploy
    from runtime.serve_local import start_local, stop_local
    from runtime.settings import CompileSpec

    model_dir = str(resolve_model_dir(args.model_dir))
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    engine_args: dict[str, Any] = {"max_batch_size": 4, "max_waiting": 8, "kv_cache_bytes": 64 * 2**20}
    if args.inline_decode_ms is not None:
        engine_args["inline_decode_ms"] = args.inline_decode_ms
    print(
        f"{model_dir}: {args.runs} paired rounds of {args.new_tokens} tokens at steps={args.steps}, "
        f"{threads} torch threads" + (", compiled decode" if args.compile else "")
    )
    port = args.port
    # With --compile the bare engine compiles first (or loads the cache); the replica,
    # started later with the same thread count, then loads the same artifacts. Both
    # get a whole-decode graph for the step count measured.
    backend_args = {"compile": CompileSpec((args.steps,))} if args.compile else {}
    bare = BareEngine(model_dir, engine_args, threads, backend_args)
    # Reference only: the same engine before any Ray process exists (no background load at all).
    without_ray = [bare.run(args.steps, args.new_tokens) for _ in range(WARMUP + args.runs)][WARMUP:]
    temp_dir = tempfile.mkdtemp(prefix="leanserve-bench-")
    start_local(grpc_port=port, http_port=port + 1, metrics_port=port + 2, temp_dir=temp_dir)
    try:
        app = {
            "model_dir": model_dir,
            "threads": threads,
            "engine": engine_args,
            "stream_interval": args.stream_interval,
            **backend_args,
        }
        deploy(app, timeout_s=300)
        client = Client(f"127.0.0.1:{port}")
        samples = measure_paired(client, bare, args.steps, args.new_tokens, args.runs)
        samples.bare_without_ray = without_ray
        client.close()
    finally:
        bare.close()
        stop_local()
        shutil.rmtree(temp_dir, ignore_errors=True)
    report(samples, args.stream_interval, args.new_tokens)
    return 0
