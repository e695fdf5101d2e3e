"""`leanserve serve`: the supervisor process, which runs the driver (Ray, Serve, the app) until a
stop signal, then drains it and clears what is left of its session.

The modules of the command: this one (the supervisor and the signals; standard library only),
runtime/serve_driver.py (the driver process), runtime/serve_local.py (the local Ray and Serve:
environment, start, drain, stop) and runtime/serve_config.py (the flags and --config file ->
the app's arguments).

Endpoints (defaults): gRPC 127.0.0.1:9000 (`leanserve.v1.TextGeneration`,
`grpc.health.v1.Health`, Ray's `ray.serve.RayServeAPIService/Healthz`), HTTP
http://127.0.0.1:8000 (`/v1/completions`, `/v1/models`, `/healthz`, `/stats`)
and Prometheus metrics at http://127.0.0.1:8080/metrics (Ray's exporter; the
leanserve series carry a `ray_` prefix there).

Processes: `leanserve serve` itself (`main`, the supervisor: standard library only) starts
the driver (`serve_driver.driver_main`: model-directory check, Ray, Serve, the app) as a child
in a new session, and every Ray process the driver starts is its descendant in that session. A signal
to the terminal's or `timeout`'s process group therefore reaches only the supervisor, never
Ray's processes (which would die abruptly and leave the proxies' ports open).

Shutdown: SIGTERM, SIGINT (Ctrl-C) or SIGHUP to the supervisor, or to its process group:

1. the supervisor forwards one SIGTERM to the driver;
2. the driver broadcasts the drain to every replica (`drain_app`): each engine refuses new
   requests (gRPC UNAVAILABLE, HTTP 503) and finishes the ones it accepted, gRPC streams
   included, for up to `graceful_shutdown_timeout_s` (default
   `DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S`; `--graceful-shutdown-timeout` or the config's
   `deployment:`), then fails what is left with UNAVAILABLE;
3. the driver shuts Serve and Ray down (`stop_local`) and exits;
4. the supervisor removes whatever is left of the driver's session (SIGTERM, then SIGKILL,
   bounded) and exits with the driver's status. If the driver is not gone
   `graceful_shutdown_timeout_s + SHUTDOWN_MARGIN_S` after the signal, or on a second signal,
   the supervisor SIGKILLs the whole session at once.

If the supervisor is killed outright (SIGKILL), the driver gets SIGTERM (Linux
`PR_SET_PDEATHSIG`) and drains the same way. Under systemd use `KillMode=mixed` (SIGTERM to
the main process only) and a `TimeoutStopSec` above `graceful_shutdown_timeout_s` + 30 s.

A replica that fails at start: the driver prints the error Serve reports (the replica's
traceback ends with it) and keeps Ray's session directory, whose path it prints (replica
logs in `logs/serve/`, worker stderr in `logs/worker-*.err`); exit status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runtime.serve_config import app_args, graceful_shutdown_timeout

# After the drain bound: time for Serve and Ray to shut down before the supervisor SIGKILLs the
# driver's session (a normal shutdown takes 2-6 s on 2 cores).
SHUTDOWN_MARGIN_S = 30.0


_DRIVER_CODE = "import sys; from runtime.serve_driver import driver_main; sys.exit(driver_main())"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_REAP_WAIT_S = 5.0  # per step (SIGTERM, then SIGKILL) when clearing the driver's session


def main(args: Any) -> int:
    """`leanserve serve`: run the driver in its own session until a stop signal, then drain.

    Returns the driver's exit status (0 after a graceful stop, 1 if the app failed to start,
    2 for a user error such as a broken model directory; 128 + N if signal N killed it).
    """
    drain_s = graceful_shutdown_timeout(app_args(args))  # a bad --config fails here, at once
    payload = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    payload["_parent_pid"] = os.getpid()
    # The arguments go through a pipe, not argv or the environment (the API key is among them).
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER_CODE], stdin=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdin is not None
    with proc.stdin:
        proc.stdin.write(json.dumps(payload).encode())
    supervisor = _Supervisor(proc.pid, drain_s)
    previous = {sig: signal.signal(sig, supervisor.on_signal) for sig in STOP_SIGNALS}
    try:
        supervisor.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _clear_session(proc.pid)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc


class _Supervisor:
    """Forwards the first stop signal to the driver as SIGTERM; kills the driver's session on a
    second one or when the drain bound plus `SHUTDOWN_MARGIN_S` has passed."""

    def __init__(self, pid: int, drain_s: float) -> None:
        self.pid = pid
        self.drain_s = drain_s
        self.deadline: float | None = None
        self.killed_at: float | None = None

    def on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.deadline is None:
            self.deadline = time.monotonic() + self.drain_s + SHUTDOWN_MARGIN_S
            print(
                f"leanserve serve: {name}: draining (in-flight requests get up to {self.drain_s:g} s; "
                "signal again to stop at once) ...",
                file=sys.stderr,
                flush=True,
            )
            _signal(self.pid, signal.SIGTERM)
        else:
            print(f"leanserve serve: {name} again: stopping at once", file=sys.stderr, flush=True)
            self.kill()

    def kill(self) -> None:
        if self.killed_at is None:
            self.killed_at = time.monotonic()
            _signal(self.pid, signal.SIGKILL)
            _signal_session(self.pid, signal.SIGKILL)

    def wait(self) -> None:
        """Until the driver has exited (left unreaped, so its process group id stays reserved)."""
        while os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            now = time.monotonic()
            if self.deadline is not None and now > self.deadline and self.killed_at is None:
                print(
                    f"leanserve serve: not stopped {self.drain_s + SHUTDOWN_MARGIN_S:g} s after the signal; "
                    "killing it",
                    file=sys.stderr,
                    flush=True,
                )
                self.kill()
            if self.killed_at is not None and now > self.killed_at + _REAP_WAIT_S:
                return  # SIGKILL cannot be ignored; a process stuck in the kernel is not ours to wait for
            time.sleep(0.1)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _signal_session(sid: int, sig: int) -> int:
    """Send `sig` to every live process of session `sid` but its leader (Ray's workers each lead
    a process group of their own, so a process-group signal would miss them); returns how many."""
    left = [pid for pid in session_members(sid) if pid != sid]
    for pid in left:
        _signal(pid, sig)
    return len(left)


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`, from /proc (empty where there is no /proc)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def _clear_session(sid: int) -> None:
    """SIGTERM, then SIGKILL, whatever is left of the driver's session (bounded waits). The
    driver leads the session and is not reaped yet, so the session id cannot have been reused."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = _signal_session(sid, sig)
        if not left:
            return
        print(f"leanserve serve: {sig.name} to {left} leftover Ray process(es)", file=sys.stderr, flush=True)
        end = time.monotonic() + _REAP_WAIT_S
        while time.monotonic() < end and any(pid != sid for pid in session_members(sid)):
            time.sleep(0.1)
