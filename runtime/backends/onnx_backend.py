"""ONNX Runtime backend: the shared trunk loop over exported graphs.

`models/export.py` exports the embedding, each distinct block (one Euler
step, dense past keys/values in, new keys/values out) and the head as separate
graphs. This backend runs the very same loop as `LeanLM.forward`
(`models.trunk.run_forward`, with `models.executors.OnnxExecutor` running the
sessions): per-row step counts, iteration `i` runs only the rows whose step
count exceeds `i` with block `floor(i * n_blocks / N)` and step `h = T / N`,
the paged cache gathered and scattered around each block call. One export
therefore serves every step count and expert setting. Tensors cross into ONNX
Runtime as zero-copy numpy views of CPU torch tensors.

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

import onnxruntime as ort
import torch

from models.checkpoint import WEIGHTS_FILE, load_config
from models.config import ModelConfig
from models.executors import OnnxExecutor
from models.export import MANIFEST_FILE, MANIFEST_FORMAT, ONNX_DIR, block_io_names, config_hash, file_sha256
from models.trunk import Forward, ModelOutput, run_forward

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build offers it, CPU always as fallback."""
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


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
    """Runs a LeanLM from its ONNX export with ONNX Runtime (`OnnxExecutor` in the shared loop).

    Attributes:
        config: the model's config.
        name: "onnx".
        provider: the execution provider the sessions actually run on.
        device, dtype: where the KV pool lives (host memory; the graphs' dtype).
    """

    name = "onnx"

    def __init__(self, config: ModelConfig, sessions: dict[str, ort.InferenceSession]) -> None:
        self.config = config
        self.executor = OnnxExecutor(config, sessions)
        self.provider = sessions["embed"].get_providers()[0]
        self.device, self.dtype = torch.device("cpu"), torch.float32

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

    def forward(self, fwd: Forward) -> ModelOutput:
        """Run one forward (`models.trunk.Forward`, CPU tensors); aux_loss is None (inference only)."""
        return run_forward(self.executor, self.config, fwd)
