"""`leanserve bench engine` runs end to end on a tiny random model and prints every row.

Timing targets are not asserted (shared, noisy machines); the test checks the
benchmark measures what it says: the rows, finite positive numbers, and the
mixed workload's shape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from runtime import bench_engine
from runtime.cli import main as cli_main


def test_mixed_workload_is_seeded_and_in_range():
    a = bench_engine.mixed_workload(16, vocab=50)
    assert a == bench_engine.mixed_workload(16, vocab=50)
    assert a != bench_engine.mixed_workload(16, vocab=50, seed=3)
    for prompt, new in a:
        assert bench_engine.MIXED_PROMPT[0] <= len(prompt) <= bench_engine.MIXED_PROMPT[1]
        assert bench_engine.MIXED_NEW[0] <= new <= bench_engine.MIXED_NEW[1]
        assert all(1 <= t < 50 for t in prompt)
    assert len({len(p) for p, _ in a}) > 1  # lengths really vary


@pytest.mark.timeout(300)
def test_bench_engine_quick_prints_every_row(tmp_path: Path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(
        json.dumps(
            {
                "model": dict(
                    name="bench-tiny",
                    vocab_size=256,
                    context_length=256,
                    d_model=32,
                    n_heads=2,
                    d_ff=64,
                    trunk="ode",
                    min_steps=2,
                    max_steps=8,
                    block="prenorm",
                    ffn="dense",
                )
            }
        )
    )
    out = tmp_path / "bench.json"
    rc = cli_main(
        ["bench", "engine", "--config", str(config), "--quick", "--batch", "4", "--new-tokens", "8",
         "--threads", "1", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    for row in ("N=2 vs N=8", "concurrent vs sequential", "HF GPT-2 generate()", "uniform:", "mixed:"):
        assert row in text, row
    results = json.loads(out.read_text())
    assert results["steps_low"] == 2 and results["steps_high"] == 8
    for key in (
        "itl_ratio_b1", "itl_ratio_b4", "tokens_per_s_concurrent", "tokens_per_s_sequential",
        "hf_itl_s", "hf_tokens_per_s", "tokens_per_s_mixed", "hf_tokens_per_s_mixed", "mixed_ratio",
    ):  # fmt: skip
        assert math.isfinite(results[key]) and results[key] > 0, key


def test_bench_engine_fixed_step_model_reports_no_step_ratio(tmp_path: Path, capsys):
    """A stacked trunk has one step count: the step-ratio rows say n/a instead of a verdict."""
    config = tmp_path / "stack.json"
    model = dict(name="stack-tiny-test", vocab_size=256, context_length=256, d_model=32, n_heads=2, d_ff=64)
    config.write_text(json.dumps({"model": {**model, "trunk": "stack", "n_layers": 2, "ffn": "dense"}}))
    out = tmp_path / "bench.json"
    rc = cli_main(
        ["bench", "engine", "--config", str(config), "--quick", "--batch", "2", "--new-tokens", "4",
         "--threads", "1", "--no-hf", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "decode ms/token b=1: N=" in text and " vs N=" not in text
    assert "fixed step count" in text and "(<= 0.35)" not in text
    results = json.loads(out.read_text())
    assert "itl_ratio_b1" not in results and results["tokens_per_s_concurrent"] > 0
