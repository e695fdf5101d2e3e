"""ONNX export of a LeanLM as separate embed / block / head graphs.

The step loop is *not* exported. Each distinct block is one graph that takes
dense past keys and values and returns the new ones; the trunk loop every
backend shares (models/trunk.py `run_forward`, with `models.executors.OnnxExecutor`
over these graphs: the ONNX Runtime backend and `_parity_check` here) runs the
Euler steps, picks block `floor(i * n_blocks / N)` for step `i`, and
gathers/scatters the paged cache around each call. So one export serves every
step count, every batch composition and the cached and uncached paths.

Files written under `<out_dir>/onnx/` (opset 18; opset 17 is broken with the
dynamo exporter, see shared/research/env.md section 4):

    embed.onnx      tokens (B, T) int64, positions (B, T) int64 -> x (B, T, d)
    block_{k}.onnx  x (R, T, d), h (R, 1, 1), past_k (R, nh, S, hs), past_v,
                    mask (R, 1, T, S+T) bool, [setting (R,) int64]
                    -> x_out (R, T, d), k_new (R, nh, T, hs), v_new, [counts (G,) int64]
    head.onnx       x (B, T, d) -> logits (B, T, V)   (final norm, head, 1/m_N)
    *.onnx.data     external weights, next to their graph
    manifest.json   opset, files, input/output names, config hash

Conditional FFNs: the sort-based dispatch of models/ffn.py has data-dependent
shapes (bincount sizes, nonzero rows), which do not export to a static graph.
The block graphs therefore use `_StaticMoE` / `_StaticTree` below, which
compute the mathematically identical output with fixed shapes by evaluating
*every* expert (or every tree node) for every token and combining the results
with a (M, G) weight matrix that is zero for groups a token is not routed to.
The ONNX path thus trades compute (E / k times the expert FLOPs for MoE,
(2**(D+1)-1) / (D+1) times for the tree) for static shapes; for the small
models this project serves that is cheaper than per-group kernel launches.

Shape legend:
    B | rows            T | new tokens per row    S | cached tokens per row
    R | rows in a step  d | model width           nh, hs | heads, head size
    M | tokens (R * T)  G | experts or tree nodes V | vocabulary
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.ffn import FFNOut, MoEFFN, TreeFFN
from models.layers import Block
from models.model import LeanLM

ONNX_DIR = "onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_OPSET = 18


def config_hash(config: ModelConfig) -> str:
    """SHA-256 of the architecture fields of a config.

    `name` and `extra` (provenance metadata the model never reads) are left
    out, so renaming a model or annotating it does not invalidate its export.
    """
    data = config.to_dict()
    data.pop("name", None)
    data.pop("extra", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (used to tie an export to its weights file)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- export-friendly FFNs ----------------------------------------------------
class _StaticMoE(nn.Module):
    """Top-k MoE with static shapes; same parameters and result as `MoEFFN`."""

    def __init__(self, moe: MoEFFN) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: Tensor, setting: Tensor | None = None) -> FFNOut:
        m = self.moe
        probs, weights, top_i, keep = m.route(x, setting)  # weights (M, K), 0 where dropped
        # (M, E) combine matrix: the renormalised weight of each kept expert, 0 elsewhere.
        combine = torch.zeros_like(probs, dtype=x.dtype).scatter_add(1, top_i, weights)
        routed = torch.zeros_like(probs, dtype=torch.long).scatter_add(1, top_i, keep.long())
        hid = m.act(torch.einsum("md,edf->emf", x, m.w_up))  # (E, M, f) every expert
        ys = torch.einsum("emf,efd->emd", hid, m.w_down)  # (E, M, d)
        y = torch.einsum("me,emd->md", combine, ys)  # (M, d)
        return FFNOut(y, routed.sum(0), None)  # counts (E,)


class _StaticTree(nn.Module):
    """Tree FFN with static shapes; same parameters and result as `TreeFFN`.

    All 2**(D+1)-1 node matrices are applied to every token in one matmul per
    side, then a (M, G) 0/1 path matrix keeps the nodes on the token's path up
    to its truncation depth. The straight-through scale of `TreeFFN.path` is
    exactly 1 in the forward pass, so it is omitted (inference only).
    """

    def __init__(self, tree: TreeFFN) -> None:
        super().__init__()
        self.tree = tree

    def forward(self, x: Tensor, setting: Tensor | None = None) -> FFNOut:
        t = self.tree
        G, D = t.n_nodes, t.depth
        levels = [torch.zeros_like(x[:, 0], dtype=torch.long)]  # (M,) root is node 0
        if t.gate is not None:
            bits = (t.gate(x) > 0).long()  # (M, D)
            prefix = torch.zeros_like(x[:, 0], dtype=torch.long)
            for level in range(1, D + 1):
                prefix = prefix * 2 + bits[:, level - 1]
                levels.append((2**level - 1) + prefix)
        nodes = torch.stack(levels, dim=1)  # (M, D+1) heap indices of the path
        valid = torch.ones_like(nodes, dtype=torch.bool)
        if setting is not None:
            valid = torch.arange(D + 1, device=x.device)[None, :] <= setting[:, None]  # (M, D+1)
        on_path = (nodes[:, :, None] == torch.arange(G, device=x.device)) & valid[:, :, None]
        path = on_path.any(1).to(x.dtype)  # (M, G)
        hid = torch.einsum("md,gdf->gmf", x, t.w_up)  # (G, M, f) every node
        a = t.act(torch.einsum("mg,gmf->mf", path, hid))  # (M, f) = act(x W_up(x))
        ys = torch.einsum("mf,gfd->gmd", a, t.w_down)  # (G, M, d)
        y = torch.einsum("mg,gmd->md", path, ys)  # (M, d)
        return FFNOut(y, on_path.any(1).long().sum(0), None)  # counts (G,)


def _ffn_per_token(
    self: Block, x: Tensor, setting: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`Block._ffn` with an export-friendly per-row -> per-token expansion."""
    R, T, d = x.shape
    if setting is not None:
        setting = setting[:, None].expand(R, T).reshape(R * T)  # (R*T,) row-major like x
    y, counts, aux = self.ffn(x.reshape(R * T, d), setting)
    return y.view(R, T, d), counts, aux


