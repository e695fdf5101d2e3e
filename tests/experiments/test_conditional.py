"""The conditional-computation experiment: its flat-leaf FFN against a per-token loop, and its report.

`FlatLeafFFN` must compute, for every token, only its own leaf's MLP (leaf =
the gate bits read as a binary number, b_0 most significant, the tree's leaf
order); `materialise` must turn a tree into leaves that compute the tree's
function; `flat_leaves` must swap the FFN only while it is open. The `--quick`
run must report a row per D with parameter counts exactly on the analytic
2^(D+1) - 1 node formula, leaf usage within 2^D, and finite losses.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from models.config import ModelConfig
from models.ffn import TreeFFN
from models.model import LeanLM

# `experiments/` is a top-level folder of the repository; pytest's `pythonpath = ["."]` makes it importable.


def _module() -> ModuleType:
    return importlib.import_module("experiments.conditional")


def _config(depth: int, **kw) -> ModelConfig:
    base = dict(
        vocab_size=97, context_length=16, d_model=12, n_heads=2, d_ff=20, n_layers=2,
        ffn="tree", tree_depth=depth, parameterisation="sp",
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    # Fresh inits are small and near-degenerate; large random weights make every leaf distinct.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _naive_flat(flat, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Per-token loop: bits -> leaf number -> that leaf's MLP; nothing shared, nothing sorted."""
    out = torch.zeros_like(x)
    leaves = []
    for t in range(x.shape[0]):
        leaf = 0
        if flat.gate is not None:
            for bit in (flat.gate(x[t]) > 0).long().tolist():
                leaf = 2 * leaf + bit  # b_0 ends up most significant
        leaves.append(leaf)
        out[t] = flat.act(x[t] @ flat.leaf_up[leaf]) @ flat.leaf_down[leaf]
    return out, leaves


