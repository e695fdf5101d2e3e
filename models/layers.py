"""Attention and the four block kinds, each one Euler step of the trunk.

A block is the vector field `f` of the trunk ODE; one application is the
Euler update `x <- x + h * f(x)` with a per-row step `h` of shape (R, 1, 1):

    prenorm   x' = x + h Attn(N1 x);  x'' = x' + h MLP(N2 x')   (Lie splitting)
    parallel  x' = x + h [Attn(N x) + MLP(N x)]
    sas       x' = x + h b_sa SAttn(N1 x);  x'' = x' + h b_ff MLP(N2 x')
    sasp      x' = x + h [b_sa SAttn(N x) + b_ff MLP(N x)]

SAttn is He & Hofmann's simplified attention: per head h,
`(alpha_h I + beta_h A - gamma_h C) V` where A is the causal softmax, C the
uniform causal matrix (the softmax of the mask alone), V the head's slice of
the normalised input (identity value and output projections; only the first
block of the trunk keeps a trainable value matrix `I + dW`, dW = 0 at init),
and W_Q = 0 at init so that A = C and the block starts as alpha I. They drop
the block's skip connection because alpha I already carries the signal; the
Euler form keeps the skip because the trunk *is* an ODE solver, and the step
`h` then scales the whole simplified branch. Per block this leaves Q, K and the
MLP: 10 d^2 matmul weights against 12 d^2 for pre-norm (with d_ff = 4 d).

Token layout: dense padded rows. Shape legend:
    R  | rows in this call          T  | new tokens per row
    S  | cached (past) tokens       d  | model width
    nh | heads                      hs | head size (d / nh)

Blocks take the past keys and values as dense tensors and return the new ones
(the form exported to ONNX: one graph serves every step count), or, in eager
torch, a `KVWrite` callback that stores the new keys and values in the paged
cache and returns the whole visible window in one gather, which saves a copy
of the past per block (models/executors.py `EagerExecutor`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig
from models.ffn import build_ffn


def build_norm(config: ModelConfig, kind: str | None = None) -> nn.Module:
    """RMSNorm (weight d), LayerNorm (weight and bias, 2d) or identity."""
    kind = kind or config.norm
    if kind == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    if kind == "layernorm":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return nn.Identity()


KVWrite = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""Cache hook of one block application: takes the new keys and values, each
(R, nh, T, hs), writes them to the cache and returns the keys and values the
queries attend over, each (R, nh, S', hs), laid out as the mask's last axis."""

AttendFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""Attention executor that reads the cached past itself: takes the new queries,
keys and values, each (R, nh, T, hs), and returns the softmax attention over
[past, new] and the mean of the visible values (the SAS centring term), each
(R, nh, T, hs). The compiled decode step passes one that reads the paged pool
directly (runtime/backends/aot_decode.py `paged_attention`)."""


def window_mask(positions: Tensor, S: int) -> Tensor:
    """Boolean mask over a cache window that already holds the new tokens.

    Args:
        positions: (R, T) absolute position of each new token.
        S: window length; window index j holds the row's token at position j.

    Returns:
        (R, 1, T, S) bool, True where key j <= the query's position.
    """
    keys = torch.arange(S, device=positions.device)  # (S,)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]  # (R, 1, T, S)


def attention_mask(past_len: Tensor, S: int, T: int) -> Tensor:
    """Boolean mask over [past, new] keys for T new queries per row.

    Args:
        past_len: (R,) tokens already cached per row (<= S, the padded past).
        S: padded past length; T: new tokens per row.

    Returns:
        (R, 1, T, S + T) bool, True where the query may attend: cached keys
        below the row's past length, and new keys up to and including itself.
    """
    device = past_len.device
    past = torch.arange(S, device=device)[None, :] < past_len[:, None]  # (R, S)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
    R = past_len.shape[0]
    mask = torch.cat([past[:, None, :].expand(R, T, S), causal[None].expand(R, T, T)], dim=-1)
    return mask[:, None]  # (R, 1, T, S+T)


class Attention(nn.Module):
    """Multi-head causal attention; `shaped=True` selects the SAS variant."""

    def __init__(self, config: ModelConfig, shaped: bool, value_matrix: bool) -> None:
        super().__init__()
        d, nh = config.d_model, config.n_heads
        self.nh, self.hs, self.scale = nh, config.head_dim, config.attn_scale
        self.shaped = shaped
        if shaped:
            self.qk = nn.Linear(d, 2 * d, bias=False)  # W_Q (zero at init) | W_K
            # Only the trunk's first block keeps a value matrix, as I + dW.
            self.v_delta = nn.Linear(d, d, bias=False) if value_matrix else None
            self.alpha = nn.Parameter(torch.ones(nh))
            self.beta = nn.Parameter(torch.ones(nh))
            self.gamma = nn.Parameter(torch.ones(nh))
        else:
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.proj = nn.Linear(d, d, bias=False)

    def _heads(self, t: Tensor) -> Tensor:
        R, T, _ = t.shape
        return t.view(R, T, self.nh, self.hs).transpose(1, 2)  # (R, nh, T, hs)

    def forward(
        self,
        x: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        mask: Tensor,
        kv_write: KVWrite | None = None,
        attend: AttendFn | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Attend over [past, new] keys.

        Args:
            x: (R, T, d) normalised input.
            past_k, past_v: (R, nh, S, hs) cached keys and values (S may be 0);
                ignored when `kv_write` is given.
            mask: (R, 1, T, S+T) bool from `attention_mask`, or with `kv_write`
                (R, 1, T, S') from `window_mask`.
            kv_write: cache hook that stores the new k, v and returns the window.
            attend: executor that reads the past itself; replaces the past
                tensors, the mask and `kv_write`.

        Returns:
            out (R, T, d), and the new k, v, each (R, nh, T, hs), to cache.
        """
        R, T, d = x.shape
        if self.shaped:
            q, k = self.qk(x).split(d, dim=-1)
            v = x if self.v_delta is None else x + self.v_delta(x)
        else:
            q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (R, nh, T, hs)
        if attend is not None:
            a, centred = attend(q, k, v)
        else:
            if kv_write is not None:
                k_all, v_all = kv_write(k, v)  # (R, nh, S', hs)
            else:
                k_all = torch.cat([past_k, k], dim=2)  # (R, nh, S+T, hs)
                v_all = torch.cat([past_v, v], dim=2)
            a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=self.scale)
            if self.shaped:
                # C V: the mean of the visible values, i.e. attention with uniform
                # weights over the same mask; it works unchanged with a cache.
                uniform = mask.to(x.dtype)
                uniform = uniform / uniform.sum(-1, keepdim=True)  # (R, 1, T, S+T)
                centred = uniform @ v_all  # (R, nh, T, hs)
        if self.shaped:
            a = (
                self.beta.view(1, -1, 1, 1) * a
                + self.alpha.view(1, -1, 1, 1) * v
                - self.gamma.view(1, -1, 1, 1) * centred
            )
        out = a.transpose(1, 2).reshape(R, T, d)  # (R, T, d)
        if not self.shaped:
            out = self.proj(out)
        return out, k, v


