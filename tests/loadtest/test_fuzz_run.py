"""loadtest.fuzz_run: the case mix, and the run loop against fake servers on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import json

import pytest

from loadtest import fuzz_case, fuzz_run, fuzz_transport
from runtime.proto_build import load_stubs

pb2, _ = load_stubs()


def test_cases_are_deterministic_per_seed_and_bounded() -> None:
    a, b = fuzz_run.generate_cases(pb2, 3, 300), fuzz_run.generate_cases(pb2, 3, 300)
    assert [(c.kind, c.label, c.payload) for c in a] == [(c.kind, c.label, c.payload) for c in b]
    assert [c.index for c in a] == list(range(300))
    assert [c.payload for c in fuzz_run.generate_cases(pb2, 4, 300)] != [c.payload for c in a]
    assert {c.kind for c in a} == {"grpc", "grpc_raw", "http"}
    assert max(len(c.payload) for c in a) <= 9 * fuzz_case.MB
    only_http = fuzz_run.generate_cases(None, 0, 50, grpc_on=False)
    assert {c.kind for c in only_http} == {"http"}
    with pytest.raises(ValueError):
        fuzz_run.generate_cases(pb2, 0, 10, grpc_on=False, http_on=False)


def _case(index: int, kind: str, payload: bytes, label: str = "t") -> fuzz_case.Case:
    if kind == "http":
        return fuzz_case.Case(
            index, kind, label, payload, "POST", fuzz_case.COMPLETIONS, dict(fuzz_case.JSON_HEADERS)
        )
    return fuzz_case.Case(index, kind, label, payload, "Generate")


def test_run_classifies_counts_deaths_and_recovers(fakes) -> None:
    _, target, url = fakes
    cases = [
        _case(0, "grpc", b"\x0a\x02hi"),
        _case(1, "grpc_raw", b"bad"),
        _case(2, "grpc", b"boom", "the INTERNAL one"),
        _case(3, "http", b'{"prompt": "x"}'),
        _case(4, "http", b"not json"),
        _case(5, "http", b'{"prompt": "explode"}', "the 500 one"),
        _case(6, "grpc", b"kill", "the killer"),
        _case(7, "grpc", b"\x0a\x02hi"),
        fuzz_case.Case(8, "grpc", "stream", b"\x0a\x02hi", "GenerateStream"),
    ]
    sender = fuzz_transport.Sender(target, url, timeout_s=10)
    try:
        report = fuzz_run.run_fuzz(sender, pb2, cases, health_every=3, recovery_timeout_s=10)
    finally:
        sender.close()
    verdicts = [o.verdict for o in report.outcomes]
    assert verdicts == ["OK", "REJECTED", "BAD", "OK", "REJECTED", "BAD", "UNAVAILABLE", "OK", "OK"]
    assert [o.index for o in report.bad] == [2, 5]
    assert report.bad[0].input.startswith("grpc Generate [the INTERNAL one]")
    assert len(report.deaths) == 1 and report.deaths[0].after_index == 6
    assert report.deaths[0].recovered_after_s is not None
    assert any("the killer" in s for s in report.deaths[0].suspects)
    assert not report.ok and not report.stopped_early
    data = json.loads(json.dumps(report.to_json(), default=str))
    assert data["verdicts"]["grpc"]["BAD"] == 1 and len(data["bad"]) == 2
    table = fuzz_run.summary_table(report)
    assert "engine deaths: 1" in table and "BAD #2 INTERNAL" in table


def test_run_stops_at_the_time_limit(fakes) -> None:
    _, target, url = fakes
    sender = fuzz_transport.Sender(target, url, timeout_s=10)
    try:
        cases = [_case(i, "grpc", b"\x0a\x02hi") for i in range(50)]
        report = fuzz_run.run_fuzz(sender, pb2, cases, time_limit_s=0.0)
    finally:
        sender.close()
    assert len(report.outcomes) <= 1 and "time limit" in report.stopped_early
