"""loadtest.fuzz_transport: the sender talks to the local machine only (sending itself: test_fuzz_run.py)."""

from __future__ import annotations

import pytest

from loadtest import fuzz_transport


def test_loopback_guard() -> None:
    for host in ("10.0.0.1", "example.com", "0.0.0.0"):
        with pytest.raises(ValueError):
            fuzz_transport.check_loopback(host)
    fuzz_transport.check_loopback("127.0.0.1")
