"""Smoke test of `python -m runtime.bench_kv` (a tiny run; the numbers are not checked)."""

from __future__ import annotations

import json

from runtime import bench_kv


def test_bench_kv_runs_both_policies_with_identical_tokens(capsys):
    bench_kv.main(["--requests", "4", "--steps", "2", "--kv-mib", "1", "--repeat", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report["identical_tokens"] is True
    for policy in ("reserve", "on_demand"):
        r = report[policy]
        assert r["allocation"] == policy and r["tokens"] == report["reserve"]["tokens"] > 0
    assert report["reserve"]["preemptions"] == 0
    assert report["on_demand"]["peak_running"] >= report["reserve"]["peak_running"]


def test_workload_is_seeded_and_in_range():
    a = bench_kv.workload(20, 16, 4096, seed=3)
    assert a == bench_kv.workload(20, 16, 4096, seed=3)
    assert all(len(p) == 16 and bench_kv.LENGTHS[0] <= m <= bench_kv.LENGTHS[1] for p, m in a)


def test_bench_kv_runs_the_memory_dial_side_by_side(capsys):
    bench_kv.main(
        ["--requests", "4", "--steps", "3", "--kv-mib", "1", "--repeat", "1", "--dial-min-steps", "2"]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["identical_tokens"] is True  # the plain policies' check, unchanged
    for policy in ("reserve", "on_demand"):
        dial = report[policy + "+dial"]
        assert dial["allocation"] == policy + "+dial" and dial["tokens"] == report[policy]["tokens"]
        assert 2 <= dial["mean_steps"] <= 3 and report[policy]["mean_steps"] == 3
        assert report[f"{policy}+dial_vs_{policy}"]["mean_steps"] == [dial["mean_steps"], 3]
