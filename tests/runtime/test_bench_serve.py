"""`leanserve bench serve`'s table, from synthetic samples (the measurement itself runs against a
real Ray Serve in test_serve_integration.py)."""

from __future__ import annotations

import pytest

from runtime.bench_serve import Samples, report


def _samples(tokens: int) -> Samples:
    return Samples(
        bare=[0.100, 0.100, 0.100],
        unary=[0.110, 0.112, 0.130],
        unary_engine=[0.103, 0.104, 0.120],
        stream=[0.140, 0.150, 0.160],
        bare_without_ray=[0.090, 0.090, 0.091],
        unary_tokens=[tokens] * 3,
    )


def test_report_gives_paired_overhead_transport_and_reference(capsys):
    over = report(_samples(32), stream_interval=1, new_tokens=32)
    out = capsys.readouterr().out
    assert over == pytest.approx(0.12)  # p50 112 ms over p50 100 ms
    assert "+12.0%" in out and "target <= +15%: met" in out
    assert "transport (wall - replica engine) p50 8.0 ms" in out
    assert "before Ray started +24.4%" in out  # 112 over 90 ms
    assert "warning" not in out


def test_report_warns_when_served_requests_stopped_early(capsys):
    report(_samples(20), stream_interval=4, new_tokens=32)
    out = capsys.readouterr().out
    assert "stopped after 20 of 32 tokens" in out and "4 tok/msg" in out
