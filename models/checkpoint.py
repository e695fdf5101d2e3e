"""Model directories: `config.json`, `model.safetensors`, `tokenizer.json`.

Optional files that other parts of the project add: `profile.json` (measured
quality and latency per setting, from `leanserve eval`), `cost.json` (the
calibrated cost model), `README.md` (the model card) and ONNX graphs.

Loading never unpickles: weights come from safetensors only. Every way a
directory can be broken (a missing file, a truncated or corrupt safetensors
file, a missing, unexpected or mis-shaped tensor, a config that does not
validate) raises `CheckpointError` naming the file and, where there is one,
the tensor.

Saving is atomic: everything is written into a temporary sibling directory
that is renamed over the target at the end, so an interrupted save never
leaves a half-written model directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.config import ConfigError, ModelConfig
from models.model import LeanLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PROFILE_FILE = "profile.json"


class CheckpointError(ValueError):
    """A model directory is missing a file or holds a broken one."""


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (a model directory needs {path.name})")
    return path


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate `config.json` of a model directory."""
    path = _require(Path(model_dir) / CONFIG_FILE)
    try:
        return ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_state(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file and check them against `expected`."""
    _require(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing:
                raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
            if unexpected:
                raise CheckpointError(
                    f"{path}: unexpected tensor {unexpected[0]!r} (does config.json match?)"
                )
            state = {}
            for name, ref in expected.items():
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(ref.shape):
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {tuple(t.shape)}, "
                        f"config.json implies {tuple(ref.shape)}"
                    )
                state[name] = t
            return state
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    except (OSError, json.JSONDecodeError) as e:  # header unreadable
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> LeanLM:
    """Build a LeanLM from a model directory, in eval mode."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found")
    config = load_config(model_dir)
    model = LeanLM(config)
    state = load_state(model_dir / WEIGHTS_FILE, model.state_dict())
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def read_json(model_dir: str | Path, name: str) -> dict[str, Any] | None:
    """An optional JSON file of the model directory, or None if absent."""
    path = Path(model_dir) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def save_model(
    model: LeanLM,
    model_dir: str | Path,
    tokenizer_json: str | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    keep_existing: bool = True,
) -> Path:
    """Write a model directory atomically.

    Args:
        model: the model; its config is written as `config.json`.
        model_dir: target directory (replaced if it exists).
        tokenizer_json: serialised HF tokenizer (`Tokenizer.to_str()`).
        extra_files: more files to write, name -> content.
        keep_existing: carry over files of an existing directory that this
            save does not write (e.g. `profile.json`, the model card).

    Returns:
        The model directory.
    """
    model_dir = Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        written = {CONFIG_FILE, WEIGHTS_FILE}
        (tmp / CONFIG_FILE).write_text(model.config.to_json() + "\n", encoding="utf-8")
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
            written.add(TOKENIZER_FILE)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as fh:
                fh.write(content)
            written.add(name)
        if keep_existing and model_dir.is_dir():
            for old in model_dir.iterdir():
                if old.name not in written and old.is_file():
                    shutil.copy2(old, tmp / old.name)
        # Swap in: rename the old directory aside, move the new one in, delete the old.
        old_aside = None
        if model_dir.exists():
            old_aside = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.old.", dir=model_dir.parent))
            os.rename(model_dir, old_aside / "d")
        os.rename(tmp, model_dir)
        if old_aside is not None:
            shutil.rmtree(old_aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir
