"""ONNX Runtime backend: the LeanLM step loop in Python over exported graphs.

`models/export.py` exports the embedding, each distinct block (one Euler
step, dense past keys/values in, new keys/values out) and the head as separate
graphs. This backend runs the same loop as `LeanLM.forward`: per-row step
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
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from models.checkpoint import WEIGHTS_FILE, load_config
from models.config import ModelConfig
from models.export import MANIFEST_FILE, MANIFEST_FORMAT, ONNX_DIR, block_io_names, config_hash, file_sha256
from models.kv_cache import KVBatch
from models.layers import attention_mask
from models.model import LeanLM, ModelOutput

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
        # LeanLM's argument checks only read `self.config`; calling them on a
        # stand-in keeps the two backends' errors identical without a torch model.
        self._checker = SimpleNamespace(config=config)
        # Without an expert setting the model uses the trained maximum; the
        # graphs always take one (fixed input list), so that maximum is fed.
        self._full_setting = {"moe": config.experts_top_k, "tree": config.tree_depth}.get(config.ffn)

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

    def _check(self, tokens: Tensor, positions: Tensor, steps: Tensor, experts: Tensor | None) -> None:
        LeanLM._check(self._checker, tokens, positions, steps, experts)  # type: ignore[arg-type]

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        steps: Tensor | int | None = None,
        kv: KVBatch | None = None,
        experts: Tensor | None = None,
        last_only: bool = False,
    ) -> ModelOutput:
        """Run the model; same arguments, semantics and errors as `LeanLM.forward`.

        Args:
            tokens: (B, T) int64 token ids.
            positions: (B, T) int64 absolute positions; default 0..T-1.
            steps: (B,) int64 steps per row or an int; default `config.default_steps`.
            kv: paged cache view (CPU); new keys/values are written to it.
            experts: (B,) int64 experts top-k (MoE) or tree depth per row; None = maximum.
            last_only: logits for the last position only.

        Returns:
            ModelOutput with logits (B, T, V) or (B, 1, V), aux_loss None
            (inference only) and summed expert counts for MoE / tree.
        """
        c = self.config
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        if steps is None:
            steps = c.default_steps
        if isinstance(steps, int):
            steps = torch.full((B,), steps, dtype=torch.long)
        self._check(tokens, positions, steps, experts)
        if kv is not None:
            LeanLM._check_cache(self._checker, kv, positions, steps)  # type: ignore[arg-type]

        (x_np,) = self._embed.run(None, {"tokens": _np(tokens), "positions": _np(positions)})
        x = torch.from_numpy(x_np)  # (B, T, d)
        h_all = (c.horizon / steps.to(x.dtype)).view(B, 1, 1)  # (B, 1, 1) Euler step per row
        setting = experts
        if setting is None and self._full_setting is not None:
            setting = torch.full((B,), self._full_setting, dtype=torch.long)
        past_len = positions[:, 0] if kv is not None else torch.zeros(B, dtype=torch.long)
        S = int(past_len.max()) if kv is not None else 0
        P = -(-S // kv.pool.page_size) if kv is not None else 0  # pages covering the longest past
        nh, hs = c.n_heads, c.head_dim
        if kv is not None:
            page_size = kv.pool.page_size
            slot_page = positions // page_size  # (B, T)
            slot_off = positions % page_size
        mask_all = attention_mask(past_len, P * (kv.pool.page_size if kv is not None else 0), T)

        counts_total: Tensor | None = None
        n_iter = int(steps.max())
        uniform_steps = bool((steps == n_iter).all())
        for i in range(n_iter):
            blk_idx = (i * c.n_blocks) // steps  # (B,) block of step i per row
            for k in blk_idx.unique().tolist() if c.n_blocks > 1 else [0]:
                if uniform_steps and c.n_blocks == 1:
                    rows = None  # every row runs this step with the same block
                else:
                    sel = (steps > i) & (blk_idx == k)
                    if not bool(sel.any()):
                        continue
                    rows = None if bool(sel.all()) else sel.nonzero().squeeze(1)  # (R,)
                xr = x if rows is None else x[rows]
                R = xr.shape[0]
                if kv is not None:
                    bt = kv.block_tables[:, i, :P] if rows is None else kv.block_tables[rows, i, :P]
                    past_k, past_v = kv.pool.gather(bt)  # (R, nh, S', hs)
                else:
                    past_k = past_v = xr.new_zeros(R, nh, 0, hs)
                feed = {
                    "x": _np(xr),
                    "h": _np(h_all if rows is None else h_all[rows]),
                    "past_k": _np(past_k),
                    "past_v": _np(past_v),
                    "mask": _np(mask_all if rows is None else mask_all[rows]),
                }
                if setting is not None:
                    feed["setting"] = _np(setting if rows is None else setting[rows])
                out = self._blocks[k].run(None, feed)
                if kv is not None:
                    rows_idx = torch.arange(B) if rows is None else rows
                    pages = kv.block_tables[rows_idx, i].gather(1, slot_page[rows_idx])  # (R, T)
                    kv.pool.scatter(
                        pages * page_size + slot_off[rows_idx],
                        torch.from_numpy(out[1]),
                        torch.from_numpy(out[2]),
                    )
                x_out = torch.from_numpy(out[0])  # (R, T, d)
                x = x_out if rows is None else x.index_copy(0, rows, x_out)
                if len(out) > 3:
                    counts = torch.from_numpy(out[3])
                    counts_total = counts if counts_total is None else counts_total + counts

        if last_only:
            x = x[:, -1:]
        (logits,) = self._head.run(None, {"x": _np(x)})
        return ModelOutput(torch.from_numpy(logits), None, counts_total)

    __call__ = forward
