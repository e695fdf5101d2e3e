"""In-process commands on a model directory: `leanserve generate --local` and `leanserve info`.

These run the bare model (models/) without the serving engine, which makes
them the reference a served answer can be compared with, and a way to try a
model before starting a server.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "zoo" / "ode-tiny"


def resolve_model_dir(model: str | None) -> Path:
    """The given model directory, or the demo model `models/zoo/ode-tiny`."""
    path = Path(model) if model else DEMO_MODEL
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory not found")
    return path


def generate_local(args: Any) -> int:
    """Generate from a prompt with the bare model, streaming the text."""
    import torch

    from models.checkpoint import TOKENIZER_FILE, load_model
    from models.tokenizer import IncrementalDecoder, load_tokenizer

    model_dir = resolve_model_dir(args.model)
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir / TOKENIZER_FILE)
    prompt_ids = tok.encode(args.prompt).ids
    if args.threads:
        torch.set_num_threads(args.threads)
    seed = generation_seed(args.seed)
    t0 = time.perf_counter()
    ids = model.generate(
        prompt_ids,
        args.max_tokens,
        steps=args.steps,
        experts=args.experts,
        temperature=args.temperature,
        seed=seed,
    )
    elapsed = time.perf_counter() - t0
    decoder = IncrementalDecoder(tok, prompt_ids)
    out = sys.stdout
    out.write(args.prompt)  # after generating: an error is never printed after the prompt
    for token in ids:
        out.write(decoder.push(token))
        if args.stream:
            out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()  # the text and its newline before the stats line on stderr
    steps = args.steps or model.config.default_steps
    print(
        f"[{len(ids)} tokens, steps={steps}, {elapsed / max(len(ids), 1) * 1e3:.1f} ms/token, "
        f"seed={seed}, local]",
        file=sys.stderr,
    )
    return 0


def generation_seed(seed: int | None) -> int:
    """`--seed`, else a random one (printed with the stats, so a text can be reproduced)."""
    import secrets

    return secrets.randbits(63) if seed is None else seed


def model_summary(c: Any) -> dict[str, Any]:
    """What `leanserve info` prints about a model configuration: its architecture, size,
    compute options and the KV memory one token takes per step (float32 and bfloat16)."""
    import torch

    from models.kv_cache import bytes_per_token_step
    from models.ouro import OuroConfig

    lo, hi = c.step_range
    kv = {str(d).removeprefix("torch."): bytes_per_token_step(c, d) for d in (torch.float32, torch.bfloat16)}
    common = {
        "name": c.name,
        "d_model": c.d_model,
        "context_length": c.context_length,
        "steps": {"min": lo, "max": hi, "default": c.default_steps},
        "kv_bytes_per_token_per_step": kv,
    }
    if isinstance(c, OuroConfig):
        from models.ouro import OuroLM

        with torch.device("meta"):  # shapes only: no memory, no initialisation
            parameters = OuroLM(c).num_params()
        return {
            "architecture": "ouro",
            "parameters": parameters,
            "layers_per_loop": c.loop_layers,
            "heads": c.n_heads,
            "kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "ffn": f"swiglu {c.d_ff}",
            "rope_theta": c.rope_theta,
            **common,
            "steps_are": "loops of the whole layer stack (exit_at_step = steps - 1)",
        }
    from models.cost import param_counts

    return {
        "architecture": "leanlm",
        "parameters": param_counts(c)["total"],
        "trunk": c.trunk,
        "blocks": c.n_blocks,
        "block": c.block,
        "ffn": c.ffn,
        "parameterisation": c.parameterisation,
        **common,
        "expert_options": c.expert_options,
    }


def info(args: Any) -> int:
    """Check a model directory (`models.checkpoint.check_model_dir`: config, every tensor's name,
    shape and dtype, tokenizer, optional files), then print its architecture, compute options
    and profile. A broken directory raises `CheckpointError` (exit 2, the file named)."""
    from models.checkpoint import PROFILE_FILE, check_model_dir, read_json

    model_dir = resolve_model_dir(args.model)
    c = check_model_dir(model_dir)
    summary = model_summary(c)
    profile = read_json(model_dir, PROFILE_FILE)
    if profile:
        summary["quality_tiers"] = profile.get("quality_tiers")
    print(json.dumps(summary, indent=2))
    return 0
