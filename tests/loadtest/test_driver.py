"""Latency is measured from scheduled send times; runs stop at their bounds; errors keep their code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from loadtest.driver import (
    CLIENT_CANCELLED,
    GrpcTransport,
    RequestResult,
    RequestSpec,
    RunResult,
    run_closed_loop,
    run_open_loop,
)

SPEC = RequestSpec("hello there", max_tokens=3, compute={"steps": 2})


def _open(target: str, schedule: list[float], specs: list[RequestSpec] | None = None,
          duration_s: float = 5.0, drain_s: float = 5.0) -> RunResult:  # fmt: skip
    async def go() -> RunResult:
        transport = GrpcTransport(target, timeout_s=10)
        await transport.open()
        try:
            return await run_open_loop(transport, specs or [SPEC], schedule, duration_s=duration_s,
                                       drain_s=drain_s)  # fmt: skip
        finally:
            await transport.close()

    return asyncio.run(asyncio.wait_for(go(), 30))


def test_a_server_stall_shows_in_the_latency_of_requests_scheduled_during_it(fake_server) -> None:
    # One request at a time; request 0 stalls 300 ms, so requests 1-3 wait behind it.
    server = fake_server(token_s=0.001, serial=True, stall_index=0, stall_s=0.3)
    schedule = [0.0, 0.05, 0.10, 0.15, 0.60]
    run = _open(server.target, schedule)
    rs = run.results
    assert [r.code for r in rs] == ["OK"] * 5
    assert [r.scheduled_s for r in rs] == schedule
    assert rs[0].e2e_s >= 0.3
    for r in rs[1:4]:
        # Served only after the stall ends (~0.3 s): the wait since the scheduled time is included.
        assert r.ttft_s is not None and r.ttft_s >= 0.3 - r.scheduled_s - 0.01
        assert r.e2e_s >= 0.3 - r.scheduled_s
        assert r.send_lag_s < 0.05  # the sender itself was on time
    assert rs[4].e2e_s < 0.2  # scheduled after the stall: no wait
    assert all(r.tokens == 3 and len(r.itls_s) == 2 and r.steps == 2 for r in rs)


class _BlockingTransport:
    """Blocks the whole event loop on its first request (a client that falls behind)."""

    def __init__(self) -> None:
        self.calls = 0

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def run(self, spec: RequestSpec, result: RequestResult, now: Callable[[], float]) -> None:
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.25)  # deliberately synchronous: nothing else in the loop runs meanwhile
        result.first_token_s = now()
        result.token_times.append(now())
        result.end_s = now()


def test_a_sender_that_falls_behind_still_charges_latency_from_the_schedule() -> None:
    schedule = [0.0, 0.05, 0.10]
    run = asyncio.run(run_open_loop(_BlockingTransport(), [SPEC], schedule, duration_s=1.0))
    late = run.results[1:]
    assert all(r.send_lag_s >= 0.1 for r in late)  # sent ~0.25 s, scheduled 0.05 / 0.10
    assert all(r.e2e_s >= 0.25 - r.scheduled_s - 0.01 for r in late)


def test_open_loop_stops_at_the_request_count(fake_server) -> None:
    server = fake_server()
    run = _open(server.target, [i * 0.002 for i in range(12)])
    assert len(run.results) == 12 and len(server.servicer.seen) == 12


def test_open_loop_stops_sending_at_the_duration_and_cancels_at_the_drain_bound(fake_server) -> None:
    # Every request takes 2 s (token_s x steps x tokens); the run must not wait for them.
    server = fake_server(token_s=0.33)
    schedule = [0.0, 0.1, 0.2, 0.5, 1.0]
    t = time.perf_counter()
    run = _open(server.target, schedule, duration_s=0.25, drain_s=0.3)
    elapsed = time.perf_counter() - t
    assert len(run.results) == 3  # offsets 0.5 and 1.0 are past the 0.25 s window
    assert [r.code for r in run.results] == [CLIENT_CANCELLED] * 3
    assert elapsed < 0.25 + 0.3 + 0.5
    assert all(0.5 <= r.e2e_s <= 0.8 for r in run.results[:1])


def test_closed_loop_keeps_concurrency_and_stops_at_count_and_duration(fake_server) -> None:
    server = fake_server(token_s=0.002)

    async def go(max_requests: int, duration_s: float) -> RunResult:
        transport = GrpcTransport(server.target)
        await transport.open()
        try:
            return await run_closed_loop(transport, [SPEC], concurrency=3, max_requests=max_requests,
                                         duration_s=duration_s, drain_s=2.0)  # fmt: skip
        finally:
            await transport.close()

    run = asyncio.run(go(9, 10.0))
    assert len(run.results) == 9 and all(r.ok for r in run.results)
    assert run.concurrency == 3
    # Closed loop: the scheduled time is the send time.
    assert all(r.send_lag_s == pytest.approx(0, abs=0.01) for r in run.results)
    t = time.perf_counter()
    run = asyncio.run(go(100_000, 0.3))
    assert time.perf_counter() - t < 1.5
    assert 3 <= len(run.results) < 100_000
    assert all(r.scheduled_s <= 0.3 for r in run.results)


def test_errors_are_counted_by_grpc_code(fake_server) -> None:
    server = fake_server()
    specs = [SPEC, RequestSpec("reject", max_tokens=3)]
    run = _open(server.target, [0.0, 0.01, 0.02, 0.03], specs)
    assert [r.code for r in run.results] == ["OK", "RESOURCE_EXHAUSTED", "OK", "RESOURCE_EXHAUSTED"]
    assert run.results[1].detail == "queue full"  # the server's message is kept for the report
