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

The loop around it stays in Python (`models.model.run_trunk` with
`reads_pool=True`): per-row step counts, which rows run which block at step
i, the step size h, and the scatter of all steps' new keys and values into
the pages (one write after the last step). So one compiled artifact
serves every step count, batch size and cache length: rows R and pages P are
symbolic (`torch.export.Dim`), and the weights are graph *inputs*, so the
blocks of one structure (same parameter names and shapes) share one artifact,
and a retrained model of the same architecture reuses it.

Whole-decode graphs: for chosen step counts N (`graph_steps`) the entire
decode forward of rows that all run N steps is one more artifact,

    embed -> N block steps (the blocks `run_trunk` would pick) -> final norm
    -> head -> logits; every step's new keys and values written into the pool

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
from models.export import config_hash
from models.ffn import FFNOut, MoEFFN
from models.layers import Block, BlockOut
from models.model import LeanLM

log = logging.getLogger(__name__)

CACHE_ENV = "LEANSERVE_CACHE"
ARTIFACT_FORMAT = 5
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


def paged_attention(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    pool_k: Tensor,
    pool_v: Tensor,
    window: Tensor,
    positions: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Decode attention straight from the paged pool (an `AttendFn` for one new token per row).

    Written as gathers feeding elementwise products and reductions rather
    than gather -> copy -> matmul: inductor fuses each page lookup into the
    reduction that consumes it, so the past keys and values are read once
    from the pool and never copied into a dense (R, nh, S, hs) tensor. At
    stack-tiny's sizes (16 rows, 48-token pasts) that is ~60 vs ~150 us per
    block application (the gather and the copy were most of it).

    Args:
        q, k_new, v_new: (R, nh, 1, hs) the new token's query, key and value.
        pool_k, pool_v: (pages, page_size, nh, hs) the whole KV pool.
        window: (R, P) page ids of the row's past (-1 = none; masked).
        positions: (R, 1) the new token's position = the row's past length.
        scale: softmax scale.

    Returns:
        The softmax attention over [past, new] and the mean of the visible
        values, each (R, nh, 1, hs).
    """
    R, P = window.shape
    page = pool_k.shape[1]
    pages = window.clamp(min=0)
    past_k, past_v = pool_k[pages], pool_v[pages]  # (R, P, page, nh, hs), fused into the reductions
    qh, kh, vh = q.squeeze(2), k_new.squeeze(2), v_new.squeeze(2)  # (R, nh, hs)
    keys = torch.arange(P * page, device=q.device).view(1, P, page)
    visible = (keys < positions.view(R, 1, 1))[..., None]  # (R, P, page, 1) key j < the row's past length
    s_past = (qh[:, None, None] * past_k).sum(-1) * scale  # (R, P, page, nh)
    s_past = s_past.masked_fill(~visible, float("-inf"))
    s_new = (qh * kh).sum(-1) * scale  # (R, nh); the new key is always visible
    top = torch.maximum(s_past.amax(dim=(1, 2)), s_new)  # (R, nh)
    e_past = torch.exp(s_past - top[:, None, None])  # (R, P, page, nh); 0 where masked
    e_new = torch.exp(s_new - top)  # (R, nh)
    total = e_past.sum(dim=(1, 2)) + e_new  # (R, nh)
    a = ((e_past[..., None] * past_v).sum(dim=(1, 2)) + e_new[..., None] * vh) / total[..., None]
    # The mean's weights are read from the scores' buffer (finite = visible), not
    # recomputed from positions: inlined into the reduction, the mask's index
    # arithmetic made this term alone ~1.6 ms at 16 rows (vs ~40 us).
    shown = torch.isfinite(s_past).to(q.dtype)  # (R, P, page, nh)
    count = shown.sum(dim=(1, 2)) + 1  # (R, nh) visible keys, the new one included
    mean = ((shown[..., None] * past_v).sum(dim=(1, 2)) + vh) / count[..., None]  # (R, nh, hs)
    return a.unsqueeze(2), mean.unsqueeze(2)


class DecodeStep(nn.Module):
    """One block's decode step from the paged pool; weights are inputs (see module docstring)."""

    def __init__(self, block: Block, config: ModelConfig) -> None:
        super().__init__()
        blk = copy.copy(block)
        blk._modules = dict(block._modules)  # copy.copy shares the dict; leave the model's block alone
        if config.ffn == "moe":
            blk._modules["ffn"] = _RoutedMoE(block.ffn)
        self.block = blk
        self.param_names = [name for name, _ in blk.named_parameters()]  # same order as block.parameters()
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
        *params: Tensor,
    ) -> tuple[Tensor, ...]:
        """One Euler step of the block for one new token per row.

        Args:
            x: (R, 1, d) residual stream; h: (R, 1, 1) step size.
            pool_k, pool_v: (pages, page_size, nh, hs) the whole KV pool.
            window: (R, P) page ids of the row's past (-1 = none, masked).
            positions: (R, 1) the new token's position = the row's past length.
            setting: (R,) experts top-k per row (ignored by a dense FFN).
            *params: the block's parameters in `param_names` order.

        Returns:
            x_out (R, 1, d), k_new and v_new (R, nh, 1, hs), and for MoE the
            routed-token counts (E,).
        """
        scale = self.block.attn.scale

        def attend(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            return paged_attention(q, k, v, pool_k, pool_v, window, positions, scale)

        weights = dict(zip(self.param_names, params))
        none = x.new_zeros(0)  # the past tensors and mask: `attend` reads the pool instead
        out: BlockOut = torch.func.functional_call(
            self.block,
            weights,
            (x, h, none, none, none, setting if self.has_setting else None),
            {"attend": attend},
        )
        if self.has_setting:
            return out.x, out.k, out.v, out.counts
        return out.x, out.k, out.v


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


def full_setting(config: ModelConfig) -> int:
    """The graph's `setting` when a row gives none: the trained top-k (a dense FFN ignores it)."""
    top = config.max_expert_setting
    return 0 if top is None else top


def _example_inputs(block: Block, config: ModelConfig, dtype: torch.dtype) -> tuple[Tensor, ...]:
    # Sizes avoid 0 and 1 so that torch.export keeps every dynamic axis symbolic.
    R, P, d, page = 2, 2, config.d_model, 4
    pool = tuple(torch.zeros(3, page, config.n_heads, config.head_dim, dtype=dtype) for _ in range(2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(R, 1, d, generator=g, dtype=dtype)
    h = torch.full((R, 1, 1), 0.5, dtype=dtype)
    window = torch.zeros(R, P, dtype=torch.long)
    positions = torch.full((R, 1), P * page - 1, dtype=torch.long)
    setting = torch.full((R,), full_setting(config), dtype=torch.long)
    return (x, h, *pool, window, positions, setting, *(p.detach() for p in block.parameters()))


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
    """Symbolic rows, past pages, pool pages and page size (`torch.export.Dim`)."""
    from torch.export import Dim

    R, P = Dim("R", min=1, max=1 << 16), Dim("P", min=1, max=max(2, config.context_length))
    pages, page = Dim("pages", min=1), Dim("page", min=1, max=max(2, config.context_length))
    return R, P, pages, page


def compile_step(block: Block, config: ModelConfig, dtype: torch.dtype, path: Path) -> None:
    """Export one block's decode step with symbolic rows, pages and page size; AOT-compile it to `path`."""
    step = DecodeStep(block, config).eval()
    args = _example_inputs(block, config, dtype)
    R, P, pages, page = _dims(config)
    dynamic: list[Any] = [
        {0: R},  # x
        {0: R},  # h
        {0: pages, 1: page},  # pool_k
        {0: pages, 1: page},  # pool_v
        {0: R, 1: P},  # window
        {0: R},  # positions
        {0: R},  # setting
    ]
    dynamic.append(tuple([None] * (len(args) - len(dynamic))))  # *params: weights have static shapes
    _aot_compile(step, args, dynamic, path)


class DecodeGraph(nn.Module):
    """A whole decode forward for rows that all run `n_steps` steps; weights are inputs.

    embed -> the `n_steps` block steps of `run_trunk` (step i runs block
    floor(i * n_blocks / n_steps) with h = horizon / n_steps, each a
    `DecodeStep`) -> final norm -> head -> logits times the output
    multiplier, as `LeanLM.forward` with `last_only` computes them for one new
    token per row. Writes each step's new key and value into the pool (in
    place, after every step has read its past).
    """

    def __init__(self, model: LeanLM, n_steps: int) -> None:
        super().__init__()
        c = model.config
        self.steps = nn.ModuleList(DecodeStep(block, c) for block in model.blocks)
        self.order = [(i * c.n_blocks) // n_steps for i in range(n_steps)]
        self.n_steps = n_steps
        self.horizon = c.horizon
        self.norm_f = model.norm_f
        self.norm_names = [name for name, _ in model.norm_f.named_parameters()]
        ends = [len(self.norm_names)]
        for step in self.steps:
            ends.append(ends[-1] + len(step.param_names))
        self.spans = list(zip(ends[:-1], ends[1:]))  # block k's slice of *params
        self.logit_mult = c.logit_mult
        self.has_setting = c.ffn != "dense"

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        pool_k: Tensor,
        pool_v: Tensor,
        tables: Tensor,
        setting: Tensor,
        wte: Tensor,
        wpe: Tensor,
        head_t: Tensor,
        *params: Tensor,
    ) -> tuple[Tensor, ...]:
        """One new token per row through the whole model.

        Args:
            tokens, positions: (R, 1) the new token and its position (= the
                row's past length).
            pool_k, pool_v: (pages, page_size, nh, hs) the whole KV pool;
                mutated: the new keys and values are written into it.
            tables: (R, N, P) the row's page ids per step (-1 = none), P pages
                covering every row's new position; past pages are read
                (the new token's page too, masked), the new one is written.
            setting: (R,) experts top-k per row (ignored by a dense FFN).
            wte: (V, d) token embedding; wpe: (context, d) positions; head_t:
                (d, V) the output matrix laid out for the matmul.
            *params: the final norm's parameters, then each block's in
                `DecodeStep.param_names` order, blocks in model order.

        Returns:
            logits (R, 1, V), and for MoE the routed-token counts (E,) summed
            over the steps.
        """
        R, page = tokens.shape[0], pool_k.shape[1]
        x = wte[tokens] + wpe[positions]  # (R, 1, d)
        h = self.horizon / torch.full_like(x[..., :1], self.n_steps)  # (R, 1, 1) as run_trunk computes it
        windows = tables.transpose(0, 1)  # (N, R, P)
        new_page = tables.gather(2, (positions // page)[:, None, :].expand(R, self.n_steps, 1))  # (R, N, 1)
        slots = (new_page * page + (positions % page)[:, None, :]).transpose(0, 1).reshape(-1)  # (N R,)
        ks, vs, counts = [], [], []
        for i, k in enumerate(self.order):
            lo, hi = self.spans[k]
            out = self.steps[k](x, h, pool_k, pool_v, windows[i], positions, setting, *params[lo:hi])
            x = out[0]
            ks.append(out[1])
            vs.append(out[2])
            if self.has_setting:
                counts.append(out[3])
        norm = dict(zip(self.norm_names, params[: len(self.norm_names)]))
        logits = torch.func.functional_call(self.norm_f, norm, (x,)) @ head_t  # (R, 1, V)
        if self.logit_mult != 1.0:
            logits = logits * self.logit_mult
        nh, hs = pool_k.shape[2], pool_k.shape[3]
        pool_k.view(-1, nh, hs).index_copy_(0, slots, torch.cat(ks).view(-1, nh, hs))  # (N R, nh, hs)
        pool_v.view(-1, nh, hs).index_copy_(0, slots, torch.cat(vs).view(-1, nh, hs))
        return (logits, torch.stack(counts).sum(0)) if self.has_setting else (logits,)


def graph_key(model: LeanLM, n_steps: int, dtype: torch.dtype) -> str:
    """Cache key of a model structure's whole-decode graph for `n_steps` steps."""
    blocks = [structure_key(block, model.config, dtype) for block in model.blocks]
    data = {"blocks": blocks, "norm_f": [list(p.shape) for p in model.norm_f.parameters()], "steps": n_steps}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def _graph_params(model: LeanLM) -> list[Tensor]:
    """`DecodeGraph`'s *params for `model`: the final norm's, then every block's."""
    params = [p.detach() for p in model.norm_f.parameters()]
    for block in model.blocks:
        params.extend(p.detach() for p in block.parameters())
    return params


def head_matrix(model: LeanLM) -> Tensor:
    """The output matrix as a contiguous (d, V) copy.

    `x @ W_t` is ~30 % faster than `x @ W.t()` at decode's few rows on CPU
    (123 vs 177 us for 16 x 128 x 4096). Costs V x d more memory (2 MB for the zoo).
    """
    head = model.wte.weight if model.head is None else model.head.weight
    return head.detach().t().contiguous()


def compile_graph(model: LeanLM, n_steps: int, dtype: torch.dtype, path: Path) -> None:
    """Export the whole-decode graph of `model` for `n_steps` steps; AOT-compile it to `path`."""
    c = model.config
    graph = DecodeGraph(model, n_steps).eval()
    R_, P_, page_ = 2, 2, 4  # not 0 or 1: torch.export keeps every dynamic axis symbolic
    pool = tuple(torch.zeros(3, page_, c.n_heads, c.head_dim, dtype=dtype) for _ in range(2))
    args = (
        torch.ones(R_, 1, dtype=torch.long),  # tokens
        torch.full((R_, 1), P_ * page_ - 1, dtype=torch.long),  # positions
        *pool,
        torch.zeros(R_, n_steps, P_, dtype=torch.long),  # tables
        torch.full((R_,), full_setting(c), dtype=torch.long),  # setting
        model.wte.weight.detach(),
        model.wpe.weight.detach(),
        head_matrix(model),
        *_graph_params(model),
    )
    R, P, pages, page = _dims(c)
    dynamic: list[Any] = [
        {0: R},  # tokens
        {0: R},  # positions
        {0: pages, 1: page},  # pool_k
        {0: pages, 1: page},  # pool_v
        {0: R, 2: P},  # tables
        {0: R},  # setting
        None,  # wte
        None,  # wpe
        None,  # head_t
        tuple([None] * (len(args) - 9)),  # *params
    ]
    _aot_compile(graph, args, dynamic, path)


class CompiledDecode:
    """The compiled decode of one model: per-block steps (`run_block`, `run_trunk`'s
    `reads_pool` executor) and whole-decode graphs for `graph_steps` (`run_graph`)."""

    def __init__(self, model: LeanLM, cache_dir: Path | None = None, graph_steps: Iterable[int] = ()) -> None:
        """Load (or compile and cache) the decode step of every distinct block
        structure and the whole-decode graph of every step count in `graph_steps`.

        Args:
            model: the model (eval mode; its parameters are passed to the graphs,
                and the KV pool must have their dtype).
            cache_dir: artifact cache (default `default_cache_dir()`).
            graph_steps: step counts that get a whole-decode graph (each
                within the model's step range).

        Raises:
            ValueError: the model's FFN cannot be compiled (names `compile` and
                the FFN), or a step count is outside the model's range.
        """
        c = model.config
        if c.ffn not in COMPILABLE_FFNS:
            raise ValueError(
                f"compile: the compiled decode path supports ffn in {COMPILABLE_FFNS}, this model has "
                f"ffn={c.ffn!r}; run it without compile"
            )
        lo, hi = c.step_range
        graph_steps = list(graph_steps)
        bad = [n for n in graph_steps if isinstance(n, bool) or not isinstance(n, int) or not lo <= n <= hi]
        if bad:
            raise ValueError(f"compile_steps={bad}: each must be an integer in [{lo}, {hi}] for this model")
        graph_steps = sorted(set(graph_steps))
        self.config = c
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.dtype = dtype = next(model.parameters()).dtype  # the KV pool must match
        self._runners: dict[str, Any] = {}
        self._blocks: list[tuple[str, list[Tensor]]] = []
        self.compiled_keys: list[str] = []  # compiled by this process (the rest came from the cache)
        for block in model.blocks:
            key = structure_key(block, c, dtype)
            if key not in self._runners:
                self._runners[key] = self._load(
                    f"decode-step-{key}", lambda path, b=block: compile_step(b, c, dtype, path)
                )
            self._blocks.append((key, [p.detach() for p in block.parameters()]))
        self._default_settings: dict[int, Tensor] = {}  # rows -> (R,) the trained maximum
        self.head_t = head_matrix(model)  # (d, V)
        # Inputs every graph call shares, after the per-call ones (see `DecodeGraph.forward`).
        self._graph_weights = [model.wte.weight.detach(), model.wpe.weight.detach(), self.head_t]
        self._graph_weights += _graph_params(model)
        self._graphs: dict[int, Any] = {}
        for n in graph_steps:
            key = graph_key(model, n, dtype)
            self._graphs[n] = self._load(
                f"decode-graph-{key}", lambda path, n=n: compile_graph(model, n, dtype, path)
            )

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
            default = torch.full((R,), full_setting(self.config), dtype=torch.long)
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

    def run_graph(
        self,
        n_steps: int,
        tokens: Tensor,
        positions: Tensor,
        pool: tuple[Tensor, Tensor],
        tables: Tensor,
        setting: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """The whole decode of rows that all run `n_steps` steps (a step count in `graph_steps`).

        Writes the new keys and values of every step into `pool`.

        Args:
            tokens, positions: (R, 1); pool: (k, v), each (pages, page_size,
                nh, hs); tables: (R, N, P) contiguous page ids, P pages covering
                every row's new position; setting: (R,) or None (the trained
                maximum).

        Returns:
            logits (R, 1, V) and the expert counts (E,), or None (dense FFN).
        """
        setting = self._setting(tokens.shape[0], setting)
        out = self._graphs[n_steps]([tokens, positions, *pool, tables, setting, *self._graph_weights])
        return out[0], out[1] if len(out) > 1 else None
