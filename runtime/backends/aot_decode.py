"""Ahead-of-time compiled decode steps for the torch backend (torch.export + AOTInductor).

Why: at the widths this project serves on CPU, one eager block application
at decode is ~60 small aten operators (norms, views, the paged gather, the
mask, attention, residuals), so it is bound by per-operator dispatch, not by
arithmetic: ~160 us per block at batch 1 for stack-tiny, of which the four
matmuls are a small part. Compiled, the same block is a handful of fused C++
loops around the matmuls and attention: ~26 us at batch 1 (6x), ~135 vs ~500 us
at batch 16 with 48-token pasts (issue notes; `leanserve bench engine --compile`).

What is compiled: one *decode step* of one block (T = 1 new token per row),
from the paged pool to the new residual stream:

    block (models/layers.py) -> x_out, k_new, v_new, with its attention
    computed by `paged_attention` straight from the pool: past key j of a
    row is read through its page table, visible iff j < the row's position;
    the new key is always visible

The loop around it stays in Python (`models.trunk.run_forward` with
`CompiledExecutor` below): per-row step counts, which rows run which block at
step i, the step size h, and the scatter of all steps' new keys and values
into the pages (one write after the last step). So one compiled artifact
serves every step count, batch size and cache length: rows R and pages P are
symbolic (`torch.export.Dim`), and the weights are graph *inputs*, so the
blocks of one structure (same parameter names and shapes) share one artifact,
and a retrained model of the same architecture reuses it.

Whole-decode graphs: for chosen step counts N (`graph_steps`) the entire
decode forward of rows that all run N steps is one more artifact: the trunk
loop itself, `models.trunk.run_forward` with `models.executors.PoolExecutor`,
traced for a batch whose rows all run N steps (`_WholeDecode`),

    embed -> N block steps (the schedule's blocks) -> final norm -> head ->
    logits; every step's new keys and values written into the pool

so a token costs one native call instead of N calls and a scatter with
Python between them. At these sizes that Python is not only its own cost: it
evicts the weights from the caches between calls, so each block and the head
run ~2x slower in place than alone. Measured through the backend (stack-tiny,
one core, pinned): 601 -> 310 us per forward at batch 1, 1322 -> 996 us at
batch 16 with 48-token pasts. One artifact per (block structure, N): rows R
and pages P stay symbolic and the weights are inputs, as above. The graph
writes the pool in place (AOTInductor mutates the input buffer itself, ~2 us;
nothing copies the pool). Batches that mix step counts run each step count
that has a graph as its own group and the rest through the per-block steps
(runtime/backends/torch_backend.py).

Prefill (T > 1) stays eager: it runs once per request and is matmul-bound.

Conditional FFNs: the sort-based expert dispatch of models/ffn.py does a host
sync per block, which a compiled graph cannot. `_RoutedMoE` below routes each
token to its top-k experts with data-dependent (unbacked) sizes inside the
graph: per expert, the assignments routed to it are selected with `nonzero`,
run through that expert only, and added back. Tree FFNs are not compiled (the
backend refuses `compile=True` for them with a clear error).

Artifacts are cached on disk (`cache_dir`, default `$LEANSERVE_CACHE` or
`~/.cache/leanserve`) under a key of the block structure, the architecture
fields of the config, dtype, torch version, Python version, machine and torch
thread count, since AOTInductor output is native code for exactly that
combination (parallel loops only when compiled with more than one thread). A first
compile takes ~15 s per structure on one core of a 2-vCPU machine; loading a
cached one ~2 s.

Shape legend:
    R | rows in the step   P | pages in the row's past window   S | P * page_size
    d | model width        nh, hs | heads, head size              E | experts
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.executors import PoolExecutor, paged_attention, pool_block
from models.export import config_hash
from models.ffn import FFNOut, MoEFFN
from models.kv_cache import KVStorage
from models.layers import Block, BlockOut
from models.model import LeanLM
from models.trunk import CacheView, Forward, ModelOutput, StepView, run_forward

__all__ = ["CompiledDecode", "CompiledExecutor", "paged_attention"]

log = logging.getLogger(__name__)

CACHE_ENV = "LEANSERVE_CACHE"
ARTIFACT_FORMAT = 7  # 7: whole-decode graphs take the cache view (slots, windows), write the pool last
COMPILABLE_FFNS = ("dense", "moe")


def default_cache_dir() -> Path:
    """`$LEANSERVE_CACHE`, else `~/.cache/leanserve`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "leanserve"


