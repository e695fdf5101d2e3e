"""The step-load scenario (loadtest.stepload) against the fake server."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from loadtest.arrivals import LengthSpec
from loadtest.report import markdown, write_report
from loadtest.stepload import BEGIN, CONTROLLER, END, count_reversals, step_schedule, update_readme
from loadtest.sweep import SweepConfig, run_sweep

from .test_sweep_report import model_dir  # noqa: F401 - the fixture


def test_count_reversals_ignores_plateaus() -> None:
    assert count_reversals([7, 7, 6, 6, 5, 5, 5]) == 0
    assert count_reversals([7, 6, 6, 7, 7, 6]) == 2
    assert count_reversals([]) == 0


def test_step_schedule_follows_the_phases() -> None:
    offsets = step_schedule(10.0, (0.5, 2.0, 0.5), 20.0, seed=1)
    counts = [sum(1 for t in offsets if i * 20 <= t < (i + 1) * 20) for i in range(3)]
    assert offsets == sorted(offsets) and offsets[-1] <= 60.0
    assert 60 < counts[0] < 140 and 320 < counts[1] < 480 and 60 < counts[2] < 140


def test_step_load_rows_verdicts_and_files(fake_server, model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    server = fake_server(token_s=0.001)
    cfg = SweepConfig(
        target=server.target, steps=[], step_load=True, step_load_rate=8.0, phase_s=1.0,
        step_load_steps=[2, 8], max_tokens=3, prompt_lengths=LengthSpec.parse("fixed:4"), timeout_s=5.0,
        model_dir=str(model_dir), progress=False,
    )  # fmt: skip
    report = run_sweep(cfg)
    result = report.step_load
    assert list(result.phases) == ["fixed N=2", "fixed N=8", CONTROLLER]
    assert all(len(rows) == 3 for rows in result.phases.values())
    assert [r["mean_steps"] for r in result.phases[CONTROLLER]] == [3, 3, 3]  # the fake's default
    # The fake server meets the SLO everywhere: the best fixed count is the best perplexity (N=8).
    assert result.best_fixed == ["fixed N=8"] * 3
    assert result.trace_source == "requests" and result.ladder_top == 3
    assert result.verdicts[1]["slo"] and result.verdicts[1]["quality"] is False
    assert 2 in result.back_s and result.verdicts[2]["back"] is True
    assert "Step load 0.5x -> 2x -> 0.5x" in markdown(report)
    out = tmp_path / "report"
    write_report(report, out)
    rows = list(csv.DictReader((out / "step_load.csv").open()))
    assert len(rows) == 9 and rows[0]["policy"] == "fixed N=2"
    assert (out / "step_load.png").read_bytes()[:4] == b"\x89PNG"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\nafter\n")
    update_readme(readme, out)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith(f"{END}\nafter\n")
    assert "| fixed N=8 |" in text and f"]({out.as_posix()}/step_load.png)" in text


@pytest.mark.parametrize("flag", [["--step-load", "--step-load-rate", "5", "--phase-duration", "20"]])
def test_cli_flags(flag: list[str]) -> None:
    import argparse

    from loadtest.cli import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(
        p.parse_args([*flag, "--step-load-steps", "4,12", "--stats-url", "http://127.0.0.1:8000/stats"])
    )
    assert (cfg.step_load, cfg.step_load_rate, cfg.phase_s, cfg.step_load_steps) == (True, 5.0, 20.0, [4, 12])
    assert cfg.stats_url == "http://127.0.0.1:8000/stats"
