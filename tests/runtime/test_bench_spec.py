"""The speculation section of the engine benchmark (runtime/bench_spec.py) runs end to end on ode-tiny.

Timing targets are not asserted (shared, noisy machines): the test checks the
rows and results exist, the numbers are finite and positive, and greedy text
with speculation is identical to the text without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from runtime import bench_spec

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo" / "ode-tiny"


@pytest.mark.timeout(300)
def test_speculation_section_quick_prints_every_row(tmp_path: Path, capsys):
    out = tmp_path / "spec.json"
    args = bench_spec._parser().parse_args(
        ["--model-dir", str(ZOO), "--quick", "--batch", "2", "--new-tokens", "6", "--threads", "1",
         "--draft-token-counts", "2", "--json", str(out)]
    )  # fmt: skip
    assert bench_spec.main(args) == 0
    text = capsys.readouterr().out
    for row in (
        "b=1 greedy N=12: draft 2x3 vs none",
        "b=2 greedy N=12: auto vs none",
        "b=1 seeded",
        "draft 4x2",
    ):
        assert row in text, row
    assert "TEXT DIFFERS" not in text
    results = json.loads(out.read_text())
    for key in ("b1_greedy_fixed", "b1_seeded_auto", "b2_greedy_auto", "b2_seeded_fixed"):
        r = results[key]
        assert math.isfinite(r["ratio"]) and r["tokens_per_s"] > 0 and r["base_itl_ms"] > 0, key
    assert results["b1_greedy_fixed"]["identical"] is True
    assert {f"acceptance_d{d}_k2" for d in (2, 3, 4)} <= set(results)
    assert 0 <= results["acceptance_d3_k2"]["acceptance"] <= 1