class _RoutedMoE(nn.Module):
    """`MoEFFN` in a form torch.export can trace, still conditional.

    Same routing and result as `MoEFFN.forward`: top-k experts per token,
    weights renormalised over the kept ones (`setting` = k per token), and
    only the routed assignments go through an expert. The group sizes are
    data-dependent (unbacked) inside the graph instead of a host-side list.
    """

    def __init__(self, moe: MoEFFN) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: Tensor, setting: Tensor | None = None) -> FFNOut:
        """x (M, d), setting (M,) or None -> y (M, d), counts (E,)."""
        m = self.moe
        M, E, K = x.shape[0], m.n_experts, m.top_k
        _, weights, top_i, keep = m.route(x, setting)  # weights (M, K), 0 where dropped
        token = torch.arange(M, device=x.device)[:, None].expand(M, K).reshape(-1)  # (M*K,)
        expert = torch.where(keep, top_i, E).reshape(-1)  # (M*K,) E = dropped
        w = weights.reshape(-1)  # (M*K,)
        y = torch.zeros_like(x)
        for e in range(E):
            sel = (expert == e).nonzero().squeeze(1)  # (A_e,) unbacked size
            tok = token[sel]
            hid = m.act(x[tok] @ m.w_up[e])  # (A_e, f)
            y = y.index_add(0, tok, (hid @ m.w_down[e]) * w[sel, None])
        counts = torch.stack([(expert == e).sum() for e in range(E)])  # (E,)
        return FFNOut(y, counts, None)


class _Traceable(nn.Module):
    """`module` with its weights as trailing inputs: one artifact serves every
    module of the same structure (and a retrained model of the same shape)."""

    def __init__(self, inner: nn.Module, n_inputs: int) -> None:
        super().__init__()
        self.inner = inner
        self.n_inputs = n_inputs
        self.param_names = [name for name, _ in inner.named_parameters()]

    def weights(self) -> list[Tensor]:
        """The trailing inputs, in `param_names` order."""
        return [p.detach() for _, p in self.inner.named_parameters()]

    def forward(self, *args: Tensor) -> Any:
        inputs, params = args[: self.n_inputs], args[self.n_inputs :]
        return torch.func.functional_call(self.inner, dict(zip(self.param_names, params)), inputs)


def traceable_block(block: Block, config: ModelConfig) -> Block:
    """A shallow copy of `block` whose FFN torch.export can trace (MoE -> `_RoutedMoE`)."""
    blk = copy.copy(block)
    blk._modules = dict(block._modules)  # copy.copy shares the dict; leave the model's block alone
    if config.ffn == "moe":
        blk._modules["ffn"] = _RoutedMoE(block.ffn)
    return blk


def traceable_model(model: LeanLM) -> LeanLM:
    """A shallow copy of `model` (same parameters) with traceable blocks."""
    m = copy.copy(model)
    m._modules = dict(model._modules)
    m._modules["blocks"] = nn.ModuleList(traceable_block(b, model.config) for b in model.blocks)
    return m


class _PoolStep(nn.Module):
    """One block's decode step from the paged pool (`models.executors.pool_block`)."""

    def __init__(self, block: Block, config: ModelConfig) -> None:
        super().__init__()
        self.block = traceable_block(block, config)
        self.has_setting = config.ffn != "dense"

    def forward(
        self,
        x: Tensor,
        h: Tensor,
        pool_k: Tensor,
        pool_v: Tensor,
        window: Tensor,
        positions: Tensor,
        setting: Tensor,
    ) -> tuple[Tensor, ...]:
        """x (R, 1, d), h (R, 1, 1), pool (pages, page, nh, hs), window (R, P), positions (R, 1),
        setting (R,) -> x_out (R, 1, d), k_new, v_new (R, nh, 1, hs)[, counts (E,)]."""
        out = pool_block(
            self.block, x, h, pool_k, pool_v, window, positions, setting if self.has_setting else None
        )
        return (out.x, out.k, out.v, out.counts) if self.has_setting else (out.x, out.k, out.v)


