"""Model cards: `python -m models.card MODEL_DIR [--compare FIXED_DIR]`.

A card (README.md in the model directory) records how the model was made and
what it does, from files the directory already holds: the architecture and
training provenance from `config.json`, the quality/latency table and cost
model fit from `profile.json` (run `leanserve eval` first), and a few seeded
samples generated on the spot. With `--compare` it adds the ablation that
motivates step-count sampling: a shared model trained at one fixed N,
evaluated at N/2, next to this model at the same step counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from models.checkpoint import PROFILE_FILE, TOKENIZER_FILE, load_model, read_json
from models.cost import param_counts
from models.evaluate import format_table
from models.tokenizer import load_tokenizer

SAMPLE_PROMPTS = ("In the beginning", "Jesus said to them,", "The LORD is my shepherd")


def _ppl(profile: dict[str, Any], steps: int, experts: Any = "max") -> float:
    rows = [s for s in profile["settings"] if s["steps"] == steps]
    if experts == "max":
        return max(rows, key=lambda s: -1 if s["experts"] is None else s["experts"])["perplexity"]
    return next(s["perplexity"] for s in rows if s["experts"] == experts)


def quality_targets(config: Any, profile: dict[str, Any]) -> list[str]:
    """Perplexity at N_max/2 and N_max/4 relative to N_max (ODE trunks only)."""
    lo, hi = config.step_range
    if lo == hi:
        return []
    best = _ppl(profile, hi)
    lines = ["| steps | perplexity | vs N_max | target | met |", "|---:|---:|---:|---:|:---:|"]
    lines.append(f"| {hi} (N_max) | {best:.2f} | - | - | - |")
    for frac, target in ((2, 0.05), (4, 0.15)):
        n = max(lo, round(hi / frac))
        ppl = _ppl(profile, n)
        rel = ppl / best - 1
        met = "yes" if rel <= target else "no"
        lines.append(f"| {n} (N_max/{frac}) | {ppl:.2f} | {rel:+.1%} | <= {target:.0%} | {met} |")
    return lines


def fixed_step_comparison(profile: dict[str, Any], fixed_dir: Path) -> list[str]:
    """This model vs a model trained at one fixed N, at N and N/2."""
    fixed_model = load_model(fixed_dir)
    fixed_profile = read_json(fixed_dir, PROFILE_FILE)
    if fixed_profile is None:
        raise FileNotFoundError(f"{fixed_dir / PROFILE_FILE}: run `leanserve eval {fixed_dir}` first")
    n = fixed_model.config.extra["training"]["steps_range_trained"][0]
    half = max(fixed_model.config.step_range[0], n // 2)
    lines = [
        f"Both models share the architecture and the training budget; `{fixed_dir.name}` was trained "
        f"at N = {n} only, this model at N sampled uniformly from its range.",
        "",
        f"| model | ppl at N={n} | ppl at N={half} | loss from halving N |",
        "|---|---:|---:|---:|",
    ]
    for name, prof in (
        ("this model (sampled N)", profile),
        (f"{fixed_dir.name} (fixed N={n})", fixed_profile),
    ):
        a, b = _ppl(prof, n), _ppl(prof, half)
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a - 1:+.1%} |")
    return lines


def samples(model_dir: Path, steps_list: list[int], max_tokens: int = 40) -> list[str]:
    """Seeded samples (temperature 0.8, seed 0) at a few step counts."""
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir / TOKENIZER_FILE)
    lines = []
    for steps in steps_list:
        for prompt in SAMPLE_PROMPTS[:2]:
            ids = model.generate(tok.encode(prompt).ids, max_tokens, steps=steps, temperature=0.8, seed=0)
            text = (prompt + tok.decode(ids)).replace("\n", " ")
            lines.append(f"- N={steps}: {text}")
    return lines


def build_card(model_dir: Path, compare: Path | None = None, command: str | None = None) -> str:
    model = load_model(model_dir)
    c = model.config
    profile = read_json(model_dir, PROFILE_FILE)
    if profile is None:
        raise FileNotFoundError(f"{model_dir / PROFILE_FILE}: run `leanserve eval {model_dir}` first")
    training = c.extra.get("training", {})
    tcfg = training.get("train_config", {})
    lo, hi = c.step_range
    size = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    cm = profile["cost_model"]
    out = [
        f"# {c.name}",
        "",
        f"{param_counts(c)['total']:,} parameters ({size / 1e6:.1f} MB on disk). Trunk: {c.trunk}"
        + (
            f" with {c.n_blocks} shared block(s), {lo}..{hi} Euler steps (h = {c.horizon:g} / N)"
            if c.trunk == "ode"
            else f", {c.n_layers} layers"
        )
        + f"; block `{c.block}`, norm `{c.norm}`, FFN `{c.ffn}`"
        + (f" ({c.n_experts} experts, top-{c.experts_top_k})" if c.ffn == "moe" else "")
        + (f" (depth {c.tree_depth})" if c.ffn == "tree" else "")
        + f"; parameterisation `{c.parameterisation}`; d_model {c.d_model}, {c.n_heads} heads, "
        f"context {c.context_length}, vocabulary {c.vocab_size} (byte-level BPE).",
        "",
        "## Training",
        "",
        f"- command: `{command or 'leanserve train ' + c.name + ' --out models/zoo/' + c.name}`",
        f"- corpus: {training.get('text', '?')} "
        f"(deterministic {tcfg.get('val_fraction', 0.05):.0%} validation split)",
        f"- seed {tcfg.get('seed')}, {training.get('iterations')} iterations of {tcfg.get('batch_size')} x "
        f"{tcfg.get('seq_len')} tokens = {training.get('tokens', 0):,} tokens",
        f"- step counts sampled per batch: {training.get('steps_range_trained')}",
        f"- wall time {training.get('wall_s')} s on {training.get('threads')} CPU threads",
        f"- final train loss {training.get('final_train_loss', float('nan')):.3f}, "
        f"validation loss {training.get('final_val_loss') or float('nan'):.3f}",
        "",
        "## Evaluation (`leanserve eval`)",
        "",
        f"Validation perplexity over {profile['measured_on']['validation_tokens']:,} held-out tokens; "
        f"latency is the median batch-1 decode iteration at context 32 on this machine "
        f"({profile['measured_on']['threads']} threads).",
        "",
        format_table(profile),
        "",
        f"Quality tiers: `{json.dumps(profile['quality_tiers'])}`",
        "",
        f"Cost model (time = a*bytes + b*FLOPs + c, {cm['n_samples']} measured decode iterations): "
        f"R^2 bytes-only {cm['r2_bytes']:.3f}, FLOPs-only {cm['r2_flops']:.3f}, both {cm['r2_both']:.3f}.",
        "",
    ]
    targets = quality_targets(c, profile)
    if targets:
        out += ["## Quality targets", "", *targets, ""]
    if compare is not None:
        out += ["## Why sample the step count", "", *fixed_step_comparison(profile, compare), ""]
    steps_list = sorted({hi, max(lo, hi // 2), max(lo, round(hi / 4))}, reverse=True) if lo != hi else [hi]
    out += ["## Samples (temperature 0.8, seed 0)", "", *samples(model_dir, steps_list), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.card", description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--compare", type=Path, help="a model trained at one fixed N (ablation)")
    parser.add_argument("--command", help="the training command to record")
    args = parser.parse_args(argv)
    card = build_card(args.model_dir, args.compare, args.command)
    (args.model_dir / "README.md").write_text(card, encoding="utf-8")
    print(card)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