class _BlockGraph(nn.Module):
    """`Block.forward` with tuple outputs and an export-friendly FFN.

    The block is shallow-copied with only its `ffn` submodule swapped, so the
    attention and residual code exported is exactly the code of models/layers.py
    and the parameters are shared with the original model.
    """

    def __init__(self, block: Block, ffn_kind: str) -> None:
        super().__init__()
        blk = copy.copy(block)
        blk._modules = dict(block._modules)  # copy.copy shares the dict; do not touch the original
        if ffn_kind == "moe":
            blk._modules["ffn"] = _StaticMoE(block.ffn)
        elif ffn_kind == "tree":
            blk._modules["ffn"] = _StaticTree(block.ffn)
        # Block._ffn expands the per-row setting with repeat_interleave, whose
        # decomposition exports with a specialised length; a broadcast is the
        # same per-token setting (row-major tokens) and stays symbolic.
        blk._ffn = types.MethodType(_ffn_per_token, blk)
        self.block = blk
        self.has_setting = ffn_kind != "dense"

    def forward(
        self,
        x: Tensor,
        h: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        mask: Tensor,
        setting: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        out = self.block(x, h, past_k, past_v, mask, setting)
        if self.has_setting:
            return out.x, out.k, out.v, out.counts
        return out.x, out.k, out.v


class _EmbedGraph(nn.Module):
    def __init__(self, model: LeanLM) -> None:
        super().__init__()
        self.wte, self.wpe = model.wte, model.wpe

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.wte(tokens) + self.wpe(positions)  # (B, T, d)


class _HeadGraph(nn.Module):
    def __init__(self, model: LeanLM) -> None:
        super().__init__()
        self.norm_f = model.norm_f
        self.weight = model.wte.weight if model.head is None else model.head.weight  # (V, d)
        self.mult = model.config.logit_mult

    def forward(self, x: Tensor) -> Tensor:
        return (self.norm_f(x) @ self.weight.t()) * self.mult  # (B, T, V)


def block_io_names(config: ModelConfig) -> tuple[list[str], list[str]]:
    """Input and output names of the block graphs for this config."""
    inputs = ["x", "h", "past_k", "past_v", "mask"]
    outputs = ["x_out", "k_new", "v_new"]
    if config.ffn != "dense":
        inputs.append("setting")
        outputs.append("counts")
    return inputs, outputs


# torch.onnx's exporter logs (logging, WARNING, not `warnings`) one line per torchvision op it
# cannot register, 4 per graph, when torchvision is not installed; leanserve uses none of them.
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


class _TorchvisionNoteFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def _without_torchvision_notes() -> Iterator[None]:
    """Drop the exporter's "torchvision is not installed. Skipping torchvision::..." lines."""
    logger = logging.getLogger(_REGISTRATION_LOGGER)
    note_filter = _TorchvisionNoteFilter()
    logger.addFilter(note_filter)
    try:
        yield
    finally:
        logger.removeFilter(note_filter)


def _export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, Any]],
    opset: int,
) -> None:
    """Export one graph with the dynamo exporter and check it."""
    import onnx  # lazy: only needed when exporting

    # Named dims become the ONNX dim_params (R, T, S, ...). The mask's last axis
    # is S + T, a sum of two dims that `Dim` cannot express, so it is DYNAMIC and
    # torch.export infers the relation from the attention code.
    dims = {n: torch.export.Dim(n, min=0) for n in ("B", "R", "T", "S")}

    def dim(name: str) -> Any:
        return dims.get(name, torch.export.Dim.DYNAMIC)

    shapes = {name: {ax: dim(n) for ax, n in axes.items()} for name, axes in dynamic.items()}
    dynamic_shapes = tuple(shapes.get(n) for n in inputs)  # positional, one entry per input
    with warnings.catch_warnings(), _without_torchvision_notes():
        warnings.simplefilter("ignore")  # exporter chatter (torchvision ops, unused axis names)
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            external_data=True,
            verbose=False,
        )
    onnx.checker.check_model(str(path))  # path form: works with external data files


