"""Feed-forward sub-blocks: dense MLP, top-k mixture of experts, Cho & Bengio tree.

Token layout: every FFN works on a flat token matrix `x` of shape (M, d), where
M = rows x new tokens of the current call, so the caller decides batching.
Per-token compute settings (`top_k` for MoE, truncation `depth` for the tree)
are a (M,) int64 tensor or None for the trained maximum.

Shape legend:
    M  | tokens in the call          d   | model width
    E  | experts                     f   | hidden width (d_ff)
    K  | trained top-k               D   | tree depth (gating bits)
    G  | groups (experts or nodes)

Conditional compute never evaluates an expert for a token that is not routed
to it: tokens are sorted by group id, each group runs one contiguous matmul,
and results are scattered back (`_Grouping`). The Python loop is over groups
(E experts or the nodes of one tree level), never over tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class FFNOut(NamedTuple):
    y: Tensor  # (M, d)
    counts: Tensor | None  # (E,) or (2**(D+1)-1,) tokens routed per expert / node
    aux_loss: Tensor | None  # scalar load-balancing loss (MoE, training only)


class _Grouping:
    """Tokens sorted by group id; `apply` runs one matmul per non-empty group."""

    def __init__(self, ids: Tensor, n_groups: int) -> None:
        # A stable sort keeps token order inside a group, so results do not
        # depend on how the sort breaks ties (batched == single invariance).
        self.order = torch.argsort(ids, stable=True)
        self.counts = torch.bincount(ids, minlength=n_groups)
        self._sizes = self.counts.tolist()  # one host sync per grouping

    def gather(self, x: Tensor) -> Tensor:
        return x[self.order]

    def apply(self, xs: Tensor, weights: Tensor) -> Tensor:
        """xs: (M', i) already in sorted order; weights: (G, i, o) -> (M', o) sorted."""
        outs, start = [], 0
        for g, n in enumerate(self._sizes):
            if n:
                outs.append(xs[start : start + n] @ weights[g])
                start += n
        if not outs:
            return xs.new_zeros(0, weights.shape[-1])
        return torch.cat(outs, dim=0)

    def scatter(self, ys: Tensor, m: int) -> Tensor:
        """Undo the sort: ys (M', o) sorted -> (M', o) in original order (M' == m)."""
        out = ys.new_empty(m, ys.shape[-1])
        out[self.order] = ys
        return out


class DenseFFN(nn.Module):
    """y = act(x W_up) W_down, no biases."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = _ACTIVATIONS[config.activation]

    def forward(self, x: Tensor, setting: Tensor | None = None) -> FFNOut:
        if setting is not None:
            raise ValueError("experts: this model has a dense FFN and takes no expert setting")
        return FFNOut(self.down(self.act(self.up(x))), None, None)


class MoEFFN(nn.Module):
    """Top-k mixture of experts with sort-based dispatch.

    Router probabilities p = softmax(x W_r) (M, E); each token keeps its top-k
    experts (k per token, at most the trained K) with weights renormalised over
    the kept ones, so k=1 at inference gives the top expert weight 1. The
    Switch-style balancing loss E * sum_e f_e * P_e is returned in training.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f, e = config.d_model, config.d_ff, config.n_experts
        self.n_experts, self.top_k = e, config.experts_top_k
        self.router = nn.Linear(d, e, bias=False)
        self.w_up = nn.Parameter(torch.empty(e, d, f))  # (E, d, f)
        self.w_down = nn.Parameter(torch.empty(e, f, d))  # (E, f, d)
        self.act = _ACTIVATIONS[config.activation]

    def route(self, x: Tensor, setting: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Top-k routing of x (M, d) with k = setting (M,) per token (None = trained K).

        Returns:
            probs (M, E) router probabilities; weights (M, K) renormalised over
            the kept experts, 0 where dropped; top_i (M, K) expert ids, sorted
            by probability; keep (M, K) bool.
        """
        K = self.top_k
        probs = torch.softmax(self.router(x).float(), dim=-1)  # (M, E)
        top_p, top_i = probs.topk(K, dim=-1)  # (M, K), sorted descending
        if setting is None:
            keep = torch.ones_like(top_i, dtype=torch.bool)
        else:
            keep = torch.arange(K, device=x.device)[None, :] < setting[:, None]  # (M, K)
            top_p = top_p * keep
        weights = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)  # (M, K)
        return probs, weights, top_i, keep

    def forward(self, x: Tensor, setting: Tensor | None = None) -> FFNOut:
        M, E, K = x.shape[0], self.n_experts, self.top_k
        probs, weights, top_i, keep = self.route(x, setting)
        token = torch.arange(M, device=x.device)[:, None].expand(M, K)[keep]  # (A,) assignments
        expert = top_i[keep]  # (A,)
        w = weights[keep]  # (A,)
        grouping = _Grouping(expert, E)
        xs = grouping.gather(x[token])  # (A, d) sorted by expert
        hs = self.act(grouping.apply(xs, self.w_up))  # (A, f)
        ys = grouping.apply(hs, self.w_down)  # (A, d)
        ys = grouping.scatter(ys, ys.shape[0]) * w[:, None]  # back to assignment order
        y = torch.zeros_like(x).index_add_(0, token, ys)  # combine the k outputs per token

        aux = None
        if self.training:
            # f_e: share of assignments per expert; P_e: mean router probability.
            frac = grouping.counts.to(probs.dtype) / max(int(expert.numel()), 1)
            aux = E * torch.sum(frac * probs.mean(0))
        return FFNOut(y, grouping.counts, aux)


class TreeFFN(nn.Module):
    """Cho & Bengio (2014) tree-structured conditional FFN.

    D gating bits b_l = [x . g_l > 0] select a root-to-leaf path; node n_l at
    level l is the prefix (b_0..b_{l-1}) read as a binary number, stored at
    index 2**l - 1 + prefix (heap order: 2**(D+1) - 1 nodes). The effective
    weights of a token are the sums of the node matrices on its path,

        W_up(x) = sum_{l<=t} W_up[n_l],   W_down(x) = sum_{l<=t} W_down[n_l],
        y = act(x W_up(x)) W_down(x),

    computed as t+1 grouped matmuls per side rather than by materialising the
    sum, with t = the per-token truncation depth (default D). Parameters grow as
    2**(D+1) - 1 node pairs; compute grows as D + 1.

    The bits are not differentiable. Each level's contribution is multiplied by
    s = p / stop_grad(p), p = sigmoid(|x . g|), which is exactly 1 in the
    forward pass (so the output is the plain prefix sum) while the gradient
    trains the gates toward confident splits of the routes that lower the loss.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f, D = config.d_model, config.d_ff, config.tree_depth
        self.depth = D
        self.n_nodes = 2 ** (D + 1) - 1
        self.gate = nn.Linear(d, D, bias=False) if D > 0 else None
        self.w_up = nn.Parameter(torch.empty(self.n_nodes, d, f))  # (G, d, f)
        self.w_down = nn.Parameter(torch.empty(self.n_nodes, f, d))  # (G, f, d)
        self.act = _ACTIVATIONS[config.activation]

    def path(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Node index per level and the straight-through scale.

        Returns:
            nodes: (M, D+1) int64 heap indices of the path (column 0 is the root).
            scale: (M, D+1) ones in value; carries the gate gradient.
        """
        M = x.shape[0]
        nodes = torch.zeros(M, self.depth + 1, dtype=torch.long, device=x.device)
        scale = torch.ones(M, self.depth + 1, dtype=x.dtype, device=x.device)
        if self.gate is None:
            return nodes, scale
        g = self.gate(x)  # (M, D)
        bits = (g > 0).long()  # (M, D)
        prefix = torch.zeros(M, dtype=torch.long, device=x.device)
        for level in range(1, self.depth + 1):
            prefix = prefix * 2 + bits[:, level - 1]
            nodes[:, level] = (2**level - 1) + prefix
        p = torch.sigmoid(g.abs())
        scale = torch.cat([scale[:, :1], p / p.detach()], dim=1)
        return nodes, scale

    def forward(self, x: Tensor, setting: Tensor | None = None) -> FFNOut:
        M = x.shape[0]
        nodes, scale = self.path(x)  # (M, D+1)
        depth = setting if setting is not None else None
        h = x.new_zeros(M, self.w_up.shape[-1])  # (M, f)
        levels = []
        for level in range(self.depth + 1):
            rows = None if depth is None else (depth >= level).nonzero().squeeze(1)
            if rows is not None and rows.numel() == 0:
                break  # deeper levels are truncated for every token
            ids = nodes[:, level] if rows is None else nodes[rows, level]
            xr = x if rows is None else x[rows]
            sr = scale[:, level] if rows is None else scale[rows, level]
            # Heap indices of level l start at 2**l - 1; group within the level.
            offset = 2**level - 1
            grouping = _Grouping(ids - offset, 2**level)
            w_up = self.w_up[offset : offset + 2**level]
            part = grouping.scatter(grouping.apply(grouping.gather(xr), w_up), xr.shape[0]) * sr[:, None]
            if rows is None:
                h = h + part
            else:
                h = h.index_add(0, rows, part)
            levels.append((level, rows, sr, grouping))
        a = self.act(h)  # (M, f)
        y = torch.zeros_like(x)
        counts = torch.zeros(self.n_nodes, dtype=torch.long, device=x.device)
        for level, rows, sr, grouping in levels:
            offset = 2**level - 1
            ar = a if rows is None else a[rows]
            w_down = self.w_down[offset : offset + 2**level]
            part = grouping.scatter(grouping.apply(grouping.gather(ar), w_down), ar.shape[0]) * sr[:, None]
            y = y + part if rows is None else y.index_add(0, rows, part)
            counts[offset : offset + 2**level] += grouping.counts
        return FFNOut(y, counts, None)


def build_ffn(config: ModelConfig) -> nn.Module:
    """The FFN selected by `config.ffn`."""
    return {"dense": DenseFFN, "moe": MoEFFN, "tree": TreeFFN}[config.ffn](config)
