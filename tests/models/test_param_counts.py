"""Parameter counts: the analytic cost model agrees with the real modules."""

from __future__ import annotations

import itertools

import pytest

from models.cost import param_counts
from models.model import LeanLM


@pytest.mark.parametrize(
    ("block", "ffn", "norm", "tie"),
    list(
        itertools.product(
            ["prenorm", "parallel", "sas", "sasp"],
            ["dense", "moe", "tree"],
            ["rmsnorm", "none"],
            [True, False],
        )
    ),
)
def test_analytic_counts_match_modules(tiny, block, ffn, norm, tie):
    config = tiny(trunk="ode", n_shared_blocks=2, block=block, ffn=ffn, norm=norm, tie_embeddings=tie)
    assert param_counts(config)["total"] == LeanLM(config).num_params()


def test_sas_saves_two_d_squared_per_block(tiny):
    d = 64
    kw = dict(trunk="stack", n_layers=6, d_model=d, n_heads=4, d_ff=4 * d, ffn="dense")
    prenorm = LeanLM(tiny(block="prenorm", **kw))
    sas = LeanLM(tiny(block="sas", **kw))

    def matmul_weights(model, i):
        return sum(p.numel() for p in model.blocks[i].parameters() if p.dim() >= 2)

    for i in range(1, 6):
        assert matmul_weights(prenorm, i) == 12 * d * d
        assert matmul_weights(sas, i) == 10 * d * d
    assert matmul_weights(sas, 0) == 11 * d * d  # the first block keeps its value matrix
