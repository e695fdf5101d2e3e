"""Reports a user can trust: no files of a scenario that did not run, one y axis and one legend
per quantity, no legend entry without points, and a note for every blank column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtest import report as report_mod
from loadtest.driver import RequestResult, RunResult
from loadtest.report import BASE_FILES, FILES, blank_column_notes, files_for, markdown, write_report
from loadtest.sweep import SLO, Profile, SweepReport, summarize

MODEL = {"name": "m", "backend": "torch", "min_steps": 2, "max_steps": 8}


def _point(group: str, label: str, steps: int, profile: Profile, keep_series: bool = False) -> Any:
    results = [
        RequestResult(i, 0.1 * i, 0.1 * i, 0.1 * i + 0.02 * steps, 0.1 * i + 0.1 * steps,
                      [0.1 * i + 0.02 * steps + 0.01 * k for k in range(4)], 4, 3, "OK", steps)
        for i in range(5)
    ]  # fmt: skip
    run = RunResult(results, wall_s=2.0, mode="open", rate=2.5)
    return summarize(group, label, {"steps": steps}, run, SLO(), profile, keep_series)


def _report(profile: Profile | None = None, overload: bool = False, **config: Any) -> SweepReport:
    profile = profile or Profile()
    points = [_point("steps", f"N={n}", n, profile) for n in (2, 4, 8)]
    if overload:
        points += [_point("overload", "fixed N=8", 8, profile, keep_series=True)]
    cfg = {"mode": "open", "max_requests": 5, "duration_s": 2.0, "max_tokens": 4, "slo": {}, **config}
    return SweepReport(MODEL, cfg, points, overload_rate=3.0 if overload else None)


def test_no_overload_or_step_load_files_without_those_scenarios(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    for name in FILES:  # an earlier run's files in the same folder
        (out / name).write_text("old")
    paths = write_report(_report(), out)
    assert sorted(p.name for p in paths) == sorted(BASE_FILES) == sorted(files_for(_report()))
    assert sorted(p.name for p in out.iterdir()) == sorted(BASE_FILES)
    assert "overload" not in (out / "summary.md").read_text().lower()
    paths = write_report(_report(overload=True), out)
    assert {"overload_timeseries.csv", "overload_timeseries.png"} <= {p.name for p in paths}
    assert (out / "overload_timeseries.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def figures(monkeypatch) -> list[Any]:
    """The figures the report draws, kept open (pyplot.close is recorded instead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept: list[Any] = []
    close = plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def _figure(figures: list[Any], title_part: str) -> Any:
    return next(f for f in figures if title_part in (f._suptitle.get_text() if f._suptitle else "")
                or any(title_part in ax.get_title() for ax in f.axes))  # fmt: skip


def test_throughput_has_an_axis_and_a_legend_per_quantity(tmp_path: Path, figures: list[Any]) -> None:
    report_mod.plot_all(_report(), tmp_path)
    fig = _figure(figures, "throughput vs steps")
    labels = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
    assert len(fig.axes) == 2
    # Side by side, not a twin axis drawing one quantity's curve over the other's.
    assert fig.axes[0].get_position().x1 <= fig.axes[1].get_position().x0
    assert any("requests/s" in lab for lab in labels[0]) and not any("tokens" in lab for lab in labels[0])
    assert labels[1] == ["output tokens/s"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["requests/s", "tokens/s"]
    assert all(ax.get_legend() is not None for ax in fig.axes)
    tokens = fig.axes[1].get_lines()[0].get_ydata()
    assert list(tokens) == pytest.approx([p.tokens_per_s for p in _report().points])


def test_a_rates_only_run_plots_latency_and_throughput_against_the_offered_rate(
    tmp_path: Path, figures: list[Any]
) -> None:
    """`--steps none --rates ...` (one setting, several loads): no empty panels."""
    profile = Profile()
    points = []
    for rate in (6.0, 2.0, 10.0):
        p = _point("rate", f"{rate:g}/s", 4, profile)
        p.rate = rate
        points.append(p)
    cfg = {"mode": "open", "max_requests": 5, "duration_s": 2.0, "max_tokens": 4, "slo": {}}
    report_mod.plot_all(SweepReport(MODEL, cfg, points), tmp_path)
    for title in ("latency vs offered rate", "throughput vs offered rate"):
        fig = _figure(figures, title)
        for ax in fig.axes:
            assert ax.get_xlabel() == "offered requests/s"
            assert [list(line.get_xdata()) for line in ax.get_lines()][0] == [2.0, 6.0, 10.0]
            assert not ax.texts  # no "no data" placeholder


def test_quality_plot_lists_only_series_with_points(tmp_path: Path, figures: list[Any]) -> None:
    settings = [{"steps": n, "experts": None, "perplexity": 10.0 - n} for n in range(2, 9)]
    report_mod.plot_all(_report(Profile({"settings": settings})), tmp_path)
    ax = _figure(figures, "latency vs quality").axes[0]
    entries = [t.get_text() for t in ax.get_legend().get_texts()]
    assert entries == ["steps", "Pareto front"]  # no "experts" or "tier": this run has none


def test_blank_columns_are_explained(tmp_path: Path) -> None:
    http = _report(http_url="http://127.0.0.1:8000")
    notes = blank_column_notes(http)
    assert len(notes) == 2
    assert (
        notes[0].startswith("ppl is blank") and "--model-dir or --profile" in notes[0] and "HTTP" in notes[0]
    )
    assert notes[1].startswith("predicted E2E is blank") and "config.json" in notes[1]
    assert all(n in markdown(http) for n in notes)
    settings = [{"steps": n, "experts": None, "perplexity": 10.0 - n} for n in range(2, 9)]
    profiled = _report(Profile({"settings": settings}), profile_path="p.json")
    assert [n.split(" is blank")[0] for n in blank_column_notes(profiled)] == ["predicted E2E"]
    assert "leaves out queueing" in markdown(profiled)  # the cost model's gap, explained


def test_the_cost_model_note_says_why_there_is_no_r2() -> None:
    from loadtest.sweep import _compare_cost_model

    cfg = {"mode": "open", "max_requests": 5, "duration_s": 2.0, "max_tokens": 4, "slo": {}}
    rates = SweepReport(MODEL, cfg, [_point("rate", "2/s", 4, Profile())])
    rates.points[0].predicted_e2e_ms = 50.0  # a profile with a cost model was given
    _compare_cost_model(rates)
    assert rates.cost_r2 is None and "this run has none" in rates.notes[-1]
    bare = SweepReport(MODEL, cfg, [_point("rate", "2/s", 4, Profile())])
    _compare_cost_model(bare)
    assert "pass --model-dir" in bare.notes[-1]
