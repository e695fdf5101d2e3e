"""Executors of the one trunk loop (models/trunk.py): eager torch, pool-reading torch, ONNX Runtime.

An executor says how embed, one block step and the head run; the loop, the
step schedule and the cache layout are the same for all of them:

    EagerExecutor  the model's modules. With a cache, a block's new keys and
                   values are written to their slots first and the row's
                   window (past and new) is gathered once, then attended with
                   `window_mask`: one copy of the past per block.
    PoolExecutor   the model's modules with attention computed straight from
                   the page storage (`paged_attention`: page lookups fused into
                   the reductions, no dense past). One new token per row. This
                   is what the compiled decode exports: the per-block steps
                   and, traced through `run_forward`, the whole-decode graphs
                   (runtime/backends/aot_decode.py).
    OnnxExecutor   ONNX Runtime sessions of the exported embed / block / head
                   graphs (models/export.py): the block takes a dense past
                   (gathered from the window) and `past_mask`, and returns the
                   new keys and values, which the loop writes.

Shape legend as in models/trunk.py:
    R | rows in a step   T | new tokens per row   P | pages in the window
    d | model width      nh, hs | heads, head size  V | vocabulary
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.layers import BlockOut
from models.trunk import StepView

if TYPE_CHECKING:  # models/model.py imports this module
    from models.model import LeanLM


class EagerExecutor:
    """The model's own modules (training, scoring, prefill, the eager backend)."""

    def __init__(self, model: LeanLM) -> None:
        self.model = model
        self.stores_kv = True  # with a cache, `block` writes the new keys and values itself

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.model.embed(tokens, positions)

    def head(self, x: Tensor) -> Tensor:
        return self.model.logits(x)

    def block(self, k: int, x: Tensor, h: Tensor, view: StepView, setting: Tensor | None) -> BlockOut:
        blk = self.model.blocks[k]
        storage = view.storage
        if storage is None:
            c = self.model.config
            empty = x.new_zeros(x.shape[0], c.n_heads, 0, c.head_dim)
            return blk(x, h, empty, empty, view.past_mask(), setting)
        slots, window = view.slots, view.window
        assert slots is not None and window is not None

        def write(k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
            storage.scatter(slots, k_new, v_new)
            return storage.gather(window)  # (R, nh, S, hs): past and new

        none = x.new_empty(0)
        return blk(x, h, none, none, view.window_mask(), setting, kv_write=write)


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


def pool_block(
    block: nn.Module,
    x: Tensor,
    h: Tensor,
    pool_k: Tensor,
    pool_v: Tensor,
    window: Tensor,
    positions: Tensor,
    setting: Tensor | None,
) -> BlockOut:
    """One block step for one new token per row, attending from the pool (`paged_attention`).

    Args:
        x: (R, 1, d); h: (R, 1, 1); pool_k, pool_v: (pages, page_size, nh, hs);
        window: (R, P); positions: (R, 1); setting: (R,) or None.
    """
    scale = block.attn.scale

    def attend(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return paged_attention(q, k, v, pool_k, pool_v, window, positions, scale)

    none = x.new_zeros(0)  # the past tensors and mask: `attend` reads the pool instead
    return block(x, h, none, none, none, setting, attend=attend)


class PoolExecutor:
    """Modules with pool-reading attention, one new token per row (what the compiled decode exports).

    Args:
        model: the model (or a copy whose blocks trace, runtime/backends/aot_decode.py).
        head_t: the output matrix as a (d, V) tensor laid out for the matmul,
            or None for the model's own.
    """

    stores_kv = False

    def __init__(self, model: LeanLM, head_t: Tensor | None = None) -> None:
        self.model, self.head_t = model, head_t

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.model.embed(tokens, positions)

    def head(self, x: Tensor) -> Tensor:
        return self.model.logits(x, self.head_t)

    def block(self, k: int, x: Tensor, h: Tensor, view: StepView, setting: Tensor | None) -> BlockOut:
        storage = view.storage
        if storage is None or view.window is None:
            raise ValueError("PoolExecutor: reads the KV pool, so it needs a cache view (kv)")
        return pool_block(
            self.model.blocks[k], x, h, storage.k, storage.v, view.window, view.positions, setting
        )


def _np(t: Tensor) -> Any:
    """Zero-copy numpy view of a CPU tensor (copies only if it is strided)."""
    return t.detach().cpu().contiguous().numpy()


class OnnxExecutor:
    """ONNX Runtime sessions of one export: `embed`, `block_{k}` for each block, `head`.

    Tensors cross into ONNX Runtime as zero-copy numpy views of CPU tensors.
    The block graphs always take an expert setting when the model has one;
    rows without one get the trained maximum.
    """

    stores_kv = False

    def __init__(self, config: ModelConfig, sessions: dict[str, Any]) -> None:
        self.config = config
        self._embed = sessions["embed"]
        self._head = sessions["head"]
        self._blocks: Sequence[Any] = [sessions[f"block_{k}"] for k in range(config.n_blocks)]
        e = config.expert_setting
        self._full_setting = None if e is None else e.default
        self._settings: dict[int, Tensor] = {}  # rows -> (R,) the trained maximum

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        (x,) = self._embed.run(None, {"tokens": _np(tokens), "positions": _np(positions)})
        return torch.from_numpy(x)

    def head(self, x: Tensor) -> Tensor:
        (logits,) = self._head.run(None, {"x": _np(x)})
        return torch.from_numpy(logits)

    def block(self, k: int, x: Tensor, h: Tensor, view: StepView, setting: Tensor | None) -> BlockOut:
        c = self.config
        R = x.shape[0]
        if view.storage is None:
            past_k = past_v = x.new_zeros(R, c.n_heads, 0, c.head_dim)
        else:
            assert view.window is not None
            past_k, past_v = view.storage.gather(view.window)  # (R, nh, S, hs)
        feed = {
            "x": _np(x),
            "h": _np(h),
            "past_k": _np(past_k),
            "past_v": _np(past_v),
            "mask": _np(view.past_mask()),
        }
        if self._full_setting is not None:
            if setting is None:
                setting = self._settings.get(R)
                if setting is None:
                    setting = self._settings[R] = torch.full((R,), self._full_setting, dtype=torch.long)
            feed["setting"] = _np(setting)
        out = self._blocks[k].run(None, feed)
        counts = torch.from_numpy(out[3]) if len(out) > 3 else None
        return BlockOut(
            torch.from_numpy(out[0]), torch.from_numpy(out[1]), torch.from_numpy(out[2]), counts, None
        )
