"""SLO goodput, percentiles, R^2, and a small sweep against the fake server that writes every report file."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from loadtest.arrivals import LengthSpec
from loadtest.driver import RequestResult, RunResult
from loadtest.report import BASE_FILES, OVERLOAD_FILES, write_report
from loadtest.sweep import SLO, Profile, SweepConfig, percentiles_ms, r_squared, run_sweep, summarize


def _result(i: int, ttft: float, gaps: list[float], code: str = "OK") -> RequestResult:
    times = [ttft]
    for g in gaps:
        times.append(times[-1] + g)
    detail = "" if code == "OK" else "queue full"
    return RequestResult(
        i, 0.0, 0.0, ttft, times[-1], times, len(times), 4, code, 4, None, "explicit", detail
    )


def test_slo_goodput_counts_only_requests_that_meet_every_objective() -> None:
    slo = SLO.parse("ttft=0.5,itl=0.05")
    assert slo == SLO(0.5, 0.05, None)
    good = _result(0, 0.2, [0.04, 0.05])
    slow_first = _result(1, 0.6, [0.01])
    slow_tokens = _result(2, 0.1, [0.02, 0.10])  # mean gap 0.06 > 0.05, though one gap is fast
    failed = _result(3, 0.1, [0.01], code="RESOURCE_EXHAUSTED")
    assert [slo.met(r) for r in (good, slow_first, slow_tokens, failed)] == [True, False, False, False]
    assert SLO.parse("e2e=0.1").met(good) is False and SLO.parse("e2e=1").met(good) is True
    run = RunResult([good, slow_first, slow_tokens, failed], wall_s=2.0, mode="open", rate=2.0)
    p = summarize("steps", "N=4", {"steps": 4}, run, slo, Profile())
    assert p.goodput_rps == pytest.approx(0.5) and p.goodput_fraction == pytest.approx(0.25)
    assert p.throughput_rps == pytest.approx(1.5) and p.errors == {"RESOURCE_EXHAUSTED": 1}
    assert p.error_examples == {"RESOURCE_EXHAUSTED": "queue full"}
    with pytest.raises(ValueError, match="SLO"):
        SLO.parse("ttfb=1")


def test_the_itl_objective_is_per_token_when_a_message_carries_several() -> None:
    # A speculative stream: 1 token at 0.1 s, then 3 tokens at 0.22 s and 3 at 0.34 s. Its
    # messages are 0.12 s apart, but its 6 tokens after the first took 0.24 s: 0.04 s each.
    spec = RequestResult(0, 0.0, 0.0, 0.1, 0.34, [0.1, 0.22, 0.34], 7, 4, "OK", 12, None, "explicit")
    assert spec.tpot_s == pytest.approx(0.04) and spec.itls_s == pytest.approx([0.12, 0.12])
    assert SLO.parse("itl=0.05").met(spec) and not SLO.parse("itl=0.03").met(spec)
    plain = _result(1, 0.2, [0.04, 0.05])  # one token per message: TPOT is the mean gap
    assert plain.tpot_s == pytest.approx(0.045)
    p = summarize(
        "draft", "d", {}, RunResult([spec, plain], 1.0, "open", 2.0), SLO.parse("itl=0.05"), Profile()
    )
    assert p.tpot_p50_ms == pytest.approx(40, rel=0.01) and p.goodput_fraction == 1.0


def test_percentiles_and_r_squared() -> None:
    pct = percentiles_ms([i / 1000 for i in range(1, 1001)])  # 1..1000 ms
    assert pct["p50"] == pytest.approx(500, rel=0.01) and pct["p99"] == pytest.approx(990, rel=0.01)
    assert percentiles_ms([])["p99"] is None
    assert r_squared([1, 2, 3], [1, 2, 3]) == 1.0
    assert r_squared([1, 2, 3], [2, 2, 2]) == pytest.approx(0.0)
    assert r_squared([1.0], [1.0]) is None


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """config.json (steps 2..8, MoE) and a profile.json with perplexities and a cost model."""
    from models.config import ModelConfig

    preset = json.loads((Path(__file__).parents[2] / "models/presets/ode-tiny.json").read_text())
    config = ModelConfig.from_dict({**preset["model"], "max_steps": 8, "default_steps": 8})
    (tmp_path / "config.json").write_text(config.to_json())
    settings = [
        {"steps": n, "experts": e, "perplexity": round(40 * math.exp(-0.1 * n) + 3 - e, 3)}
        for e in (1, 2)
        for n in range(2, 9)
    ]
    cost = {"a_bytes": 1e-10, "b_flops": 1e-11, "c": 2e-3, "r2_bytes": 0.9, "r2_flops": 0.8,
            "r2_both": 0.95, "n_samples": 10, "config_name": config.name}  # fmt: skip
    profile = {"settings": settings, "quality_tiers": {}, "cost_model": cost}
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    return tmp_path


def test_small_sweep_writes_every_report_file(fake_server, model_dir: Path, tmp_path: Path) -> None:
    server = fake_server(token_s=0.002)
    cfg = SweepConfig(
        target=server.target, rate=40.0, steps=[2, 8], experts=[1], tiers=["fast"], rates=[80.0],
        overload=True, overload_rate=60.0, max_requests=6, duration_s=2.0, max_tokens=3,
        prompt_lengths=LengthSpec.parse("uniform:2:6"), timeout_s=5.0, model_dir=str(model_dir),
        progress=False,
    )  # fmt: skip
    report = run_sweep(cfg)
    groups = [p.group for p in report.points]
    assert groups == ["steps", "steps", "experts", "tier", "rate", "overload", "overload", "overload"]
    assert all(p.ok == p.sent == 6 for p in report.points)
    by_label = {p.label: p for p in report.points}
    # Latency grows with steps on the fake server; quality comes from the profile per step count.
    assert by_label["N=8"].e2e_p50_ms > by_label["N=2"].e2e_p50_ms
    assert by_label["N=2"].perplexity == pytest.approx(40 * math.exp(-0.2) + 1, abs=1e-3)
    assert by_label["experts_top_k=1"].mean_steps == 8 and by_label["fast"].mean_steps == 2
    controller = by_label["SLO controller"]
    assert controller.policy_reasons == {"default:slo": 6} and controller.mean_steps == 3
    assert len(controller.series) == 6 and controller.series[0]["steps"] == 3
    assert all(p.predicted_e2e_ms is not None for p in report.points)
    assert report.cost_r2 is not None and report.overload_rate == 60.0

    out = tmp_path / "report"
    paths = write_report(report, out)
    assert sorted(p.name for p in paths) == sorted(BASE_FILES + OVERLOAD_FILES)  # no step load: none of its
    for path in paths:
        assert path.stat().st_size > 0, path
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "points.csv").open()))
    assert [r["label"] for r in rows] == [p.label for p in report.points]
    series = list(csv.DictReader((out / "overload_timeseries.csv").open()))
    assert len(series) == 18
    data = json.loads((out / "points.json").read_text())
    assert data["points"][0]["ttft_p99_ms"] == report.points[0].ttft_p99_ms
    summary = (out / "summary.md").read_text()
    assert "## Overload at 60.00 req/s" in summary and "| SLO controller |" in summary


def test_draft_steps_points_report_acceptance_beside_the_plain_baseline(fake_server, tmp_path: Path) -> None:
    server = fake_server(token_s=0.002)
    cfg = SweepConfig(
        target=server.target, rate=40.0, steps=[], draft_steps=[2, 4], draft_tokens=3, max_requests=5,
        duration_s=2.0, max_tokens=5, timeout_s=5.0, progress=False,
    )  # fmt: skip
    report = run_sweep(cfg)
    assert [(p.group, p.label) for p in report.points] == [
        ("draft", "draft_steps=0"), ("draft", "draft_steps=2"), ("draft", "draft_steps=4"),
    ]  # fmt: skip
    sent = [(r.compute.draft_steps, r.compute.draft_tokens, r.compute.steps) for r in server.servicer.seen]
    assert set(sent) == {(0, 0, 8), (2, 3, 8), (4, 3, 8)}  # the baseline sends draft_steps=0 explicitly
    base, d2, d4 = report.points
    assert base.acceptance is None and base.drafted_tokens == 0
    assert d2.drafted_tokens == d4.drafted_tokens == 5 * 4
    assert d2.acceptance == pytest.approx(5 / 20) and d4.acceptance == pytest.approx(10 / 20)
    out = tmp_path / "report"
    names = sorted(p.name for p in write_report(report, out))
    assert "speculation.png" in names and (out / "speculation.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "## Self-speculative decoding at N=8" in summary
    assert "| 4 | 0.500 |" in summary and summary.count("x |") >= 3  # tokens/s vs the baseline
    assert "TPOT p50 / p99" in summary and report.points[2].tpot_p50_ms is not None
    rows = list(csv.DictReader((out / "points.csv").open()))
    assert rows[2]["acceptance"] == "0.5"
