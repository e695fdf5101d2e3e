"""CTranslate2 peer of `leanserve bench engine --ctranslate2` (runtime/bench_ct2.py): the HF
GPT-2 converts, and CTranslate2 generates exactly the asked number of tokens in both compute
types (a smoke test: the numbers are not checked, only that they are measured). ctranslate2
is a dev extra (pyproject.toml), installed by the test command."""

from __future__ import annotations

import pytest

from models.config import ModelConfig
from runtime import bench_ct2
from runtime.bench_engine import _hf_model, mixed_workload


def _config() -> ModelConfig:
    """A 2-layer GPT-2 shape (the HF peer has n_layer = max_steps)."""
    return ModelConfig(
        vocab_size=64, context_length=128, d_model=32, n_heads=2, d_ff=64, trunk="stack", n_layers=2,
        min_steps=2, max_steps=2, ffn="dense",
    )  # fmt: skip


def test_ctranslate2_runs_the_hf_peer_in_every_compute_type(tmp_path):
    config = _config()
    workload = [(p[:5], min(m, 6)) for p, m in mixed_workload(3, config.vocab_size)]
    out = bench_ct2.run(_hf_model(config), config, P=4, M=3, batch=2, workload=workload, threads=1)
    assert set(out) == set(bench_ct2.COMPUTE_TYPES) == {"float32", "int8"}
    for r in out.values():
        assert r["itl_s"] > 0 and r["tokens_per_s"] > 0 and r["tokens_per_s_mixed"] > 0


def test_a_short_generation_is_an_error_not_a_number(tmp_path):
    import ctranslate2

    config = _config()
    generator = ctranslate2.Generator(
        str(bench_ct2.convert(_hf_model(config), config, tmp_path)), device="cpu"
    )

    class Short:  # a generator that stops early (as at an end token): the count is checked
        def generate_batch(self, tokens, **kw):
            return generator.generate_batch(tokens, **{**kw, "max_length": 2, "min_length": 1})

    with pytest.raises(RuntimeError, match="asked for 3"):
        bench_ct2._generate(Short(), [[1, 2, 3]], 3)
