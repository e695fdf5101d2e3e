"""ONNX Runtime backend: the LeanLM step loop in Python over exported graphs.

`models/export.py` exports the embedding, each distinct block (one Euler
step, dense past keys/values in, new keys/values out) and the head as separate
graphs. This backend runs the very same loop as `LeanLM.forward` (`models.model.run_trunk`,
with an ONNX Runtime session as the block executor): per-row step
counts, iteration `i` runs only the rows whose step count exceeds `i` with
block `floor(i * n_blocks / N)` and step `h = T / N`, the paged cache gathered
and scattered around each block call. One export therefore serves every step
count and expert setting. Tensors cross into ONNX Runtime as zero-copy numpy
views of CPU torch tensors.

Token layout and shape legend as in models/model.py:
    B | rows           T | new tokens per row     d | model width
    V | vocabulary     N | steps per row          R | rows active in a step
    S | padded past    nh, hs | heads, head size
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from models.checkpoint import WEIGHTS_FILE, load_config
from models.config import ModelConfig
from models.export import MANIFEST_FILE, MANIFEST_FORMAT, ONNX_DIR, block_io_names, config_hash, file_sha256
from models.kv_cache import KVBatch
from models.layers import BlockOut
from models.model import ModelOutput, prepare_inputs, run_trunk, select_last

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build offers it, CPU always as fallback."""
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def _np(t: Tensor) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (copies only if it is strided)."""
    return t.detach().cpu().contiguous().numpy()


def read_manifest(model_dir: Path, config: ModelConfig) -> dict[str, Any]:
    """Load `onnx/manifest.json` and check it against `config` and the files.

    Raises:
        FileNotFoundError: the manifest, a graph or its external data is missing.
        ValueError: the manifest was written for another config, weights file,
            format, or a different set of graphs.
    """
    path = model_dir / ONNX_DIR / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX manifest not found (run `leanserve export {model_dir}`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format={manifest.get('format')!r}, this backend reads {MANIFEST_FORMAT}")
    if manifest.get("config_hash") != config_hash(config):
        raise ValueError(
            f"{path}: exported for a different config.json (config_hash mismatch); re-run `leanserve export`"
        )
    weights = model_dir / WEIGHTS_FILE
    if (
        manifest.get("weights_sha256")
        and weights.is_file()
        and file_sha256(weights) != manifest["weights_sha256"]
    ):
        raise ValueError(f"{path}: exported from different weights than {weights}; re-run `leanserve export`")
    graphs = manifest.get("graphs", {})
    expected = {"embed", "head", *(f"block_{k}" for k in range(config.n_blocks))}
    if set(graphs) != expected:
        raise ValueError(f"{path}: graphs {sorted(graphs)}, config.json implies {sorted(expected)}")
    inputs, outputs = block_io_names(config)
    for k in range(config.n_blocks):
        g = graphs[f"block_{k}"]
        if g.get("inputs") != inputs or g.get("outputs") != outputs:
            raise ValueError(f"{path}: block_{k} has inputs {g.get('inputs')}, config.json implies {inputs}")
    for g in graphs.values():
        for rel in (g["file"], g.get("data")):
            if rel and not (model_dir / rel).is_file():
                raise FileNotFoundError(f"{model_dir / rel}: ONNX file listed in {path} not found")
    return manifest


class OnnxBackend:
    """Runs a LeanLM from its ONNX export with ONNX Runtime.

    Attributes:
        config: the model's config.
        name: "onnx".
        provider: the execution provider the sessions actually run on.
    """

    name = "onnx"

    def __init__(self, config: ModelConfig, sessions: dict[str, ort.InferenceSession]) -> None:
        self.config = config
        self._embed = sessions["embed"]
        self._head = sessions["head"]
        self._blocks = [sessions[f"block_{k}"] for k in range(config.n_blocks)]
        self.provider = self._embed.get_providers()[0]
        # Without an expert setting the model uses the trained maximum; the
        # graphs always take one (fixed input list), so that maximum is fed.
        self._full_setting = config.max_expert_setting

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, providers: Sequence[str] | None = None) -> OnnxBackend:
        """Open the ONNX graphs of a model directory exported by `models.export`.

        Args:
            model_dir: directory with `config.json` and `onnx/manifest.json`.
            providers: ONNX Runtime execution providers in order of preference;
                default CUDA then CPU when CUDA is available, else CPU.
        """
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        manifest = read_manifest(model_dir, config)
        requested = list(providers) if providers is not None else default_providers()
        opts = ort.SessionOptions()
        # One forward call is a chain of small graphs; parallelism is inside ops.
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        sessions = {
            name: ort.InferenceSession(str(model_dir / g["file"]), sess_options=opts, providers=requested)
            for name, g in manifest["graphs"].items()
        }
        backend = cls(config, sessions)
        # A CUDA provider that fails to load (missing CUDA/cuDNN libraries) is
        # only a log line in onnxruntime; the session silently runs on CPU.
        if CUDA in requested and backend.provider != CUDA:
            logger.warning("onnx backend: %s requested but sessions run on %s", CUDA, backend.provider)
        return backend

    def _run_block(
        self,
        k: int,
        x: Tensor,
        h: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        mask: Tensor,
        setting: Tensor | None,
    ) -> BlockOut:
        """One Euler step of block k through its ONNX graph (shapes as `Block.forward`)."""
        feed = {"x": _np(x), "h": _np(h), "past_k": _np(past_k), "past_v": _np(past_v), "mask": _np(mask)}
        if setting is not None:
            feed["setting"] = _np(setting)
        out = self._blocks[k].run(None, feed)
        counts = torch.from_numpy(out[3]) if len(out) > 3 else None
        return BlockOut(
            torch.from_numpy(out[0]), torch.from_numpy(out[1]), torch.from_numpy(out[2]), counts, None
        )

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        steps: Tensor | int | None = None,
        kv: KVBatch | None = None,
        experts: Tensor | None = None,
        last_only: bool = False,
        last_index: Tensor | None = None,
    ) -> ModelOutput:
        """Run the model; same arguments, semantics and errors as `LeanLM.forward`.

        Args:
            tokens: (B, T) int64 token ids.
            positions: (B, T) int64 absolute positions; default 0..T-1.
            steps: (B,) int64 steps per row or an int; default `config.default_steps`.
            kv: paged cache view (CPU); new keys/values are written to it.
            experts: (B,) int64 experts top-k (MoE) or tree depth per row; None = maximum.
            last_only: logits for the last position only.
            last_index: (B,) index of each row's last real token (right padding).

        Returns:
            ModelOutput with logits (B, T, V) or (B, 1, V), aux_loss None
            (inference only) and summed expert counts for MoE / tree.
        """
        c = self.config
        B = tokens.shape[0]
        positions, steps = prepare_inputs(c, tokens, positions, steps, experts, kv)
        (x_np,) = self._embed.run(None, {"tokens": _np(tokens), "positions": _np(positions)})
        x = torch.from_numpy(x_np)  # (B, T, d)
        setting = experts
        if setting is None and self._full_setting is not None:
            # The block graphs take the setting as an input; the maximum is the default.
            setting = torch.full((B,), self._full_setting, dtype=torch.long)
        x, _, counts_total = run_trunk(c, x, positions, steps, kv, setting, self._run_block)
        if last_only:
            x = select_last(x, last_index)
        (logits,) = self._head.run(None, {"x": _np(x)})
        return ModelOutput(torch.from_numpy(logits), None, counts_total)

    __call__ = forward