class _WholeDecode(nn.Module):
    """The decode forward of rows that all run `n_steps` steps: `run_forward` with `PoolExecutor`."""

    def __init__(self, model: LeanLM, n_steps: int) -> None:
        super().__init__()
        self.model = traceable_model(model)
        self.n_steps = n_steps
        self.has_setting = model.config.ffn != "dense"

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        pool_k: Tensor,
        pool_v: Tensor,
        slots: Tensor,
        windows: Tensor,
        setting: Tensor,
        head_t: Tensor,
    ) -> tuple[Tensor, ...]:
        """One new token per row through the whole model.

        Args:
            tokens, positions: (R, 1) the new token and its position (= the
                row's past length).
            pool_k, pool_v: (pages, page_size, nh, hs) the whole KV pool;
                mutated: every step's new keys and values are written into it.
            slots: (N, R, 1) the new token's flat slot at each step.
            windows: (N, R, P) the pages each step reads (-1 = none).
            setting: (R,) experts top-k per row (ignored by a dense FFN).
            head_t: (d, V) the output matrix laid out for the matmul.

        Returns:
            logits (R, 1, V), and for MoE the routed-token counts (E,).
        """
        cache = CacheView(KVStorage(pool_k, pool_v), slots, windows)
        experts = setting if self.has_setting else None
        fwd = Forward(tokens, positions, (self.n_steps,), experts, cache, last_only=True, traced=True)
        out = run_forward(PoolExecutor(self.model, head_t), self.model.config, fwd)
        return (out.logits, out.expert_counts) if self.has_setting else (out.logits,)


def structure_key(block: Block, config: ModelConfig, dtype: torch.dtype) -> str:
    """Cache key of a block's compiled decode step (see the module docstring)."""
    data = {
        "format": ARTIFACT_FORMAT,
        "config": config_hash(config),
        "params": [(n, list(p.shape)) for n, p in block.named_parameters()],
        "dtype": str(dtype),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        # Inductor emits OpenMP loops only when compiling with more than one thread.
        "threads": torch.get_num_threads(),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def graph_key(model: LeanLM, n_steps: int, dtype: torch.dtype) -> str:
    """Cache key of a model structure's whole-decode graph for `n_steps` steps."""
    blocks = [structure_key(block, model.config, dtype) for block in model.blocks]
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters() if not n.startswith("blocks.")]
    data = {"blocks": blocks, "rest": shapes, "steps": n_steps}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def head_matrix(model: LeanLM) -> Tensor:
    """The output matrix as a contiguous (d, V) copy.

    `x @ W_t` is ~30 % faster than `x @ W.t()` at decode's few rows on CPU
    (123 vs 177 us for 16 x 128 x 4096). Costs V x d more memory (2 MB for the zoo).
    """
    head = model.wte.weight if model.head is None else model.head.weight
    return head.detach().t().contiguous()


def _full_setting(config: ModelConfig) -> int:
    """The graphs' `setting` when a row gives none: the trained maximum (a dense FFN ignores it)."""
    e = config.expert_setting
    return 0 if e is None else e.default