def _export_graphs(model: LeanLM, onnx_dir: Path, opset: int) -> dict[str, Any]:
    """Export embed, every block and head; returns the manifest's `graphs` entry."""
    c = model.config
    # Example sizes avoid 0 and 1 so that torch.export keeps every axis symbolic.
    R, T, S, d, nh, hs = 2, 3, 4, c.d_model, c.n_heads, c.head_dim
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)  # example values only; leave the global RNG alone
    graphs: dict[str, Any] = {}

    tokens = torch.randint(0, c.vocab_size, (R, T), generator=gen)
    positions = torch.arange(T).expand(R, T).contiguous()
    _export(
        _EmbedGraph(model),
        (tokens, positions),
        onnx_dir / "embed.onnx",
        ["tokens", "positions"],
        ["x"],
        {"tokens": {0: "B", 1: "T"}, "positions": {0: "B", 1: "T"}},
        opset,
    )
    graphs["embed"] = {"file": f"{ONNX_DIR}/embed.onnx", "inputs": ["tokens", "positions"], "outputs": ["x"]}

    inputs, outputs = block_io_names(c)
    x = torch.randn(R, T, d, dtype=dtype, generator=gen)
    h = torch.full((R, 1, 1), 0.5, dtype=dtype)
    past = torch.randn(R, nh, S, hs, dtype=dtype, generator=gen)
    mask = torch.ones(R, 1, T, S + T, dtype=torch.bool)
    mask[..., S:] = torch.ones(T, T, dtype=torch.bool).tril()
    args: tuple[Tensor, ...] = (x, h, past, past.clone(), mask)
    if c.ffn != "dense":
        args += (torch.full((R,), c.max_expert_setting),)
    block_dyn = {
        "x": {0: "R", 1: "T"},
        "h": {0: "R"},
        "past_k": {0: "R", 2: "S"},
        "past_v": {0: "R", 2: "S"},
        "mask": {0: "R", 2: "T", 3: "ST"},
        "setting": {0: "R"},
    }
    for k, block in enumerate(model.blocks):
        name = f"block_{k}"
        _export(_BlockGraph(block, c.ffn), args, onnx_dir / f"{name}.onnx", inputs, outputs, block_dyn, opset)
        graphs[name] = {"file": f"{ONNX_DIR}/{name}.onnx", "inputs": inputs, "outputs": outputs}

    _export(
        _HeadGraph(model), (x,), onnx_dir / "head.onnx", ["x"], ["logits"], {"x": {0: "B", 1: "T"}}, opset
    )
    graphs["head"] = {"file": f"{ONNX_DIR}/head.onnx", "inputs": ["x"], "outputs": ["logits"]}
    return graphs