@pytest.mark.parametrize(("depth", "M"), [(0, 5), (1, 9), (3, 33), (5, 70)])
def test_flat_leaf_ffn_equals_per_token_loop(depth: int, M: int) -> None:
    cond = _module()
    flat = cond.FlatLeafFFN(_config(depth)).eval()
    _randomise(flat, depth)
    assert tuple(flat.leaf_up.shape) == (2**depth, 12, 20)
    x = torch.randn(M, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = flat(x)
        want, leaves = _naive_flat(flat, x)
    torch.testing.assert_close(got.y, want, rtol=1e-5, atol=1e-5)
    # Counts in the tree's heap layout: inner nodes 0, the leaves last, one count per token.
    expected = [0] * (2**depth - 1) + torch.bincount(torch.tensor(leaves), minlength=2**depth).tolist()
    assert got.counts.tolist() == expected
    if depth >= 3:
        assert len(set(leaves)) > 1  # the check above is vacuous if every token shares one leaf


def test_flat_output_depends_only_on_its_leaf() -> None:
    cond = _module()
    flat = cond.FlatLeafFFN(_config(3)).eval()
    _randomise(flat, 7)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = flat(x).y
        _, leaves = _naive_flat(flat, x)
        target = leaves[0]
        others = [j for j in range(8) if j != target]
        flat.leaf_up[others] += 1.0
        flat.leaf_down[others] -= 1.0
        after = flat(x).y
    mine = torch.tensor([leaf == target for leaf in leaves])
    # Tokens of the untouched leaf are bit-for-bit unchanged; every other token changed.
    assert torch.equal(after[mine], before[mine])
    assert bool((after[~mine] - before[~mine]).abs().amax(1).gt(1e-3).all())


def test_flat_gates_get_gradient_and_reject_truncation() -> None:
    cond = _module()
    flat = cond.FlatLeafFFN(_config(2)).train()
    _randomise(flat, 3)
    x = torch.randn(30, 12)
    flat(x).y.pow(2).sum().backward()
    assert flat.gate.weight.grad is not None and flat.gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no truncation depth"):
        flat(x, torch.zeros(30, dtype=torch.long))
    flat(x, torch.full((30,), 2, dtype=torch.long))  # the full depth is accepted


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_materialised_tree_computes_the_tree(depth: int) -> None:
    cond = _module()
    config = _config(depth)
    tree = TreeFFN(config).eval()
    _randomise(tree, 10 + depth)
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        flat = cond.materialise(tree, config)
        torch.testing.assert_close(flat(x).y, tree(x).y, rtol=1e-4, atol=1e-4)
        # Same routing: the tree's leaf-level counts are the flat FFN's leaf counts.
        assert flat(x).counts[2**depth - 1 :].tolist() == tree(x).counts[2**depth - 1 :].tolist()


def test_flat_leaves_swaps_the_ffn_only_inside_the_block() -> None:
    cond = _module()
    config = _config(3)
    with cond.flat_leaves():
        model = LeanLM(config)
    assert all(isinstance(b.ffn, cond.FlatLeafFFN) for b in model.blocks)
    assert all(isinstance(b.ffn, TreeFFN) for b in LeanLM(config).blocks)  # restored afterwards
    ffn = model.blocks[0].ffn
    d, f, D = 12, 20, 3
    assert sum(p.numel() for p in ffn.parameters()) == d * D + 2**D * 2 * d * f
    # A leaf alone gets the plain hidden std (the tree divides its nodes by sqrt(D + 1)).
    assert ffn.leaf_up.std().item() == pytest.approx(0.02, rel=0.15)
    assert LeanLM(config).blocks[0].ffn.w_up.std().item() == pytest.approx(0.02 / 2, rel=0.15)
    tokens = torch.randint(0, 97, (2, 8))
    out = model(tokens)
    assert out.logits.shape == (2, 8, 97) and int(out.expert_counts.sum()) == 2 * 2 * 8  # 2 blocks


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_conditional_quick(tmp_path: Path) -> None:
    cond = _module()
    parse_table = importlib.import_module("experiments.common").parse_table
    out = tmp_path / "reports"
    rc = cond.main(["--quick", "--out", str(out), "--cache", str(tmp_path / "cache"), "--threads", "2"])
    assert rc == 0
    report, png = out / "conditional.md", out / "conditional.png"
    assert report.is_file() and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text(encoding="utf-8")
    assert "![conditional](conditional.png)" in text
    assert "Command: `python -m experiments.conditional --quick" in text
    assert "Wall time: " in text
    for heading in ("## Findings", "## Setup", "## Differences from the paper"):
        assert heading in text
    s = cond.QUICK
    d, f, L = s.d_model, s.d_ff, s.n_layers

    # Capacity table: one row per D; parameter counts exactly on the analytic node formula.
    headers, rows = parse_table(text, "## Results")
    col = {h: i for i, h in enumerate(headers)}
    assert [int(r[0]) for r in rows] == list(s.depths)
    totals = {}
    for row in rows:
        D = int(row[0])
        nodes = 2 ** (D + 1) - 1
        assert int(row[col["node matrices"]]) == nodes == int(row[col["2^(D+1)-1"]])
        assert _number(row[col["FFN params / block"]]) == d * D + nodes * 2 * d * f
        assert int(row[col["D+1"]]) == D + 1 and int(row[col["2^D"]]) == 2**D
        totals[D] = _number(row[col["total params"]])
        for h in headers:
            if "us/token" in h or "ms/token" in h or "ratio" in h:
                value = _number(row[col[h]])
                assert math.isfinite(value) and value > 0, (D, h, row[col[h]])
    # Only the FFNs differ between depths: total(D) - total(0) is exactly L x the FFN difference.
    for D, total in totals.items():
        assert total - totals[0] == L * ((d * D + (2 ** (D + 1) - 1) * 2 * d * f) - 2 * d * f)
    assert all(rows[0][col[h]] == "1.00" for h in headers if "ratio" in h)

    # Loss and usage: finite losses; per block, 1 <= used <= 2^D, exp(entropy) <= used.
    headers, rows = parse_table(text, "## Results: loss and bit-pattern usage")
    col = {h: i for i, h in enumerate(headers)}
    assert [int(r[0]) for r in rows] == list(s.depths)
    for row in rows:
        D = int(row[0])
        for h in ("final train loss", "val loss"):
            loss = _number(row[col[h]])
            assert math.isfinite(loss) and 0 < loss < 2 * math.log(s.vocab), (D, h, loss)
        used = [int(c) for c in row[col["leaves used (per block)"]].split(",")]
        entropy = [float(c) for c in row[col["leaf entropy, nats (per block)"]].split(",")]
        effective = [float(c) for c in row[col["effective leaves exp(H) (per block)"]].split(",")]
        assert len(used) == len(entropy) == len(effective) == L
        for u, h, e in zip(used, entropy, effective):
            assert 1 <= u <= 2**D
            assert 0 <= h <= D * math.log(2) + 0.01
            assert 1 - 0.05 <= e <= u + 0.05
    assert rows[0][col["leaves used (per block)"]] == ", ".join(["1"] * L)

    # Materialised leaves: 2^D matrices, positive times.
    headers, rows = parse_table(text, "## Results: materialised leaves")
    assert [int(r[1]) for r in rows] == [2**D for D in s.depths]
    assert all(_number(c) > 0 for r in rows for c in r[2:])

    # Flat vs tree: the dense reference, then tree and flat per depth, each with its own matrix count.
    headers, rows = parse_table(text, "## Results: flat leaves vs tree prefix sharing")
    col = {h: i for i, h in enumerate(headers)}
    names = [r[0] for r in rows]
    assert names == ["tree-D0"] + [f"{k}-D{D}" for D in s.overfit_depths if D for k in ("tree", "flat")]
    for row in rows:
        D = int(row[col["D"]])
        matrices = 2**D if row[0].startswith("flat") else 2 ** (D + 1) - 1
        assert int(row[col["FFN matrices"]]) == matrices
        assert _number(row[col["FFN params / block"]]) == d * D + matrices * 2 * d * f
        train, val = (
            _number(row[col["train loss (whole split)"]]),
            _number(row[col["val loss (whole split)"]]),
        )
        assert math.isfinite(train) and math.isfinite(val)
        assert _number(row[col["gap val - train"]]) == pytest.approx(val - train, abs=2e-3)