def _aot_compile(module: nn.Module, args: tuple[Tensor, ...], dynamic: list[Any], path: Path) -> None:
    """Export `module` at `args` with `dynamic` shapes and AOT-compile it to `path` (atomically)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter
        program = torch.export.export(module, args, dynamic_shapes=tuple(dynamic), strict=False)
        # Core-ATen decompositions (the norms, the MoE's ops) so inductor fuses them.
        program = program.run_decompositions()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Compile to a temporary name and rename: a concurrent loader never sees half a file.
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _dims(config: ModelConfig) -> tuple[Any, Any, Any, Any]:
    """Symbolic rows, window pages, pool pages and page size (`torch.export.Dim`)."""
    from torch.export import Dim

    R, P = Dim("R", min=1, max=1 << 16), Dim("P", min=1, max=max(2, config.context_length))
    pages, page = Dim("pages", min=1), Dim("page", min=1, max=max(2, config.context_length))
    return R, P, pages, page


# Example sizes avoid 0 and 1 so that torch.export keeps every dynamic axis symbolic.
_R, _P, _PAGE, _POOL = 2, 2, 4, 3


def _example_pool(config: ModelConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    shape = (_POOL, _PAGE, config.n_heads, config.head_dim)
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def compile_step(step: _Traceable, config: ModelConfig, dtype: torch.dtype, path: Path) -> None:
    """Export one block's decode step (`_PoolStep`) with symbolic rows, pages and page size."""
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(_R, 1, config.d_model, generator=g, dtype=dtype),  # x
        torch.full((_R, 1, 1), 0.5, dtype=dtype),  # h
        *_example_pool(config, dtype),
        torch.zeros(_R, _P, dtype=torch.long),  # window
        torch.full((_R, 1), _P * _PAGE - 1, dtype=torch.long),  # positions
        torch.full((_R,), _full_setting(config), dtype=torch.long),  # setting
        *step.weights(),
    )
    R, P, pages, page = _dims(config)
    dynamic: list[Any] = [
        {0: R},
        {0: R},
        {0: pages, 1: page},
        {0: pages, 1: page},
        {0: R, 1: P},
        {0: R},
        {0: R},
    ]
    dynamic += [None] * (len(args) - len(dynamic))  # weights: static shapes
    _aot_compile(step.eval(), args, [tuple(dynamic)], path)  # one entry: `_Traceable.forward(*args)`


def compile_graph(graph: _Traceable, n_steps: int, head_t: Tensor, dtype: torch.dtype, path: Path) -> None:
    """Export a whole-decode graph (`_WholeDecode` for `n_steps`) and AOT-compile it to `path`."""
    c = graph.inner.model.config
    args = (
        torch.ones(_R, 1, dtype=torch.long),  # tokens
        torch.full((_R, 1), _P * _PAGE - 1, dtype=torch.long),  # positions
        *_example_pool(c, dtype),
        torch.zeros(n_steps, _R, 1, dtype=torch.long),  # slots
        torch.zeros(n_steps, _R, _P, dtype=torch.long),  # windows
        torch.full((_R,), _full_setting(c), dtype=torch.long),  # setting
        head_t,
        *graph.weights(),
    )
    R, P, pages, page = _dims(c)
    dynamic: list[Any] = [
        {0: R},  # tokens
        {0: R},  # positions
        {0: pages, 1: page},  # pool_k
        {0: pages, 1: page},  # pool_v
        {1: R},  # slots
        {1: R, 2: P},  # windows
        {0: R},  # setting
        None,  # head_t
    ]
    dynamic += [None] * (len(args) - len(dynamic))
    _aot_compile(graph.eval(), args, [tuple(dynamic)], path)  # one entry: `_Traceable.forward(*args)`


