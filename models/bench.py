"""Decode-latency measurement of a bare model, and `leanserve bench model`.

`measure_decode` times one decode iteration (every row of the batch produces
one token with the paged cache) after a prefill to `context` tokens; the
median over `iters` iterations is robust to the noise of a shared machine.
The same function feeds the cost-model calibration (`leanserve eval`), so the
cost model is fitted on exactly what the bench reports.

`leanserve bench model` prints, for every step count, the per-token decode
latency at batch 1 and batch 16 and the ratio latency(N) / latency(N_max),
next to the ideal N / N_max: the gap is the fixed per-token work (embedding,
head, sampling-free logits, Python dispatch) that does not shrink with N.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from models.config import ModelConfig
from models.kv_cache import PagedKVCache
from models.model import LeanLM


@torch.inference_mode()
def measure_decode(
    model: LeanLM,
    steps: int,
    batch: int,
    context: int,
    experts: int | None = None,
    iters: int = 12,
    warmup: int = 2,
) -> float:
    """Median seconds of one decode iteration.

    Args:
        model: the model (eval mode).
        steps: Euler steps for every row.
        batch: rows decoding together.
        context: tokens cached per row before the timed iterations.
        experts: MoE top-k or tree depth (None = maximum).
        iters: timed iterations; warmup: untimed ones first.
    """
    c = model.config
    total = context + warmup + iters
    if total > c.context_length:
        raise ValueError(
            f"context={context}: context + {warmup + iters} iterations exceeds {c.context_length}"
        )
    cache = PagedKVCache(c, num_pages=batch * steps * (-(-total // 16)), page_size=16)
    for b in range(batch):
        cache.reserve(b, steps, total)
    kv = cache.batch(list(range(batch)))
    gen = torch.Generator().manual_seed(0)
    setting = None if experts is None else torch.full((batch,), experts, dtype=torch.long)
    steps_t = torch.full((batch,), steps, dtype=torch.long)
    if context:
        prompt = torch.randint(0, c.vocab_size, (batch, context), generator=gen)
        model(prompt, torch.arange(context).expand(batch, context), steps_t, kv, setting, last_only=True)
    token = torch.randint(0, c.vocab_size, (batch, 1), generator=gen)
    times = []
    for i in range(warmup + iters):
        pos = torch.full((batch, 1), context + i, dtype=torch.long)
        t0 = time.perf_counter()
        logits = model(token, pos, steps_t, kv, setting, last_only=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)  # greedy: part of every real decode step
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _load(target: str) -> LeanLM:
    path = Path(target)
    if path.is_dir():
        from models.checkpoint import load_model

        return load_model(path)
    if path.suffix == ".json" or not path.exists():
        from models.train import load_preset, preset_path

        config, _ = load_preset(preset_path(target))
        torch.manual_seed(0)
        return LeanLM(config).eval()  # random weights: latency does not depend on them
    raise FileNotFoundError(f"{target}: neither a model directory nor a preset")


def bench_steps(
    model: LeanLM, batches: tuple[int, ...] = (1, 16), context: int = 64, iters: int = 12
) -> list[dict[str, Any]]:
    """Per-token latency for every step count and batch size, with ratios to N_max."""
    c: ModelConfig = model.config
    lo, hi = c.step_range
    rows = []
    for batch in batches:
        ref = None
        for steps in range(hi, lo - 1, -1):
            seconds = measure_decode(model, steps, batch, context, iters=iters)
            ref = ref if ref is not None else seconds
            rows.append(
                {
                    "batch": batch,
                    "steps": steps,
                    "ms_per_token": seconds * 1e3,
                    "tokens_per_s": batch / seconds,
                    "ratio": seconds / ref,
                    "ideal": steps / hi,
                }
            )
    return rows


def cli_main(args: Any) -> int:
    """`leanserve bench model TARGET`: decode latency per step count."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args.target)
    c = model.config
    batches = tuple(int(b) for b in args.batches.split(","))
    print(
        f"{c.name}: {model.num_params():,} parameters, steps {c.step_range[0]}..{c.step_range[1]}, "
        f"context {args.context}, {torch.get_num_threads()} threads, median of {args.iters} iterations"
    )
    rows = bench_steps(model, batches, args.context, args.iters)
    print(f"{'batch':>5} {'steps':>5} {'ms/token':>9} {'tokens/s':>9} {'ratio':>7} {'N/Nmax':>7} {'gap':>7}")
    worst = 0.0
    for r in rows:
        gap = r["ratio"] - r["ideal"]
        worst = max(worst, abs(gap))
        print(
            f"{r['batch']:>5} {r['steps']:>5} {r['ms_per_token']:>9.3f} {r['tokens_per_s']:>9.0f} "
            f"{r['ratio']:>7.3f} {r['ideal']:>7.3f} {gap:>+7.3f}"
        )
    verdict = "met" if worst <= 0.15 else "missed"
    print(f"largest |ratio - N/N_max| = {worst:.3f} (target <= 0.15: {verdict})")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0
