"""loadtest.fuzz_soak: reading a process's RSS and ancestry, and a soak run against fake servers (no Ray)."""

from __future__ import annotations

import os

import pytest

from loadtest import fuzz_soak, fuzz_transport
from runtime.proto_build import load_stubs

pb2, _ = load_stubs()


def test_process_helpers() -> None:
    rss = fuzz_soak.read_rss_bytes(os.getpid())
    assert rss is not None and rss > 1 << 20
    assert fuzz_soak.read_rss_bytes(2**22 + 12345) is None
    assert fuzz_soak._is_descendant(os.getpid(), os.getppid())
    assert not fuzz_soak._is_descendant(os.getppid(), os.getpid())
    with pytest.raises(RuntimeError):
        fuzz_soak.replica_pids()  # no Ray in this process


def test_soak_reads_rss_from_a_pid_or_stats(fakes) -> None:
    _, target, url = fakes
    sender = fuzz_transport.Sender(target, url, timeout_s=10)
    try:
        soak = fuzz_soak.run_soak(sender, pb2, 30, pids=[os.getpid()], warmup=5, samples=3)
        assert soak.requests == 30 and soak.verdicts == {"OK": 30}
        assert soak.rss_source.startswith("/proc/") and soak.growth_pct is not None
        assert "growth" in fuzz_soak.soak_summary(soak)
        assert fuzz_soak.run_soak(sender, pb2, 5).rss_before == 123456789  # /stats rss_bytes
    finally:
        sender.close()
