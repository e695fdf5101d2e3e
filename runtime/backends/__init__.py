"""Model backends: one protocol, a torch (eager or compiled) and an ONNX Runtime implementation.

The model runner (runtime/runner.py) only ever calls `Backend.forward` with a
batch description (`models.trunk.Forward`); every backend runs it through the
same trunk loop (`models.trunk.run_forward`) and differs only by executor
(models/executors.py). The ONNX
backend lives in `runtime.backends.onnx_backend` and is imported lazily, so
torch-only installs never import onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from models.config import ModelConfig
from models.trunk import Forward, ModelOutput
from runtime.settings import CompileSpec


@runtime_checkable
class Backend(Protocol):
    """What the model runner needs from a backend: one forward of a batch description.

    Attributes:
        config: the model's configuration.
        name: short backend name for stats and logs ("torch", "torch-aot", "onnx").
        device: where the forward's tensors and the KV pool must live.
        dtype: the dtype of the KV pool (the model's).
    """

    config: ModelConfig
    name: str
    device: torch.device
    dtype: torch.dtype

    def forward(self, fwd: Forward) -> ModelOutput:
        """Run `fwd` (models/trunk.py) through the shared trunk loop with this backend's executor."""
        ...


BACKEND_KINDS = ("torch", "onnx")
SERVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def serve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a `dtype` setting ("float32" or "bfloat16").

    Raises:
        ValueError: naming `dtype` and the allowed values.
    """
    if not isinstance(name, str) or name not in SERVE_DTYPES:
        raise ValueError(f"dtype={name!r}: must be one of {', '.join(SERVE_DTYPES)}")
    return SERVE_DTYPES[name]


def load_backend(
    model_dir: str | Path,
    kind: str = "torch",
    device: str = "cpu",
    compile: CompileSpec | None = None,
    dtype: str = "float32",
) -> Backend:
    """Build a backend for a model directory.

    Args:
        model_dir: directory with config.json and model.safetensors (torch)
            or the exported ONNX graphs (onnx).
        kind: "torch" or "onnx".
        device: torch device for the torch backend.
        compile: the torch backend's compiled decode (None = eager).
        dtype: "float32" or "bfloat16": the weights' and so the KV pool's dtype
            (torch backend; the same KV byte budget holds twice the tokens in
            bfloat16). Norms, softmax and sampling stay numerically safe: the
            sampler reads float32 logits.

    Returns:
        The backend.

    Raises:
        ValueError: unknown `kind` or `dtype`, `compile` with a backend other than
            torch, or bfloat16 with the ONNX backend.
    """
    torch_dtype = serve_dtype(dtype)
    if kind == "torch":
        from models.checkpoint import load_model
        from runtime.backends.torch_backend import TorchBackend

        return TorchBackend(load_model(model_dir, device=device).to(torch_dtype), compile)
    if compile is not None:
        raise ValueError(f"compile: needs backend=torch (got backend={kind!r})")
    if kind == "onnx" and torch_dtype != torch.float32:
        raise ValueError(f"dtype={dtype!r}: the ONNX backend serves the float32 export (use backend=torch)")
    if kind == "onnx":
        from runtime.backends.onnx_backend import OnnxBackend  # lazy: onnxruntime is optional

        return OnnxBackend.from_model_dir(model_dir)
    raise ValueError(f"backend={kind!r}: must be one of {', '.join(BACKEND_KINDS)}")
