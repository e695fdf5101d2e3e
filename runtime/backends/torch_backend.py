"""Torch backend: `LeanLM.forward` under `torch.inference_mode()`, optionally with compiled decode steps.

With `compile=True` decode forwards (one new token per row) are ahead-of-time
compiled (runtime/backends/aot_decode.py): rows whose step count has a
whole-decode graph (`compile_steps`) run as one native call per step count in
the batch, and the other rows run every block application as a compiled step
inside the same step loop as the eager model (`models.model.run_trunk`), so
any mix of per-row step counts and expert settings works; prefill stays eager.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from models.kv_cache import KVBatch
from models.layers import BlockOut
from models.model import LeanLM, ModelOutput, prepare_inputs, run_trunk


class TorchBackend:
    """Runs a `LeanLM` in eval mode without autograd bookkeeping."""

    name = "torch"

    def __init__(
        self,
        model: LeanLM,
        compile: bool = False,
        cache_dir: str | Path | None = None,
        compile_steps: Iterable[int] | Literal["all"] | None = None,
    ) -> None:
        """Wrap a model.

        Args:
            model: the model (moved to eval mode here).
            compile: run decode forwards as AOTInductor-compiled graphs
                (compiled on first use, ~15 s per block structure and ~20-60 s
                per whole-decode graph on one core, then cached on disk).
                Dense and MoE FFNs; a tree FFN raises ValueError.
            cache_dir: where compiled artifacts are kept (default
                `$LEANSERVE_CACHE` or ~/.cache/leanserve).
            compile_steps: with `compile`, the step counts that get a
                whole-decode graph (the fastest path; other step counts run
                compiled block by block): a list, "all" (the model's whole
                step range), or None for the step counts the step policy
                picks by default (`runtime.policy.automatic_steps`).
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
            lo, hi = self.config.step_range
            if compile_steps is None:
                from runtime.policy import automatic_steps

                compile_steps = automatic_steps(self.config)
            elif compile_steps == "all":
                compile_steps = range(lo, hi + 1)
            elif isinstance(compile_steps, str):
                raise ValueError(f"compile_steps={compile_steps!r}: must be 'all' or a list of step counts")
            cache = None if cache_dir is None else Path(cache_dir)
            self.compiled = CompiledDecode(self.model, cache, compile_steps)
            self.name = "torch-aot"
        elif compile_steps is not None:
            raise ValueError("compile_steps: needs compile=True")

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
        """One new token per row (B, 1) through the compiled decode -> logits (B, 1, V).

        Rows are grouped by step count: a step count with a whole-decode graph
        runs its rows in one call; the remaining rows run block by block.
        """
        assert self.compiled is not None
        positions, steps = prepare_inputs(self.config, tokens, positions, steps, experts, kv)
        if kv.pool.k.dtype != self.compiled.dtype:
            raise ValueError(
                f"KV pool dtype {kv.pool.k.dtype} differs from the model's {self.compiled.dtype}; "
                "compiled decode needs both equal"
            )
        graphs = self.compiled.graph_steps
        rows_by_steps: dict[int, list[int]] = {}
        for b, n in enumerate(steps.tolist()):
            rows_by_steps.setdefault(n, []).append(b)
        if len(rows_by_steps) == 1:  # the common case: no row selection at all
            n = next(iter(rows_by_steps))
            if n in graphs:
                return self._graph_decode(n, tokens, positions, kv, experts)
            return self._block_decode(tokens, positions, steps, kv, experts)
        # One group per step count with a graph, then every other row together (n = None).
        groups: list[tuple[int | None, list[int]]] = [(n, r) for n, r in rows_by_steps.items() if n in graphs]
        rest = [b for n, rows in rows_by_steps.items() if n not in graphs for b in rows]
        if rest:
            groups.append((None, rest))
        parts: list[tuple[Tensor, ModelOutput]] = []
        for n, rows in groups:
            idx = torch.tensor(rows)
            sel = None if experts is None else experts[idx]
            if n is None:
                out = self._block_decode(tokens[idx], positions[idx], steps[idx], kv.rows(rows), sel)
            else:
                out = self._graph_decode(n, tokens[idx], positions[idx], kv.rows(rows), sel)
            parts.append((idx, out))
        B, V = tokens.shape[0], parts[0][1].logits.shape[-1]
        logits = parts[0][1].logits.new_empty(B, 1, V)
        counts: Tensor | None = None
        for idx, out in parts:
            logits[idx] = out.logits
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
        return ModelOutput(logits, None, counts)

    def _graph_decode(
        self, n: int, tokens: Tensor, positions: Tensor, kv: KVBatch, experts: Tensor | None
    ) -> ModelOutput:
        """Rows that all run `n` steps, `n` in `compiled.graph_steps`: one graph call."""
        assert self.compiled is not None
        # Pages covering every row's new position (the past and the page the new key goes to).
        P = int(positions.max()) // kv.pool.page_size + 1
        tables = kv.block_tables[:, :n, :P].contiguous()  # (B, n, P)
        pool = (kv.pool.k, kv.pool.v)  # written in place by the graph
        logits, counts = self.compiled.run_graph(n, tokens, positions, pool, tables, experts)
        return ModelOutput(logits, None, counts)

    def _block_decode(
        self, tokens: Tensor, positions: Tensor, steps: Tensor, kv: KVBatch, experts: Tensor | None
    ) -> ModelOutput:
        """Any step counts: `run_trunk` with every block application a compiled step."""
        assert self.compiled is not None
        m, c = self.model, self.config
        pool = (kv.pool.k, kv.pool.v)
        run_block = self.compiled.run_block

        def block_fn(
            k: int, x: Tensor, h: Tensor, window: Tensor, pos: Tensor, setting: Tensor | None
        ) -> BlockOut:
            return run_block(k, pool, x, h, window, pos, setting)

        x = m.embed(tokens, positions)  # (B, 1, d)
        x, _, counts = run_trunk(c, x, positions, steps, kv, experts, block_fn, reads_pool=True)
        return ModelOutput(m.logits(x, self.compiled.head_t), None, counts)
