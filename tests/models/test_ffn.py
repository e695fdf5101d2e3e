"""Conditional compute against plain references: MoE and the tree FFN."""

from __future__ import annotations

import pytest
import torch

from models.ffn import MoEFFN, TreeFFN


def _moe(tiny, **kw):
    config = tiny(ffn="moe", **kw)
    torch.manual_seed(0)
    moe = MoEFFN(config).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return config, moe


def _naive_moe(moe: MoEFFN, x: torch.Tensor, k_per_token: list[int]) -> torch.Tensor:
    """Per-token, per-expert loop: the definition, with no sorting tricks."""
    probs = torch.softmax(moe.router(x), dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top_p, top_i = probs[t].topk(moe.top_k)
        k = k_per_token[t]
        w = top_p[:k] / top_p[:k].sum()
        for j in range(k):
            e = int(top_i[j])
            out[t] += w[j] * (moe.act(x[t] @ moe.w_up[e]) @ moe.w_down[e])
    return out


@pytest.mark.parametrize(
    ("n_experts", "top_k", "M"), [(4, 2, 1), (5, 2, 33), (7, 3, 17), (3, 1, 64), (8, 8, 5)]
)
def test_sorted_moe_equals_naive_loop(tiny, n_experts, top_k, M):
    _, moe = _moe(tiny, n_experts=n_experts, experts_top_k=top_k, d_model=24, n_heads=4, d_ff=40)
    x = torch.randn(M, 24)
    ks = torch.randint(1, top_k + 1, (M,))
    with torch.no_grad():
        got = moe(x, ks)
        torch.testing.assert_close(got.y, _naive_moe(moe, x, ks.tolist()), rtol=1e-5, atol=1e-5)
        full = moe(x)  # None = the trained top_k for every token
        torch.testing.assert_close(full.y, _naive_moe(moe, x, [top_k] * M), rtol=1e-5, atol=1e-5)
    assert int(got.counts.sum()) == int(ks.sum())
    assert int(full.counts.sum()) == M * top_k


def test_moe_top1_uses_only_the_best_expert_and_computes_nothing_else(tiny, monkeypatch):
    _, moe = _moe(tiny, n_experts=6, experts_top_k=2)
    x = torch.randn(9, moe.w_up.shape[1])
    rows_computed = []
    original = torch.Tensor.__matmul__

    def spy(a, b):
        if b.dim() == 2 and b.shape == moe.w_up.shape[1:]:
            rows_computed.append(a.shape[0])
        return original(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    with torch.no_grad():
        out = moe(x, torch.ones(9, dtype=torch.long))
    # Each token goes through exactly one expert's up projection: no dense compute.
    assert sum(rows_computed) == 9
    best = torch.softmax(moe.router(x), -1).argmax(-1)
    assert out.counts.tolist() == torch.bincount(best, minlength=6).tolist()


def test_moe_aux_loss_only_in_training_and_minimal_when_balanced(tiny):
    _, moe = _moe(tiny)
    x = torch.randn(32, moe.w_up.shape[1])
    assert moe.eval()(x).aux_loss is None
    aux = moe.train()(x).aux_loss
    assert aux is not None and aux.item() >= 1.0 - 1e-4  # E * sum f P >= 1, equality when uniform
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform router: aux loss is exactly its minimum
    assert moe(x).aux_loss.item() == pytest.approx(1.0, abs=1e-4)


def _tree(tiny, depth):
    config = tiny(ffn="tree", tree_depth=depth, d_model=16, n_heads=2, d_ff=24)
    torch.manual_seed(depth)
    tree = TreeFFN(config).eval()
    with torch.no_grad():
        for p in tree.parameters():
            p.normal_(0, 0.3)
    return tree


def _explicit_tree(tree: TreeFFN, x: torch.Tensor, depth: list[int]) -> torch.Tensor:
    """Sum the node matrices of each token's prefix path, then apply the MLP."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        bits = [] if tree.gate is None else (tree.gate(x[t]) > 0).long().tolist()
        up = torch.zeros_like(tree.w_up[0])
        down = torch.zeros_like(tree.w_down[0])
        prefix = 0
        for level in range(depth[t] + 1):
            if level:
                prefix = prefix * 2 + bits[level - 1]
            node = 2**level - 1 + prefix
            up += tree.w_up[node]
            down += tree.w_down[node]
        out[t] = tree.act(x[t] @ up) @ down
    return out


@pytest.mark.parametrize("depth", [0, 1, 3, 4])
def test_tree_equals_explicitly_summed_prefix_weights(tiny, depth):
    tree = _tree(tiny, depth)
    assert tree.w_up.shape[0] == 2 ** (depth + 1) - 1
    x = torch.randn(37, 16)
    trunc = torch.randint(0, depth + 1, (37,))
    with torch.no_grad():
        torch.testing.assert_close(tree(x).y, _explicit_tree(tree, x, [depth] * 37), rtol=1e-5, atol=1e-5)
        got = tree(x, trunc)
        torch.testing.assert_close(got.y, _explicit_tree(tree, x, trunc.tolist()), rtol=1e-5, atol=1e-5)
    # Each token touches exactly (its depth + 1) nodes.
    assert int(got.counts.sum()) == int((trunc + 1).sum())


def test_tree_depth_zero_everywhere_is_the_root_mlp(tiny):
    tree = _tree(tiny, 3)
    x = torch.randn(8, 16)
    with torch.no_grad():
        got = tree(x, torch.zeros(8, dtype=torch.long))
        want = tree.act(x @ tree.w_up[0]) @ tree.w_down[0]
    torch.testing.assert_close(got.y, want)
    assert got.counts.tolist() == [8] + [0] * 14


def test_tree_gates_receive_gradient(tiny):
    tree = _tree(tiny, 2).train()
    x = torch.randn(20, 16)
    tree(x).y.pow(2).sum().backward()
    assert tree.gate.weight.grad is not None and tree.gate.weight.grad.abs().sum() > 0
