"""`leanserve serve`'s supervisor process (runtime/serve_cli.py), with a fake driver (no Ray here)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime import serve_cli
from runtime.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def _args(**kw) -> argparse.Namespace:
    """`leanserve serve`'s parsed defaults (the real parser), with `kw` set (a test's own keys too)."""
    args = {k: v for k, v in vars(build_parser().parse_args(["serve"])).items() if not k.startswith("_")}
    return argparse.Namespace(**{**args, **kw})


def test_session_members_lists_a_new_session():
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert serve_cli.session_members(proc.pid) == [proc.pid]
        assert os.getpid() not in serve_cli.session_members(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
    assert serve_cli.session_members(proc.pid) == []


# --- the supervisor, with a fake driver (no Ray) -----------------------------------------------------
# The fake driver starts a grandchild in its session (as Ray's processes are) and, on SIGTERM,
# reports and exits leaving the grandchild behind, or ignores SIGTERM ("stubborn").
FAKE_DRIVER = """
import json, signal, subprocess, sys, time
from runtime.serve_driver import _die_with_parent
payload = json.loads(sys.stdin.read())
_die_with_parent(payload["_parent_pid"])
grandchild = subprocess.Popen(["sleep", "600"])
def on_term(*_):
    print("drained", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if payload["fake_mode"] == "stubborn" else on_term)
print("ready", grandchild.pid, payload["api_key"], flush=True)
for _ in range(1200):
    time.sleep(0.1)
"""


def _supervisor(mode: str, drain_s: float = 0.5) -> subprocess.Popen:
    """`serve_cli.main` in its own session (signals to it never reach pytest), fake driver inside."""
    args = vars(_args(fake_mode=mode, api_key="k", graceful_shutdown_timeout=drain_s))
    code = (
        "import argparse, sys\n"
        "from runtime import serve_cli\n"
        f"serve_cli._DRIVER_CODE = {FAKE_DRIVER!r}\n"
        "serve_cli.SHUTDOWN_MARGIN_S = 1.0\n"
        f"sys.exit(serve_cli.main(argparse.Namespace(**{args!r})))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _ready(proc: subprocess.Popen) -> int:
    line = proc.stdout.readline()
    assert line.startswith("ready "), line + proc.stderr.read()
    _, grandchild, key = line.split()
    assert key == "k"  # the arguments arrive through the pipe
    return int(grandchild)


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def supervise():
    """`supervise(mode, drain_s)` -> (supervisor process, grandchild pid); all killed afterwards."""
    started: list[tuple[subprocess.Popen, int]] = []

    def start(mode: str, drain_s: float = 0.5) -> tuple[subprocess.Popen, int]:
        proc = _supervisor(mode, drain_s)
        started.append((proc, -1))
        started[-1] = (proc, _ready(proc))
        return started[-1]

    yield start
    for proc, grandchild in started:
        proc.kill()
        proc.wait(10)
        if grandchild > 0 and not _gone(grandchild, 0.1):
            os.kill(grandchild, signal.SIGKILL)


@pytest.mark.parametrize("target", ["process", "group"])
def test_supervisor_forwards_sigterm_and_clears_the_session(supervise, target):
    proc, grandchild = supervise("graceful")
    assert os.getsid(grandchild) != os.getsid(proc.pid)  # the driver's session is its own
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)  # the supervisor leads its group (start_new_session)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    assert proc.stdout.read().strip() == "drained"  # the driver handled the forwarded SIGTERM
    assert _gone(grandchild), "the leftover in the driver's session was not stopped"
    err = proc.stderr.read()
    assert "SIGTERM: draining" in err and "leftover Ray process(es)" in err


@pytest.mark.parametrize(
    ("drain_s", "signals", "message"),
    [
        (0.5, [signal.SIGTERM], "killing it"),  # not gone 0.5 s drain + 1 s margin after the signal
        (300.0, [signal.SIGINT, signal.SIGINT], "SIGINT again: stopping at once"),
    ],
)
def test_supervisor_kills_a_driver_that_does_not_stop(supervise, drain_s, signals, message):
    proc, grandchild = supervise("stubborn", drain_s)
    t0 = time.monotonic()
    for sig in signals:
        os.kill(proc.pid, sig)
        time.sleep(0.5)
    assert proc.wait(30) == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 15  # generous bound
    assert _gone(grandchild)
    assert message in proc.stderr.read()


def test_driver_drains_when_the_supervisor_is_killed(supervise):
    proc, _ = supervise("graceful")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.stdout.readline().strip() == "drained"  # PR_SET_PDEATHSIG -> SIGTERM
