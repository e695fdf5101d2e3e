"""Torch backend: `LeanLM.forward` under `torch.inference_mode()`, optionally with compiled decode steps.

With `compile=True` decode forwards (one new token per row) run every block
application as an ahead-of-time compiled graph (runtime/backends/aot_decode.py)
inside the same step loop as the eager model (`models.model.run_trunk`), so
per-row step counts and expert settings work unchanged; prefill stays eager.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from models.kv_cache import KVBatch
from models.layers import BlockOut
from models.model import LeanLM, ModelOutput, prepare_inputs, run_trunk


class TorchBackend:
    """Runs a `LeanLM` in eval mode without autograd bookkeeping."""

    name = "torch"

    def __init__(self, model: LeanLM, compile: bool = False, cache_dir: str | Path | None = None) -> None:
        """Wrap a model.

        Args:
            model: the model (moved to eval mode here).
            compile: run decode steps as AOTInductor-compiled graphs (compiled
                on first use per block structure, ~15 s each, then cached on
                disk). Dense and MoE FFNs; a tree FFN raises ValueError.
            cache_dir: where compiled artifacts are kept (default
                `$LEANSERVE_CACHE` or ~/.cache/leanserve).
        """
        self.model = model.eval()
        self.config = model.config
        self.device = next(model.parameters()).device
        self.compiled = None
        if compile:
            from runtime.backends.aot_decode import CompiledDecode

            if self.device.type != "cpu":
                raise ValueError(
                    f"compile: the compiled decode path runs on CPU, the model is on {self.device}"
                )
            self.compiled = CompiledDecode(self.model, None if cache_dir is None else Path(cache_dir))
            self.name = "torch-aot"
            # The output matrix again, laid out (d, V) for the decode head: `x @ W_t`
            # is ~30 % faster than `x @ W.t()` at decode's few rows on CPU (123 vs
            # 177 us for 16 x 128 x 4096). Costs V x d more memory (2 MB for the zoo).
            head = model.wte.weight if model.head is None else model.head.weight
            self._head_t = head.detach().t().contiguous()  # (d, V)

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
        tokens, positions, steps = tokens.to(dev), positions.to(dev), steps.to(dev)
        experts = None if experts is None else experts.to(dev)
        with torch.inference_mode():
            if self.compiled is not None and kv is not None and tokens.shape[1] == 1 and last_index is None:
                return self._decode(tokens, positions, steps, kv, experts)
            return self.model(
                tokens,
                positions,
                steps,
                kv=kv,
                experts=experts,
                last_only=last_only,
                last_index=None if last_index is None else last_index.to(dev),
            )

    def _decode(
        self, tokens: Tensor, positions: Tensor, steps: Tensor, kv: KVBatch, experts: Tensor | None
    ) -> ModelOutput:
        """One new token per row (B, 1) through the compiled decode steps -> logits (B, 1, V)."""
        assert self.compiled is not None
        m, c = self.model, self.config
        positions, steps = prepare_inputs(c, tokens, positions, steps, experts, kv)
        pool = (kv.pool.k, kv.pool.v)
        if pool[0].dtype != self.compiled.dtype:
            raise ValueError(
                f"KV pool dtype {pool[0].dtype} differs from the model's {self.compiled.dtype}; "
                "compiled decode needs both equal"
            )
        run_block = self.compiled.run_block

        def block_fn(
            k: int, x: Tensor, h: Tensor, window: Tensor, pos: Tensor, setting: Tensor | None
        ) -> BlockOut:
            return run_block(k, pool, x, h, window, pos, setting)

        x = m.embed(tokens, positions)  # (B, 1, d)
        x, _, counts = run_trunk(c, x, positions, steps, kv, experts, block_fn, reads_pool=True)
        return ModelOutput(m.logits(x, self._head_t), None, counts)
