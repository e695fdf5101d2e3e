"""`python -m runtime.gpu_check`: the prepared GPU device check, one run, one JSON and one Markdown.

Run by scripts/gpu_check.sh on a machine with CUDA torch and no Ray, no network and no
project virtualenv: it needs only torch, safetensors, tokenizers, numpy and tqdm (the engine's
and the trainer's imports; `transformers` for the peer, optional) and the repository on
`PYTHONPATH`. Every section runs on its own: one that fails records its error and the others
still run, so one short device session always brings back a complete report.

Sections (all on `--device`, one after another in one process):

- **decode**: the engine (`runtime.engine.Engine`, eager torch backend, random weights of the
  `--shape` model) serving `batch` concurrent greedy requests of `--prompt-tokens` prompt and
  `--new-tokens` new tokens, per dtype (float32, bfloat16), step count (N_max/4, N_max) and
  batch size (1, 16, 64): mean inter-token latency and generated tokens/s; then the N_max/4 vs
  N_max latency ratio and the bf16 vs float32 ratio per batch size.
- **peer**: HF transformers GPT-2 of the same shape (n_layer = N_max) driven by `generate()` on
  the same device and dtype: per-token latency at batch 1 and tokens/s at the largest batch.
- **train**: `models.train.train` of the same shape with `dtype=bfloat16` on the device for
  `--train-iterations` iterations on the repository's own docs (no corpus download): tokens/s and
  MFU (`train_flops_per_token` x tokens/s over `--peak-tflops`).
- **cuda_graphs**: recorded as not built: decode forwards run eager on CUDA (the compiled decode
  path is AOTInductor for CPU). The report says so rather than leaving the row out.

`--device cpu --quick` runs every section small on CPU; tests/runtime/test_gpu_check.py does that
in CI, so the script a device session runs is the tested one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from models.config import ModelConfig
from runtime.bench_engine import DEFAULT_CONFIG

# A model where the step dial is worth turning on a GPU: 13.2 M parameters (6.5 M in the one
# shared block, run 2-12 times per token; ~80 M unrolled at 12 steps); ode-tiny cannot load one.
SHAPES: dict[str, dict[str, Any]] = {
    "ode-small": dict(
        name="ode-small-random",
        vocab_size=8192,
        context_length=512,
        d_model=768,
        n_heads=12,
        d_ff=3072,
        trunk="ode",
        min_steps=2,
        max_steps=12,
        block="sasp",
        ffn="dense",
    ),
    "ode-tiny": DEFAULT_CONFIG,  # the engine benchmark's ode-tiny-like shape
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _engine(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, batch: int, row_tokens: int
) -> Any:
    """An engine over a random-weight LeanLM on `device` in `dtype`, its pool sized for this run."""
    from models.model import LeanLM
    from runtime.backends.torch_backend import TorchBackend
    from runtime.bench_engine import _StubTokenizer, engine_config
    from runtime.engine import Engine

    torch.manual_seed(0)
    model = LeanLM(config).to(device=device, dtype=dtype).eval()
    ec = engine_config(config, batch, row_tokens, dtype)
    return Engine(TorchBackend(model), _StubTokenizer(), ec)  # type: ignore[arg-type]


def measure_decode(
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    steps: int,
    prompt: int,
    new: int,
) -> dict[str, float]:
    """Mean inter-token latency (ms) and generated tokens/s of `batch` concurrent greedy requests
    (the engine benchmark's warm-up and best of `BEST_OF` runs)."""
    from runtime.bench_engine import best_run

    engine = _engine(config, device, dtype, batch, prompt + new)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, config.vocab_size, (batch, prompt), generator=gen).tolist()
    r = best_run(engine, prompts, steps, new)
    return {"itl_ms": round(r.itl_s * 1e3, 3), "tokens_per_s": round(r.tokens_per_s, 1)}


def measure_peer(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, batch: int, prompt: int, new: int
) -> dict[str, float]:
    """HF GPT-2 of the same shape: per-token latency at batch 1 (ms) and tokens/s at `batch`
    (measured as `leanserve bench engine` measures it, `runtime.bench_engine.hf_measure`)."""
    from runtime.bench_engine import _hf_model, hf_measure

    model = _hf_model(config).to(device=device, dtype=dtype)
    per_token, throughput = hf_measure(model, config, prompt, new, batch)
    return {"itl_ms_batch1": round(per_token * 1e3, 3), "tokens_per_s": round(throughput, 1), "batch": batch}


def measure_train(
    config: ModelConfig, device: str, iterations: int, batch: int, seq_len: int, peak_tflops: float, out: Path
) -> dict[str, Any]:
    """bf16 training throughput of `config` on the repository's docs; MFU against `peak_tflops`."""
    from models.train import TrainConfig, train

    repo = Path(__file__).resolve().parent.parent
    tcfg = TrainConfig(
        iterations=iterations,
        batch_size=batch,
        seq_len=seq_len,
        warmup=1,
        eval_interval=iterations + 1,  # evaluated once, at the end
        eval_batches=1,
        checkpoint_interval=iterations + 1,
        device=device,
        dtype="bfloat16",
        val_fraction=0.1,
    )
    cfg = dataclasses.replace(config, vocab_size=min(config.vocab_size, 2048))
    t0 = time.perf_counter()
    summary = train(cfg, tcfg, out / "train-model", text=repo / "docs", resume=False, progress=False)
    wall = time.perf_counter() - t0
    tokens_per_s = summary["tokens"] / max(summary["wall_s"], 1e-9)
    flops_per_token = train_flops_per_token(cfg)
    return {
        "iterations": iterations,
        "tokens": summary["tokens"],
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": float(f"{flops_per_token * tokens_per_s / (peak_tflops * 1e12):.3g}"),
        "peak_tflops": peak_tflops,
        "parameters": summary["parameters"],
        "wall_s_with_setup": round(wall, 1),
        "final_train_loss": summary["final_train_loss"],
    }


