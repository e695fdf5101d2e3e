"""The speculation section of `leanserve bench engine`: self-speculative decoding, side by side.

Measured in one process, one configuration after another, on one engine
backend (weights loaded once), at the model's largest step count N_max:

1. tokens/s and per-token latency (mean inter-token latency; a round's gap is
   divided among its tokens) without speculation, with a fixed draft
   (`--draft-steps`, `--draft-tokens`) and with "auto", at batch 1 and at
   `--batch` concurrent requests, greedy and seeded sampling; greedy runs
   also check that the text is identical token for token;
2. the acceptance rate (accepted / drafted tokens) and tokens/s for every
   draft_steps in {2, 3, 4} (within the model's range, below N_max) and every
   `--draft-token-counts`, at batch 1, greedy.

Targets (issue 22): batch 1 greedy with the fixed draft >= 1.8x the tokens/s
of no speculation; `--batch` concurrent with "auto" >= 0.97x.

Prompts are text (a model directory's tokenizer) so acceptance is that of
real text; without a model directory the prompts are random ids. Every timed
configuration runs `BEST_OF` times back to back and the fastest counts.

Run: `python -m runtime.bench_spec --model-dir models/zoo/ode-tiny` (or
`leanserve bench engine --speculation`, which runs it after the engine table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BEST_OF = 2
PROMPTS = (
    "In the beginning God created the heaven and the earth.",
    "And the LORD spake unto Moses, saying,",
    "Blessed are the poor in spirit: for theirs is the kingdom of heaven.",
    "And it came to pass in those days, that there went out a decree",
    "The LORD is my shepherd; I shall not want.",
    "Then Jesus answered and said unto them,",
    "And God said, Let there be light: and there was light.",
    "For God so loved the world, that he gave his only begotten Son,",
)


@dataclass
class SpecRun:
    """One measured configuration."""

    tokens_per_s: float
    itl_s: float
    acceptance: float | None
    ids: list[list[int]]


def _prompts(engine: Any, n: int, tokens: int) -> list[list[int]]:
    """n prompts of about `tokens` ids: text when the engine has a real tokenizer, else random ids."""
    try:
        out = [engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)]).ids[:tokens] for i in range(n)]
        if all(out):
            return out
    except (AttributeError, ValueError):
        pass
    gen = torch.Generator().manual_seed(1)
    return torch.randint(1, engine.model_config.vocab_size, (n, tokens), generator=gen).tolist()


async def _run(
    engine: Any, prompts: list[list[int]], steps: int, new: int, compute: dict[str, Any], seeded: bool
) -> SpecRun:
    from runtime.types import ComputeParams, GenerationRequest, RequestStats, SamplingParams

    itls: list[float] = []
    drafted = accepted = 0

    def on_stats(s: Any) -> None:
        nonlocal drafted, accepted
        if isinstance(s, RequestStats):
            itls.extend(s.itl_s)
            if s.speculation is not None:
                drafted += s.speculation.drafted_tokens
                accepted += s.speculation.accepted_tokens

    engine.stats_callbacks.append(on_stats)

    async def one(i: int) -> list[int]:
        sampling = SamplingParams(
            max_tokens=new,
            temperature=0.8 if seeded else 0.0,
            top_k=50 if seeded else 0,
            seed=i if seeded else None,
            ignore_eos=True,
        )
        r = GenerationRequest(
            f"b{i}-{time.perf_counter_ns()}",
            prompt_token_ids=prompts[i],
            sampling=sampling,
            compute=ComputeParams(steps=steps, **compute),
        )
        ids: list[int] = []
        async for out in engine.submit(r):
            ids.extend(out.token_ids)
        return ids

    t0 = time.perf_counter()
    ids = list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
    wall = time.perf_counter() - t0
    engine.stats_callbacks.remove(on_stats)
    total = sum(len(x) for x in ids)
    return SpecRun(
        total / wall,
        statistics.fmean(itls) if itls else float("nan"),
        accepted / drafted if drafted else None,
        ids,
    )


class Bench:
    """Engines over one loaded backend, each configuration timed best of `BEST_OF`."""

    def __init__(self, args: argparse.Namespace) -> None:
        from runtime.engine import Engine, EngineConfig
        from runtime.settings import CompileSpec

        self.args = args
        first = Engine.from_model_dir(args.model_dir, EngineConfig())
        config = first.model_config
        lo, hi = config.step_range
        self.steps = hi
        self.drafts = [d for d in (2, 3, 4) if lo <= d < hi]
        if args.compile:
            graphs = tuple(sorted({hi, *self.drafts}))
            first = Engine.from_model_dir(args.model_dir, EngineConfig(), compile=CompileSpec(graphs))
        self.backend, self.tokenizer, self.config = first.backend, first.tokenizer, config

    def engine(self, batch: int, draft_steps: Any = None, draft_tokens: int = 4) -> Any:
        from models.kv_cache import PagedKVCache
        from runtime.engine import Engine, EngineConfig

        a = self.args
        page = 16
        tokens = a.prompt_tokens + a.new_tokens + page
        per_row = PagedKVCache.bytes_per_token_step(self.config) * (self.steps + max(self.drafts, default=0))
        ec = EngineConfig(
            kv_cache_bytes=per_row * tokens * batch,
            page_size=page,
            max_batch_size=batch,
            max_waiting=4 * batch,
            draft_steps=draft_steps,
            draft_tokens=draft_tokens,
        )
        if getattr(a, "inline_decode_ms", None) is not None:
            ec.inline_decode_ms = a.inline_decode_ms
        return Engine(self.backend, self.tokenizer, ec)

    def measure(
        self, batch: int, compute: dict[str, Any], seeded: bool = False, server: dict[str, Any] | None = None
    ) -> SpecRun:
        engine = self.engine(batch, **(server or {}))
        prompts = _prompts(engine, batch, self.args.prompt_tokens)

        async def go() -> SpecRun:
            await engine.start()
            try:
                await _run(engine, prompts[:1], self.steps, 4, compute, seeded)  # warm-up
                runs = [
                    await _run(engine, prompts, self.steps, self.args.new_tokens, compute, seeded)
                    for _ in range(BEST_OF)
                ]
                return max(runs, key=lambda r: r.tokens_per_s)
            finally:
                await engine.stop()

        return asyncio.run(go())


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def section(args: argparse.Namespace) -> tuple[list[tuple[str, ...]], dict[str, Any]]:
    """Run every measurement; (table rows, results for JSON)."""
    bench = Bench(args)
    N, B = bench.steps, args.batch
    d, k = args.draft_steps, args.draft_tokens
    fixed = {"draft_steps": d, "draft_tokens": k}
    rows: list[tuple[str, ...]] = []
    results: dict[str, Any] = {
        "model": bench.config.name,
        "steps": N,
        "batch": B,
        "draft_steps": d,
        "draft_tokens": k,
    }
    results["backend"] = bench.backend.name
    for batch in (1, B):
        for seeded in (False, True):
            kind = "seeded" if seeded else "greedy"
            base = bench.measure(batch, {"draft_steps": 0}, seeded)
            spec = bench.measure(batch, fixed, seeded)
            auto = bench.measure(batch, {}, seeded, server={"draft_steps": "auto", "draft_tokens": k})
            for name, run in ((f"draft {d}x{k}", spec), ("auto", auto)):
                ratio = run.tokens_per_s / base.tokens_per_s
                same = "" if seeded else ("identical text" if run.ids == base.ids else "TEXT DIFFERS")
                target = ""
                if not seeded and batch == 1 and name != "auto":
                    target = f"target >= 1.8x: {'met' if ratio >= 1.8 else 'missed'}"
                if batch == B and name == "auto":
                    target = f"target >= 0.97x: {'met' if ratio >= 0.97 else 'missed'}"
                rows.append(
                    (
                        f"b={batch} {kind} N={N}: {name} vs none",
                        f"{run.tokens_per_s:.0f} vs {base.tokens_per_s:.0f}",
                        f"{run.itl_s * 1e3:.2f} vs {base.itl_s * 1e3:.2f}",
                        f"{ratio:.2f}x",
                        _fmt(run.acceptance),
                        "; ".join(x for x in (same, target) if x),
                    )
                )
                key = f"b{batch}_{kind}_{'auto' if name == 'auto' else 'fixed'}"
                results[key] = {
                    "tokens_per_s": run.tokens_per_s,
                    "base_tokens_per_s": base.tokens_per_s,
                    "ratio": ratio,
                    "itl_ms": run.itl_s * 1e3,
                    "base_itl_ms": base.itl_s * 1e3,
                    "acceptance": run.acceptance,
                    "identical": None if seeded else run.ids == base.ids,
                }
    base = bench.measure(1, {"draft_steps": 0})
    for ds in bench.drafts:
        for kk in args.draft_token_counts:
            run = bench.measure(1, {"draft_steps": ds, "draft_tokens": kk})
            ratio = run.tokens_per_s / base.tokens_per_s
            rows.append(
                (
                    f"b=1 greedy N={N}: draft {ds}x{kk} vs none",
                    f"{run.tokens_per_s:.0f} vs {base.tokens_per_s:.0f}",
                    f"{run.itl_s * 1e3:.2f} vs {base.itl_s * 1e3:.2f}",
                    f"{ratio:.2f}x",
                    _fmt(run.acceptance),
                    "identical text" if run.ids == base.ids else "TEXT DIFFERS",
                )
            )
            results[f"acceptance_d{ds}_k{kk}"] = {"acceptance": run.acceptance, "ratio": ratio}
    return rows, results


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("speculation", "tokens/s", "ms/token", "ratio", "accept", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The section's own flags (the `bench engine` hook adds `--speculation` and reuses its others)."""
    p.add_argument("--draft-steps", type=int, default=2, help="fixed draft's Euler steps (default 2)")
    p.add_argument("--draft-tokens", type=int, default=3, help="fixed draft's tokens per round (default 3)")
    p.add_argument(
        "--draft-token-counts",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[2, 3, 4],
        help="tokens per round swept for the acceptance table (default 2,3,4)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the section and print its table; returns 0."""
    for name, default in (("draft_steps", 2), ("draft_tokens", 3), ("draft_token_counts", [2, 3, 4])):
        if not hasattr(args, name):
            setattr(args, name, default)
    if args.model_dir is None:
        raise ValueError("the speculation section needs --model-dir (a trained model: acceptance needs one)")
    if getattr(args, "quick", False):
        args.new_tokens = min(args.new_tokens, 16)
        args.draft_token_counts = args.draft_token_counts[:1]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"speculation: {args.model_dir}, prompt <= {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens, torch threads {torch.get_num_threads()}"
        + (", compiled decode" if args.compile else "")
    )
    rows, results = section(args)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.bench_spec", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default="models/zoo/ode-tiny", help="model directory (default ode-tiny)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length cap in tokens (default 16)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument(
        "--batch", type=int, default=16, help="concurrent requests of the batched rows (default 16)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--compile", action="store_true", help="AOT-compiled decode (graphs for N_max and drafts)")
    p.add_argument("--inline-decode-ms", type=float, default=None, help="EngineConfig.inline_decode_ms")
    p.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_arguments(p)
    return p


if __name__ == "__main__":
    raise SystemExit(main(_parser().parse_args()))
