"""Torch backend: the shared trunk loop under `torch.inference_mode()`, eager or with compiled decode.

Eager, every forward is `models.trunk.run_forward` with the model's own
modules (`EagerExecutor`). With a `CompileSpec`, decode forwards (one new
token per row against a cache) run ahead-of-time compiled
(runtime/backends/aot_decode.py): rows whose step count has a whole-decode
graph run as one native call per step count in the batch (the graph is the
same loop, traced), and the other rows run the same loop with every block
application a compiled step (`CompiledExecutor`), so any mix of per-row step
counts and expert settings works; forwards with several new tokens per row
(prompts, chunks, drafts) stay eager.

A model that brings its own executor (`model.executor()`: an `OuroLM`,
models/ouro.py, whose trunk step is a loop over its decoder layers) runs
eager through it; the compiled decode is built for LeanLM blocks only.
"""

from __future__ import annotations

import torch

from models.executors import EagerExecutor
from models.model import LeanLM
from models.ouro import OuroLM
from models.trunk import Executor, Forward, ModelOutput, run_forward
from runtime.settings import CompileSpec


class TorchBackend:
    """Runs a `LeanLM` in eval mode without autograd bookkeeping.

    Attributes:
        config: the model's config.
        name: "torch" or "torch-aot" (compiled decode).
        device, dtype: where and in what the weights (and so the KV pool) live.
    """

    name = "torch"

    def __init__(self, model: LeanLM | OuroLM, compile: CompileSpec | None = None) -> None:
        """Wrap a model.

        Args:
            model: the model (moved to eval mode here).
            compile: run decode forwards as AOTInductor-compiled graphs
                (compiled on first use, ~15 s per block structure and ~20-60 s
                per whole-decode graph on one core, then cached on disk), with
                whole-decode graphs for `compile.graph_steps(config)`; None =
                eager. Dense and MoE FFNs; a tree FFN raises ValueError.
        """
        self.model = model.eval()
        self.config = model.config
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        own = getattr(model, "executor", None)
        self.eager: Executor = own() if callable(own) else EagerExecutor(self.model)
        self.compiled = None
        if compile is not None and not isinstance(model, LeanLM):
            raise ValueError(
                f"compile: the compiled decode is built for LeanLM blocks; serve {type(model).__name__} "
                "eager (compile off)"
            )
        if compile is not None:
            from runtime.backends.aot_decode import CompiledDecode, CompiledExecutor

            if self.device.type != "cpu":
                raise ValueError(
                    f"compile: the compiled decode path runs on CPU, the model is on {self.device}"
                )
            self.compiled = CompiledDecode(self.model, compile.cache_dir, compile.graph_steps(self.config))
            self.compiled_executor = CompiledExecutor(self.compiled)
            self.name = "torch-aot"

    def forward(self, fwd: Forward) -> ModelOutput:
        """Run one forward (`models.trunk.Forward`, tensors on the model's device)."""
        with torch.inference_mode():
            if (
                self.compiled is not None
                and fwd.cache is not None
                and fwd.tokens.shape[1] == 1
                and fwd.last_index is None
                and fwd.exit_threshold is None
            ):
                return self._decode(fwd)
            return run_forward(self.eager, self.config, fwd)

    def _decode(self, fwd: Forward) -> ModelOutput:
        """One new token per row through the compiled decode -> logits (B, 1, V).

        Rows are grouped by step count: a step count with a whole-decode graph
        runs its rows in one call; the remaining rows run block by block.
        """
        assert self.compiled is not None
        graphs = self.compiled.graph_steps
        rows_by_steps: dict[int, list[int]] = {}
        for b, n in enumerate(fwd.steps):
            rows_by_steps.setdefault(n, []).append(b)
        if len(rows_by_steps) == 1:  # the common case: no row selection at all
            return self._group(next(iter(rows_by_steps)) in graphs, fwd)
        # One group per step count with a graph, then every other row together.
        groups = [(True, rows) for n, rows in rows_by_steps.items() if n in graphs]
        rest = [b for n, rows in rows_by_steps.items() if n not in graphs for b in rows]
        if rest:
            groups.append((False, rest))
        logits: torch.Tensor | None = None
        counts: torch.Tensor | None = None
        for graph, rows in groups:
            out = self._group(graph, fwd.select(rows))
            if logits is None:
                logits = out.logits.new_empty(len(fwd.steps), 1, out.logits.shape[-1])
            logits[torch.tensor(rows)] = out.logits
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
        assert logits is not None
        return ModelOutput(logits, None, counts)

    def _group(self, graph: bool, fwd: Forward) -> ModelOutput:
        assert self.compiled is not None
        if graph:
            return self.compiled.run_graph(fwd)
        return run_forward(self.compiled_executor, self.config, fwd)