class CompiledDecode:
    """The compiled decode of one model: per-block steps (`run_block`, what
    `CompiledExecutor` runs) and whole-decode graphs for `graph_steps` (`run_graph`)."""

    def __init__(self, model: LeanLM, cache_dir: Path | None = None, graph_steps: Iterable[int] = ()) -> None:
        """Load (or compile and cache) the decode step of every distinct block
        structure and the whole-decode graph of every step count in `graph_steps`.

        Args:
            model: the model (eval mode; its parameters are passed to the graphs,
                and the KV pool must have their dtype).
            cache_dir: artifact cache (default `default_cache_dir()`).
            graph_steps: step counts that get a whole-decode graph, as
                `runtime.settings.CompileSpec.graph_steps` resolved and checked them.

        Raises:
            ValueError: the model's FFN cannot be compiled (names `compile` and the FFN).
        """
        c = model.config
        if c.ffn not in COMPILABLE_FFNS:
            raise ValueError(
                f"compile: the compiled decode path supports ffn in {COMPILABLE_FFNS}, this model has "
                f"ffn={c.ffn!r}; run it without compile"
            )
        graph_steps = sorted(set(graph_steps))
        self.model = model
        self.config = c
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.dtype = dtype = next(model.parameters()).dtype  # the KV pool must match
        self._runners: dict[str, Any] = {}
        self._blocks: list[tuple[str, list[Tensor]]] = []
        self.compiled_keys: list[str] = []  # compiled by this process (the rest came from the cache)
        for block in model.blocks:
            step = _Traceable(_PoolStep(block, c), 7)
            key = structure_key(block, c, dtype)
            if key not in self._runners:
                self._runners[key] = self._load(
                    f"decode-step-{key}", lambda path, s=step: compile_step(s, c, dtype, path)
                )
            self._blocks.append((key, step.weights()))
        self._default_settings: dict[int, Tensor] = {}  # rows -> (R,) the trained maximum
        self.head_t = head_matrix(model)  # (d, V)
        self._graphs: dict[int, tuple[Any, list[Tensor]]] = {}
        for n in graph_steps:
            graph = _Traceable(_WholeDecode(model, n), 8)
            runner = self._load(
                f"decode-graph-{graph_key(model, n, dtype)}",
                lambda path, g=graph, n=n: compile_graph(g, n, self.head_t, dtype, path),
            )
            self._graphs[n] = (runner, [self.head_t, *graph.weights()])

    @property
    def graph_steps(self) -> frozenset[int]:
        """Step counts with a whole-decode graph."""
        return frozenset(self._graphs)

    def _load(self, name: str, compile_to: Any) -> Any:
        """The runner of artifact `name`, compiled with `compile_to(path)` unless cached."""
        path = self.cache_dir / "aot" / f"{name}.pt2"
        if not path.is_file():
            t0 = time.perf_counter()
            log.info("compiling %s of %s (first use; cached in %s)", name, self.config.name, path)
            compile_to(path)
            log.info("compiled in %.1f s", time.perf_counter() - t0)
            self.compiled_keys.append(name)
        # The package's Python wrapper re-parses its call spec (JSON) and
        # pytree-flattens every call (~20 us); the inputs are already a flat
        # tensor list in the exported order, so call the loader directly.
        return torch._inductor.aoti_load_package(str(path)).loader.boxed_run

    def _setting(self, R: int, setting: Tensor | None) -> Tensor:
        """The graphs take a (R,) setting; None = the trained maximum (a dense FFN ignores it)."""
        if setting is not None:
            return setting
        default = self._default_settings.get(R)
        if default is None:
            default = torch.full((R,), _full_setting(self.config), dtype=torch.long)
            self._default_settings[R] = default
        return default

    def run_block(
        self,
        k: int,
        pool: tuple[Tensor, Tensor],
        x: Tensor,
        h: Tensor,
        window: Tensor,
        positions: Tensor,
        setting: Tensor | None,
    ) -> BlockOut:
        """Block `k`'s decode step: x (R, 1, d), h (R, 1, 1), window (R, P), positions (R, 1)."""
        key, params = self._blocks[k]
        setting = self._setting(x.shape[0], setting)
        out = self._runners[key]([x, h, *pool, window, positions, setting, *params])
        counts = out[3] if len(out) > 3 else None
        return BlockOut(out[0], out[1], out[2], counts, None)

    def run_graph(self, fwd: Forward) -> ModelOutput:
        """The whole decode of a forward whose rows all run one step count in `graph_steps`.

        Writes the new keys and values of every step into the storage.
        """
        cache = fwd.cache
        assert cache is not None
        runner, weights = self._graphs[fwd.steps[0]]
        s = cache.storage
        setting = self._setting(fwd.tokens.shape[0], fwd.experts)
        out = runner([fwd.tokens, fwd.positions, s.k, s.v, cache.slots, cache.windows, setting, *weights])
        return ModelOutput(out[0], None, out[1] if len(out) > 1 else None)


class CompiledExecutor:
    """The trunk loop's executor over the compiled per-block decode steps (one new token per row)."""

    stores_kv = False

    def __init__(self, compiled: CompiledDecode) -> None:
        self.compiled = compiled
        self.model = compiled.model

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.model.embed(tokens, positions)

    def head(self, x: Tensor) -> Tensor:
        return self.model.logits(x, self.compiled.head_t)

    def block(self, k: int, x: Tensor, h: Tensor, view: StepView, setting: Tensor | None) -> BlockOut:
        storage = view.storage
        if storage is None or view.window is None:
            raise ValueError("CompiledExecutor: reads the KV pool, so it needs a cache view")
        return self.compiled.run_block(k, (storage.k, storage.v), x, h, view.window, view.positions, setting)
