"""The Time Matters experiment runs end to end (`--quick`) and reports finite R^2 values."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

# `experiments/` is a top-level folder of the repository; pytest's `pythonpath = ["."]` makes it importable.


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_time_matters_quick(tmp_path: Path) -> None:
    module = importlib.import_module("experiments.time_matters")
    parse_table = importlib.import_module("experiments.common").parse_table
    out = tmp_path / "reports"
    rc = module.main(["--quick", "--out", str(out), "--cache", str(tmp_path / "cache"), "--threads", "2"])
    assert rc == 0
    report, png = out / "time_matters.md", out / "time_matters.png"
    assert report.is_file() and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text(encoding="utf-8")
    assert "![time_matters](time_matters.png)" in text
    assert "Command: `python -m experiments.time_matters --quick" in text
    assert "## Differences from the paper" in text

    # The fit table: one finite R^2 (at most 1) per predictor.
    headers, rows = parse_table(text, "## Results")
    assert headers[:2] == ["predictor", "R^2"]
    assert [r[0] for r in rows] == ["FLOPs", "bytes", "FLOPs + bytes", "FLOPs + bytes + layers"]
    r2 = {r[0]: _number(r[1]) for r in rows}
    for name, value in r2.items():
        assert math.isfinite(value) and value <= 1.0, (name, value)
    # Adding a predictor never lowers the in-sample R^2 of a least-squares fit.
    assert r2["FLOPs + bytes"] >= max(r2["FLOPs"], r2["bytes"]) - 1e-3
    # The summary line carries the same numbers with more digits.
    line = next(x for x in text.splitlines() if x.startswith("R^2 (FLOPs) ="))
    parts = [p.split("=")[1].strip().rstrip(".") for p in line.split(", R^2")]
    assert len(parts) == 3 and all(math.isfinite(float(p)) for p in parts)

    # The fixed-time comparison: two models, positive step times and iterations, finite losses.
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("| model | d_model |"))
    fixed = [[c.strip() for c in x.strip().strip("|").split("|")] for x in lines[start + 2 : start + 4]]
    names = [r[0] for r in fixed]
    assert names[0].startswith("wide-") and names[1].startswith("deep-")
    for row in fixed:
        assert _number(row[4]) > 0 and _number(row[7]) >= 1  # parameters, iterations
        assert math.isfinite(_number(row[10])) and _number(row[10]) > 0  # val loss
