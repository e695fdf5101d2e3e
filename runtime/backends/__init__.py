"""Model backends: one protocol, a torch (eager) and an ONNX Runtime implementation.

The engine only ever calls `Backend.forward` with the tensors of
`models.model.LeanLM.forward`; the backend decides how to run them. The ONNX
backend lives in `runtime.backends.onnx_backend` and is imported lazily, so
torch-only installs never import onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from models.config import ModelConfig
from models.kv_cache import KVBatch
from models.model import ModelOutput


@runtime_checkable
class Backend(Protocol):
    """What the engine needs from a model runner.

    Attributes:
        config: the model's configuration.
        name: short backend name for stats and logs ("torch", "onnx").
    """

    config: ModelConfig
    name: str

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        steps: Tensor,
        kv: KVBatch | None,
        experts: Tensor | None,
        last_only: bool,
        last_index: Tensor | None = None,
    ) -> ModelOutput:
        """Same contract as `LeanLM.forward` (shapes in models/model.py)."""
        ...


BACKEND_KINDS = ("torch", "onnx")


def load_backend(model_dir: str | Path, kind: str = "torch", device: str = "cpu", **kwargs: Any) -> Backend:
    """Build a backend for a model directory.

    Args:
        model_dir: directory with config.json and model.safetensors (torch)
            or the exported ONNX graphs (onnx).
        kind: "torch" or "onnx".
        device: torch device for the torch backend.
        **kwargs: passed to the backend's constructor (e.g. `compile=True`).

    Returns:
        The backend.

    Raises:
        ValueError: unknown `kind`.
    """
    if kind == "torch":
        from models.checkpoint import load_model
        from runtime.backends.torch_backend import TorchBackend

        return TorchBackend(load_model(model_dir, device=device), **kwargs)
    if kind == "onnx":
        from runtime.backends.onnx_backend import OnnxBackend  # lazy: onnxruntime is optional

        return OnnxBackend.from_model_dir(model_dir, **kwargs)
    raise ValueError(f"backend={kind!r}: must be one of {', '.join(BACKEND_KINDS)}")
