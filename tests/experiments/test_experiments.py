"""The experiments run end to end (`--quick`) and their reports carry the promised tables.

Each test runs one experiment's `main([...])` in-process with tiny sizes into
tmp_path and checks the report's structure and numbers: the expected rows and
columns, finite positive values, and the facts that hold even after a dozen
iterations (the SAS block has 10 d^2 matmul weights against pre-norm's 12 d^2;
a stack run at full depth equals itself, so its skip ratio at N = L is 1).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType

import pytest

# `experiments/` is a top-level folder of the repository, not an installed package;
# pytest's `pythonpath = ["."]` (pyproject.toml) makes it importable.


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"experiments.{name}")


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def _run(module: ModuleType, tmp_path: Path) -> str:
    out = tmp_path / "reports"
    rc = module.main(["--quick", "--out", str(out), "--cache", str(tmp_path / "cache"), "--threads", "2"])
    assert rc == 0
    report = out / f"{module.NAME}.md"
    png = out / f"{module.NAME}.png"
    assert report.is_file() and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text(encoding="utf-8")
    assert f"![{module.NAME}]({module.NAME}.png)" in text
    assert f"Command: `python -m experiments.{module.NAME} --quick" in text
    assert "## Differences from the paper" in text
    return text


def test_ode_sharing_quick(tmp_path: Path) -> None:
    ode_sharing = _module("ode_sharing")
    text = _run(ode_sharing, tmp_path)
    parse_table = _module("common").parse_table
    headers, rows = parse_table(text, "## Results: validation perplexity per (model, inference steps N)")
    L = ode_sharing.QUICK.depth
    steps = ode_sharing.QUICK.eval_steps
    assert headers == ["model", *[f"N={n}" for n in steps]]
    labels = [r[0] for r in rows]
    assert [lab[:4] for lab in labels] == ["(a) ", "(b) ", "(c) ", "(d) ", "(d')"]
    vocab = ode_sharing.QUICK.vocab
    for row in rows:
        shared = not row[0].startswith("(d")
        for n, cell in zip(steps, row[1:]):
            if shared or n <= L:
                ppl = _number(cell)
                # Barely trained models: perplexity is finite and no worse than ~2x uniform guessing.
                assert math.isfinite(ppl) and 1 < ppl < 2 * vocab, (row[0], n, cell)
            else:
                assert cell == "n/a"  # a stack cannot run more layers than it has
    # At N = L the skipped stack is the whole stack, with or without rescaling.
    col = headers.index(f"N={L}")
    assert rows[3][col] == rows[4][col]


def test_simplified_blocks_quick(tmp_path: Path) -> None:
    text = _run(_module("simplified_blocks"), tmp_path)
    parse_table = _module("common").parse_table
    headers, rows = parse_table(text, "## Results")
    assert [r[0] for r in rows] == ["prenorm", "sas", "sasp"]
    assert headers[0] == "block" and len(headers) == 14
    for row in rows:
        for h, cell in zip(headers[1:], row[1:]):
            if h.startswith("matmul"):
                continue
            value = _number(cell)
            assert math.isfinite(value) and value > 0, (row[0], h, cell)
    mm = {r[0]: r[headers.index("matmul weights / d^2 (block 0, others)")] for r in rows}
    # Exact accounting: Q, K, V, O + MLP 8 d^2 = 12 d^2; SAS drops V and O (block 0 keeps a value matrix).
    assert mm == {"prenorm": "12, 12", "sas": "11, 10", "sasp": "11, 10"}
    params = {r[0]: _number(r[headers.index("parameters")]) for r in rows}
    assert params["sas"] < params["prenorm"] and params["sasp"] < params["prenorm"]
    # Ratios are relative to pre-norm, so its own are exactly 1.
    assert rows[0][headers.index("train ratio")] == "1.000"


def test_markdown_table_round_trips_through_parse_table() -> None:
    common = _module("common")
    markdown_table, parse_table = common.markdown_table, common.parse_table
    table = markdown_table(["a", "b"], [["x", 1.5], ["y", None]])
    headers, rows = parse_table("## T\n\n" + table + "\n\ntext", "## T")
    assert headers == ["a", "b"] and rows == [["x", "1.500"], ["y", "n/a"]]
    with pytest.raises(ValueError, match="1 cells, the header 2"):
        markdown_table(["a", "b"], [["only one"]])
