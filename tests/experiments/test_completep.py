"""The CompleteP experiment runs end to end (`--quick`) and its report's numbers hang together.

Beyond structure, the report carries facts that hold after a handful of
iterations if the parameterisations are wired correctly: at the base depth
(m_L = 1) muP and CompleteP are the same model, so their rows must agree to
the last digit, while a deeper CompleteP model (residual / m_L) and the SP
model (no width rules) must differ from muP; the reported optimum is the
argmin of the sweep table's row.
"""

from __future__ import annotations

import importlib
import math

import pytest

# `experiments/` is a top-level folder of the repository; pytest's `pythonpath = ["."]` makes it importable.
completep = importlib.import_module("experiments.completep")
parse_table = importlib.import_module("experiments.common").parse_table

QUICK = completep.QUICK
LABELS = [completep.LABELS[p] for p in completep.PARAMS]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("completep")
    out = tmp / "reports"
    rc = completep.main(["--quick", "--out", str(out), "--cache", str(tmp / "cache"), "--threads", "2"])
    assert rc == 0
    md, png = out / "completep.md", out / "completep.png"
    assert md.is_file() and png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return md.read_text(encoding="utf-8")


def test_report_structure(report: str) -> None:
    assert "Command: `python -m experiments.completep --quick" in report
    assert "Wall time: " in report
    assert "![completep](completep.png)" in report
    for heading in (
        "## Results",
        "## Findings",
        "## Coordinate check",
        "## Setup",
        "## Differences from the paper",
    ):
        assert heading in report.splitlines(), heading
    findings = report.split("## Findings")[1].split("## Coordinate check")[0]
    assert any(v in findings for v in ("**holds**", "**does NOT hold**", "**holds only in part**"))


def test_optimum_table(report: str) -> None:
    headers, rows = parse_table(report, "## Results")
    assert headers == [
        "parameterisation",
        "depth",
        "m_L",
        "optimal LR",
        "log2 optimal LR",
        "log2 optimal LR (fitted)",
        "train loss at optimum",
        "val loss at optimum",
        "optimal LR by val loss",
    ]
    assert [(r[0], int(r[1])) for r in rows] == [(p, L) for p in LABELS for L in QUICK.depths]
    swept = {f"{lr:.3g}" for lr in QUICK.lrs}
    step = QUICK.log2_lrs[1] - QUICK.log2_lrs[0]
    for row in rows:
        label, depth = row[0], int(row[1])
        m_l = depth / QUICK.base_depth if label == "CompleteP" else 1.0
        assert _number(row[2]) == pytest.approx(m_l)
        # The optimum is one of the swept learning rates, and log2 of it is its grid exponent.
        assert row[3] in swept and row[8] in swept, row
        assert 2.0 ** _number(row[4]) == pytest.approx(_number(row[3]), rel=1e-2)
        # The parabola's vertex lies within half a grid step of the grid optimum.
        assert abs(_number(row[5]) - _number(row[4])) <= step / 2 + 1e-2, row
        for cell in row[6:8]:
            loss = _number(cell)
            assert math.isfinite(loss) and 0 < loss < 1.5 * math.log(QUICK.vocab), row


def test_spread_table_matches_optima(report: str) -> None:
    _, optima = parse_table(report, "## Results")
    headers, rows = parse_table(report, "Spread of the optimum across depths:")
    assert headers[0] == "parameterisation" and len(headers) == 4
    assert [r[0] for r in rows] == LABELS
    for row in rows:
        grid = [_number(r[4]) for r in optima if r[0] == row[0]]
        fitted = [_number(r[5]) for r in optima if r[0] == row[0]]
        assert _number(row[1]) == pytest.approx(max(grid) - min(grid), abs=0.01)
        assert _number(row[2]) == pytest.approx(max(fitted) - min(fitted), abs=0.02)
        assert _number(row[3]) == pytest.approx(fitted[-1] - fitted[0], abs=0.02)


def test_sweep_table(report: str) -> None:
    headers, rows = parse_table(
        report, f"Train loss (mean of the last {QUICK.avg_last} iterations) per learning rate:"
    )
    assert headers == ["parameterisation", "depth", *[f"2^{e:g}" for e in QUICK.log2_lrs]]
    losses = {(r[0], int(r[1])): [_number(c) for c in r[2:]] for r in rows}
    assert set(losses) == {(p, L) for p in LABELS for L in QUICK.depths}
    for key, row in losses.items():
        assert all(math.isfinite(x) and x > 0 for x in row), key
    base, deep = QUICK.depths[0], QUICK.depths[-1]
    # m_L = 1: muP and CompleteP are one model (same init, same batches), so equal to the last digit.
    assert losses[("muP", base)] == losses[("CompleteP", base)]
    # The residual multiplier 1/m_L and muP's width rules change the training run.
    assert losses[("muP", deep)] != losses[("CompleteP", deep)]
    assert losses[("SP", base)] != losses[("muP", base)]
    # The optimum reported in Results is the argmin of its row.
    _, optima = parse_table(report, "## Results")
    for r in optima:
        row = losses[(r[0], int(r[1]))]
        best = QUICK.log2_lrs[min(range(len(row)), key=row.__getitem__)]
        assert _number(r[4]) == best, r


def test_coordinate_check_table(report: str) -> None:
    headers, rows = parse_table(report, "## Coordinate check")
    assert headers[:2] == ["parameterisation", "depth"] and len(headers) == 6
    assert [(r[0], int(r[1])) for r in rows] == [(p, L) for p in LABELS for L in QUICK.coord_depths]
    cells = {(r[0], int(r[1])): [_number(c) for c in r[2:]] for r in rows}
    for key, values in cells.items():
        assert all(math.isfinite(v) and v > 0 for v in values), key
    base = QUICK.coord_depths[0]
    for label in LABELS:
        assert cells[(label, base)][3] == pytest.approx(1.0)  # growth relative to the base depth
    assert cells[("muP", base)] == cells[("CompleteP", base)]
    # CompleteP's h_L is an embedding plus (L_base / L) x the sum of L branches: bounded as L grows,
    # unlike SP's (a sum of L unscaled branches), whatever the few training steps did.
    deep = QUICK.coord_depths[-1]
    assert cells[("CompleteP", deep)][1] < cells[("SP", deep)][1]


def test_best_lr_parabola_and_edges() -> None:
    grid = [-3.0, -2.0, -1.0, 0.0]
    # A parabola with its vertex at -1.75 (between grid points) is found exactly.
    losses = [(x + 1.75) ** 2 for x in grid]
    i, fitted = completep.best_lr(grid, losses)
    assert i == 1 and fitted == pytest.approx(-1.75)
    # At the edge of the grid there is no bracket: the grid point itself.
    assert completep.best_lr(grid, [4.0, 3.0, 2.0, 1.0]) == (3, 0.0)
    # A diverged run (nan) never wins, and a bracket with a nan neighbour is not fitted.
    assert completep.best_lr(grid, [5.0, 1.0, float("nan"), 2.0]) == (1, -2.0)
    with pytest.raises(ValueError, match="diverged"):
        completep.best_lr(grid, [float("nan")] * 4)


def test_final_loss_rejects_diverged_runs() -> None:
    assert completep.final_loss([3.0, 2.0, 1.0], iterations=3, k=2) == pytest.approx(1.5)
    assert math.isnan(completep.final_loss([3.0, float("nan")], iterations=3, k=2))
    assert math.isnan(completep.final_loss([3.0, 2.0], iterations=3, k=2))  # stopped early
