"""The resumable training state: `<out>.train-state/` (state.safetensors + state.json).

Tensors (weights, AdamW moments) go to safetensors, everything else (iteration, losses,
the data sampler's and the step sampler's generator states) to JSON; nothing is pickled.
Written by rank 0 only, to a temporary name that is renamed over the old state.

The state does not depend on the world size: the weights and moments are the same on
every rank (DDP keeps them so), and the samplers are global (every rank draws the same
global batch and the same step count and expert setting per iteration), so a state saved
by W processes resumes under any other number of processes on the same global batches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.data import TokenBatcher
from models.model import LeanLM

# --- the training state --------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Progress of a run: what state.json records besides the sampler states."""

    iteration: int = 0
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_seen: int = 0
    wall_s: float = 0.0


def _optimizer_tensors(optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments as named tensors (safetensors holds tensors, never pickles)."""
    out = {}
    # Keyed by the parameter's index in the optimizer (a parameter that never had a gradient has no
    # state, so a running count would shift the ones after it).
    for idx, st in optim.state_dict()["state"].items():
        for key, value in st.items():
            out[f"optim.{idx}.{key}"] = (value if torch.is_tensor(value) else torch.tensor(value)).cpu()
    return out


def _load_optimizer_tensors(optim: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Put `_optimizer_tensors`' moments back (AdamW moves them to each parameter's device)."""
    sd = optim.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    sd["state"] = state
    optim.load_state_dict(sd)


def write_state(
    state_dir: Path,
    model: LeanLM,
    optim: torch.optim.Optimizer,
    batcher: TokenBatcher,
    sampler: torch.Generator,
    state: TrainState,
) -> None:
    """Write the state to `state_dir` atomically (a temporary sibling renamed over it)."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(_optimizer_tensors(optim))
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {
        "state": dataclasses.asdict(state),
        "batcher": batcher.state_dict(),
        "sampler": sampler.get_state().tolist(),
        "torch_rng": torch.get_rng_state().tolist(),
    }
    (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    old = state_dir.with_name(state_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        os.rename(state_dir, old)
    os.rename(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def read_state(
    state_dir: Path,
    model: LeanLM,
    optim: torch.optim.Optimizer,
    batcher: TokenBatcher,
    sampler: torch.Generator,
) -> TrainState:
    """Load `write_state`'s state into the model, optimizer and samplers; the run's progress."""
    tensors = load_file(str(state_dir / "state.safetensors"))
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optimizer_tensors(optim, tensors)
    meta = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
    batcher.load_state_dict(meta["batcher"])
    sampler.set_state(torch.tensor(meta["sampler"], dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    st = meta["state"]
    return TrainState(
        st["iteration"], st["losses"], [tuple(v) for v in st["val_losses"]], st["tokens_seen"], st["wall_s"]
    )
