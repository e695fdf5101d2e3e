"""Torch eager backend: `LeanLM.forward` under `torch.inference_mode()`."""

from __future__ import annotations

import torch
from torch import Tensor

from models.kv_cache import KVBatch
from models.model import LeanLM, ModelOutput


class TorchBackend:
    """Runs a `LeanLM` in eval mode without autograd bookkeeping."""

    name = "torch"

    def __init__(self, model: LeanLM, compile: bool = False) -> None:
        """Wrap a model.

        Args:
            model: the model (moved to eval mode here).
            compile: wrap the forward in `torch.compile`. Off by default: the
                step loop is data-dependent (per-row step counts), which
                causes graph breaks and recompiles on CPU for little gain.
        """
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self._forward = torch.compile(model.forward, dynamic=True) if compile else model.forward

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
        """See `LeanLM.forward`; inputs are moved to the model's device."""
        dev = self.device
        with torch.inference_mode():
            return self._forward(
                tokens.to(dev),
                positions.to(dev),
                steps.to(dev),
                kv=kv,
                experts=None if experts is None else experts.to(dev),
                last_only=last_only,
                last_index=None if last_index is None else last_index.to(dev),
            )