@torch.no_grad()
def export_onnx(
    model: LeanLM, out_dir: Path, opset: int = DEFAULT_OPSET, weights_file: Path | None = None
) -> dict[str, Any]:
    """Export `model` as embed / block / head graphs into `out_dir/onnx/`.

    Args:
        model: the model (any trunk, block and FFN kind); exported in eval mode.
        out_dir: normally the model directory; graphs go to `out_dir/onnx/`.
        opset: ONNX opset, >= 18 (the dynamo exporter cannot produce 17).
        weights_file: the `model.safetensors` the weights came from, if any;
            its SHA-256 goes into the manifest so a retrained model is caught.

    Returns:
        The manifest (also written to `out_dir/onnx/manifest.json`).
    """
    if opset < 18:
        raise ValueError(f"opset={opset}: must be >= 18 (opset 17 is broken with the dynamo exporter)")
    c = model.config
    onnx_dir = Path(out_dir) / ONNX_DIR
    onnx_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        graphs = _export_graphs(model, onnx_dir, opset)
    finally:
        model.train(was_training)

    for g in graphs.values():  # the external weights each graph needs, next to it
        data = Path(out_dir) / (g["file"] + ".data")
        g["data"] = g["file"] + ".data" if data.is_file() else None
    manifest = {
        "format": MANIFEST_FORMAT,
        "opset": opset,
        "torch_version": torch.__version__,
        "config_hash": config_hash(c),
        "weights_sha256": file_sha256(weights_file) if weights_file is not None else None,
        "n_blocks": c.n_blocks,
        "ffn": c.ffn,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "graphs": graphs,
    }
    (onnx_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    from models.train import make_readable  # 0755 / 0644 whatever the umask (the image runs as uid 1000)

    make_readable(onnx_dir)
    return manifest


# --- `leanserve export MODEL_DIR` --------------------------------------------
@torch.no_grad()
def _parity_check(model: LeanLM, out_dir: Path, seed: int = 0) -> float:
    """Max |ORT - torch| of the logits: a prompt and a decode token, two rows at different step counts.

    Both sides run the same trunk loop (`models.trunk.run_forward`) with a paged
    cache each; only the executor differs (the model's modules vs
    `OnnxExecutor` over the exported graphs).
    """
    import onnxruntime as ort

    from models.executors import OnnxExecutor
    from models.kv_cache import PagedKVCache
    from models.trunk import describe, run_forward

    c = model.config
    g = torch.Generator().manual_seed(seed)
    B, T = 2, min(8, c.context_length - 1)
    steps = [c.step_range[0], int(c.default_steps)]
    sessions = {
        name: ort.InferenceSession(
            str(out_dir / ONNX_DIR / f"{name}.onnx"), providers=["CPUExecutionProvider"]
        )
        for name in ["embed", "head", *(f"block_{k}" for k in range(c.n_blocks))]
    }
    onnx = OnnxExecutor(c, sessions)
    caches = [PagedKVCache(c, num_pages=B * max(steps) * (T + 1), page_size=4) for _ in range(2)]
    for cache in caches:
        for b in range(B):
            cache.reserve(b, steps[b], T + 1)
    tokens = torch.randint(0, c.vocab_size, (B, T), generator=g)
    positions = torch.arange(T).expand(B, T).contiguous()
    diff = 0.0
    for _ in range(2):  # the prompt, then one decode token against the cache
        ref = model(tokens, positions, steps, kv=caches[0].batch([0, 1]), last_only=True).logits
        fwd = describe(c, tokens, positions, steps, caches[1].batch([0, 1]), last_only=True)
        got = run_forward(onnx, c, fwd).logits
        diff = max(diff, float((got - ref).abs().max()))
        tokens, positions = ref[:, -1].argmax(-1, keepdim=True), positions[:, -1:] + 1
    return diff


def cli_main(args: argparse.Namespace) -> int:
    """Export `args.model_dir` into `<model_dir>/onnx/`, list the files, check parity."""
    from models.checkpoint import WEIGHTS_FILE, load_model

    model_dir = Path(args.model_dir)
    model = load_model(model_dir)
    t0 = time.perf_counter()
    manifest = export_onnx(model, model_dir, opset=args.opset, weights_file=model_dir / WEIGHTS_FILE)
    print(
        f"exported {len(manifest['graphs'])} graphs in {time.perf_counter() - t0:.1f} s (opset {args.opset})"
    )
    for path in sorted((model_dir / ONNX_DIR).iterdir()):
        print(f"  {path.relative_to(model_dir)}  {path.stat().st_size / 1024:.1f} KiB")
    if not args.no_check:
        diff = _parity_check(model, model_dir)
        print(
            f"parity: max |onnxruntime - torch| logits = {diff:.2e} "
            f"(steps {model.config.step_range[0]} and {model.config.default_steps}, prompt and decode)"
        )
    return 0
