"""ModelConfig's derived properties."""

from __future__ import annotations

from tests.helpers import tiny_config


def test_max_expert_setting_is_the_trained_maximum_per_ffn() -> None:
    moe, tree, dense = (tiny_config(ffn=f) for f in ("moe", "tree", "dense"))
    assert moe.max_expert_setting == moe.experts_top_k == moe.expert_options["experts_top_k"][-1]
    assert tree.max_expert_setting == tree.tree_depth == tree.expert_options["expert_depth"][-1]
    assert dense.max_expert_setting is None