class BlockOut(NamedTuple):
    x: Tensor  # (R, T, d)
    k: Tensor  # (R, nh, T, hs) new keys to cache
    v: Tensor  # (R, nh, T, hs) new values to cache
    counts: Tensor | None  # per-expert / per-node token counts
    aux_loss: Tensor | None


class Block(nn.Module):
    """One trunk block; `forward` is one Euler step of size h."""

    def __init__(self, config: ModelConfig, first: bool) -> None:
        super().__init__()
        self.kind = config.block
        shaped = self.kind in ("sas", "sasp")
        self.parallel = self.kind in ("parallel", "sasp")
        self.norm1 = build_norm(config)
        self.norm2 = None if self.parallel else build_norm(config)
        self.attn = Attention(config, shaped=shaped, value_matrix=shaped and first)
        self.ffn = build_ffn(config)
        if shaped:
            self.beta_sa = nn.Parameter(torch.ones(()))
            self.beta_ff = nn.Parameter(torch.full((), float(config.sas_beta_ff_init)))
        else:
            self.beta_sa = self.beta_ff = None

    def _ffn(self, x: Tensor, setting: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        R, T, d = x.shape
        if setting is not None:
            setting = setting.repeat_interleave(T)  # per row -> per token
        y, counts, aux = self.ffn(x.reshape(R * T, d), setting)
        return y.view(R, T, d), counts, aux

    def forward(
        self,
        x: Tensor,
        h: Tensor,
        past_k: Tensor,
        past_v: Tensor,
        mask: Tensor,
        setting: Tensor | None = None,
        kv_write: KVWrite | None = None,
        attend: AttendFn | None = None,
    ) -> BlockOut:
        """One Euler step.

        Args:
            x: (R, T, d) residual stream.
            h: (R, 1, 1) step size per row.
            past_k, past_v: (R, nh, S, hs); mask: (R, 1, T, S+T).
            setting: (R,) experts top-k or tree depth per row, or None.
            kv_write: cache hook (see `Attention.forward`), which replaces the
                past tensors and takes a `window_mask`.
            attend: attention executor that reads the past itself (see
                `Attention.forward`).
        """
        if self.parallel:
            n = self.norm1(x)
            a, k, v = self.attn(n, past_k, past_v, mask, kv_write, attend)
            m, counts, aux = self._ffn(n, setting)
            if self.beta_sa is not None:
                a, m = self.beta_sa * a, self.beta_ff * m
            return BlockOut(x + h * (a + m), k, v, counts, aux)
        a, k, v = self.attn(self.norm1(x), past_k, past_v, mask, kv_write, attend)
        if self.beta_sa is not None:
            a = self.beta_sa * a
        x = x + h * a
        m, counts, aux = self._ffn(self.norm2(x), setting)
        if self.beta_ff is not None:
            m = self.beta_ff * m
        return BlockOut(x + h * m, k, v, counts, aux)
