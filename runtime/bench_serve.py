"""`leanserve bench serve`: what serving adds over the bare engine, in one run.

The same request (a greedy generation of `--new-tokens` tokens at a fixed step
count, prompt fixed) is timed end to end, `--runs` times each, one after
another:

1. on the bare engine in this process (`Engine.submit`, no Ray, no gRPC);
2. through Ray Serve's native gRPC proxy with unary `Generate`;
3. through the proxy with `GenerateStream` (a message per `--stream-interval` tokens).

The bare engine runs first and is stopped before Ray starts, so the two do not
compete for the cores; the replica gets the same engine settings and torch
thread count. The table prints p50 / p99 and the overhead ratio of each
served path over the bare engine (target: p50 overhead <= 15 %).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from typing import Any

import torch


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _bare(
    model_dir: str, engine_args: dict[str, Any], prompt: str, steps: int, new: int, runs: int
) -> list[float]:
    from runtime.engine import Engine, EngineConfig
    from runtime.types import ComputeParams, GenerationRequest, SamplingParams

    engine = Engine.from_model_dir(model_dir, EngineConfig(**engine_args))

    async def go() -> list[float]:
        await engine.start()
        times = []
        try:
            for i in range(runs + 2):  # two warm-up runs
                request = GenerationRequest(
                    f"bench-{i}",
                    prompt=prompt,
                    sampling=SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True),
                    compute=ComputeParams(steps=steps),
                )
                t0 = time.perf_counter()
                async for _ in engine.submit(request):
                    pass
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        finally:
            await engine.stop()
        return times

    return asyncio.run(go())


def _served(
    model_dir: str,
    engine_args: dict[str, Any],
    threads: int,
    prompt: str,
    steps: int,
    new: int,
    runs: int,
    port: int,
    stream_interval: int,
) -> tuple[list[float], list[float]]:
    from runtime.client import Client, build_request
    from runtime.serve_app import deploy
    from runtime.serve_cli import start_local, stop_local

    temp_dir = tempfile.mkdtemp(prefix="leanserve-bench-")
    start_local(grpc_port=port, http_port=port + 1, metrics_port=port + 2, temp_dir=temp_dir)
    try:
        app = {
            "model_dir": model_dir,
            "threads": threads,
            "engine": engine_args,
            "stream_interval": stream_interval,
        }
        deploy(app, timeout_s=300)
        client = Client(f"127.0.0.1:{port}")
        # ignore_eos is not on the wire: the request is fixed and greedy, so the text is the same each run.
        request = build_request(client.pb2, prompt, max_tokens=new, temperature=0.0, steps=steps)
        unary, stream = [], []
        for i in range(runs + 2):
            t0 = time.perf_counter()
            client.generate(request, timeout=60)
            if i >= 2:
                unary.append(time.perf_counter() - t0)
        for i in range(runs + 2):
            t0 = time.perf_counter()
            for _ in client.stream(request, timeout=60):
                pass
            if i >= 2:
                stream.append(time.perf_counter() - t0)
        client.close()
        return unary, stream
    finally:
        stop_local()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def main(args: Any) -> int:
    """Run the comparison and print the table."""
    from runtime.local import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model_dir))
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    engine_args = {"max_batch_size": 4, "max_waiting": 8, "kv_cache_bytes": 64 * 2**20}
    prompt = "In the beginning God created the heavens and the earth."
    print(
        f"{model_dir}: {args.runs} sequential runs of {args.new_tokens} tokens at steps={args.steps}, "
        f"{threads} torch threads"
    )
    bare = _bare(model_dir, engine_args, prompt, args.steps, args.new_tokens, args.runs)
    unary, stream = _served(
        model_dir,
        engine_args,
        threads,
        prompt,
        args.steps,
        args.new_tokens,
        args.runs,
        args.port,
        args.stream_interval,
    )
    base = statistics.median(bare)
    print(f"{'path':<28} {'p50 ms':>8} {'p99 ms':>8} {'p50 overhead':>13}")
    for name, values in (
        ("bare engine", bare),
        ("gRPC unary via Ray proxy", unary),
        (f"gRPC stream, {args.stream_interval} tok/msg", stream),
    ):
        p50 = statistics.median(values)
        print(
            f"{name:<28} {p50 * 1e3:>8.1f} {_percentile(values, 0.99) * 1e3:>8.1f} {p50 / base - 1:>+12.1%}"
        )
    over = statistics.median(unary) / base - 1
    print(f"unary p50 overhead {over:+.1%} (target <= +15%: {'met' if over <= 0.15 else 'missed'})")
    return 0