def train_flops_per_token(config: ModelConfig) -> float:
    """6 x the multiply-adds one trained token costs: the shared blocks once per Euler step (at
    the mean of the uniformly sampled step range) plus the tied output head (vocab x d_model);
    attention's own score FLOPs are left out, as MFU usually does."""
    from models.model import LeanLM

    with torch.device("meta"):
        model = LeanLM(config)
    block = sum(p.numel() for p in model.blocks.parameters())
    lo, hi = config.step_range
    per_step = block / max(1, len(model.blocks))
    return 6.0 * (per_step * (lo + hi) / 2 + config.vocab_size * config.d_model)


def _section(report: dict[str, Any], name: str, fn: Any) -> None:
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:  # a failed section is data: record it and run the next
        report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    report.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every section; returns the report (also written by `main`)."""
    device = torch.device(args.device)
    config = ModelConfig(**SHAPES[args.shape])
    lo, hi = config.step_range
    steps = sorted({max(lo, round(hi / 4)), hi})
    batches = [1, 2] if args.quick else [1, 16, 64]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
    }

    def decode() -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        for dname in args.dtypes:
            for b in batches:
                for n in steps:
                    r = measure_decode(
                        config, device, DTYPES[dname], b, n, args.prompt_tokens, args.new_tokens
                    )
                    rows.append({"dtype": dname, "batch": b, "steps": n, **r})
        return {"rows": rows, "ratios": ratios(rows, steps)}

    _section(report, "decode", decode)
    _section(
        report,
        "peer",
        lambda: {
            d: measure_peer(config, device, DTYPES[d], batches[-1], args.prompt_tokens, args.new_tokens)
            for d in args.dtypes
        },
    )
    if args.train_iterations > 0:
        _section(
            report,
            "train",
            lambda: measure_train(
                config,
                args.device,
                args.train_iterations,
                args.train_batch,
                args.train_seq,
                args.peak_tflops,
                Path(args.out),
            ),
        )
    report["cuda_graphs"] = {
        "built": False,
        "reason": "decode runs eager on CUDA; CUDA-graph capture per (steps, batch bucket) is not built yet",
    }
    return report


def ratios(rows: list[dict[str, Any]], steps: list[int]) -> dict[str, Any]:
    """N_max/4 vs N_max latency per (dtype, batch), and bf16 vs float32 latency per (batch, steps)."""
    by = {(r["dtype"], r["batch"], r["steps"]): r["itl_ms"] for r in rows}
    out: dict[str, Any] = {"quarter_vs_max": {}, "bf16_vs_fp32": {}}
    lo, hi = steps[0], steps[-1]
    for (d, b, n), v in by.items():
        if n == lo and (d, b, hi) in by and by[(d, b, hi)] > 0:
            out["quarter_vs_max"][f"{d} batch {b}"] = round(v / by[(d, b, hi)], 3)
        if d == "bfloat16" and ("float32", b, n) in by and by[("float32", b, n)] > 0:
            out["bf16_vs_fp32"][f"batch {b} N={n}"] = round(v / by[("float32", b, n)], 3)
    return out


def markdown(report: dict[str, Any]) -> str:
    """The report as the README's GPU section would show it."""
    lines = [
        f"# GPU check: {report['device_name']} ({report['device']}), "
        f"torch {report['torch']}, {report['date']}",
        "",
        f"Model shape {report['shape']} (random weights), {report['prompt_tokens']} prompt tokens, "
        f"{report['new_tokens']} new tokens per request, greedy, eager torch backend.",
        "",
    ]
    dec = report.get("decode", {})
    if "rows" in dec:
        lines += ["| dtype | batch | steps | ms/token | tokens/s |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {r['dtype']} | {r['batch']} | {r['steps']} | {r['itl_ms']} | {r['tokens_per_s']} |"
            for r in dec["rows"]
        ]
        lines += ["", f"N_max/4 vs N_max latency: {dec['ratios']['quarter_vs_max']}"]
        lines += [f"bf16 vs float32 latency: {dec['ratios']['bf16_vs_fp32']}", ""]
    for name in ("decode", "peer", "train"):
        sec = report.get(name)
        if isinstance(sec, dict) and "error" in sec:
            lines += [f"**{name} failed**: `{sec['error']}`", ""]
    peer = report.get("peer", {})
    if peer and "error" not in peer:
        lines += ["HF GPT-2 generate() of the same shape:", ""]
        lines += [f"- {d}: {v}" for d, v in peer.items()]
        lines.append("")
    tr = report.get("train")
    if tr and "error" not in tr:
        lines += [
            f"Training (bf16 autocast): {tr['tokens_per_s']} tokens/s, MFU {tr['mfu']:.3%} of "
            f"{tr['peak_tflops']} TFLOP/s, {tr['parameters']:,} parameters.",
            "",
        ]
    lines += [f"CUDA graphs: {report['cuda_graphs']['reason']}.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The check's command line (scripts/gpu_check.sh passes --out)."""
    p = argparse.ArgumentParser(prog="python -m runtime.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="cuda", help="cuda, cuda:K or cpu (default: cuda)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="ode-small")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--train-iterations", type=int, default=60, help="0 skips training")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--train-seq", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM)")
    p.add_argument("--quick", action="store_true", help="batches 1 and 2 only (CI on CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the check and write `<out>/gpu_check.json` and `<out>/gpu_check.md`; 1 if a section failed."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
