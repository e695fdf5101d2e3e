"""The driver process of `leanserve serve`: model-directory check, Ray, Serve, the app, the drain.

`runtime/serve_cli.py`'s supervisor starts it (`driver_main`, arguments as JSON on stdin) in a
session of its own; `run` checks the model directory, starts the local Ray and Serve
(runtime/serve_local.py), deploys the app, serves until SIGTERM, drains and shuts down. A replica
that fails at start: `failure_report` prints the error Serve reports and where the kept logs are.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from runtime.serve_cli import STOP_SIGNALS
from runtime.serve_config import app_args, graceful_shutdown_timeout, resolve_ports, resolve_serve_model_dir
from runtime.serve_local import drain_app, start_local, stop_local


def driver_main() -> int:
    """Entry of the driver process that the supervisor (`runtime.serve_cli.main`) starts: arguments
    as JSON on stdin."""
    payload = json.loads(sys.stdin.read())
    _die_with_parent(payload.pop("_parent_pid"))
    args = argparse.Namespace(**payload)
    from runtime.cli import run_command

    return run_command("serve", run, args)


def _die_with_parent(parent_pid: int) -> None:
    """SIGTERM (a graceful drain) to this process when the supervisor dies (Linux only)."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class _Stopped(BaseException):
    """A stop signal arrived before the app was serving (BaseException: Ray's code must not catch it)."""


class _StopFlag:
    """Signal handler state: before the app serves, a stop signal aborts the start-up; afterwards
    it sets the flag that the main loop waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.serving = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            return
        self.event.set()
        if not self.serving:
            raise _Stopped()


def run(args: Any) -> int:
    """The driver: check the model directory, start Ray and Serve, deploy, serve until SIGTERM
    (or Ctrl-C when run directly), drain, stop Serve and Ray."""
    cfg = app_args(args)
    model_dir = resolve_serve_model_dir(args, cfg)
    cfg["model_dir"] = str(model_dir.resolve())  # the replicas need not share this cwd
    # Before importing Ray or the app (seconds): a broken directory fails here, the file named.
    from models.checkpoint import PROFILE_FILE, check_model_dir

    check_model_dir(model_dir, require_onnx=cfg.get("backend") == "onnx")
    if not (model_dir / PROFILE_FILE).is_file():
        print(no_profile_warning(model_dir), file=sys.stderr, flush=True)
    from runtime.serve_app import APP_NAME, ServeArgs, deploy

    ServeArgs.from_dict(cfg)  # bad config fails here, before Ray starts
    grpc_port, http_port = resolve_ports(args)
    drain_s = graceful_shutdown_timeout(cfg)
    flag = _StopFlag()
    for sig in STOP_SIGNALS:
        signal.signal(sig, flag.handler)
    print(f"leanserve serve: starting Ray and deploying {model_dir} ...", file=sys.stderr, flush=True)
    temp_dir = tempfile.mkdtemp(prefix="leanserve-ray-")
    keep_logs = False
    try:
        start_local(grpc_port, http_port, args.metrics_port, args.num_cpus, args.host, temp_dir=temp_dir)
        # Again after ray.init, whose core worker registers a SIGTERM handler that aborts the
        # process (and leaves Ray's agents running) instead of shutting down.
        for sig in STOP_SIGNALS:
            signal.signal(sig, flag.handler)
        try:
            deploy(cfg, timeout_s=args.startup_timeout)
        except (RuntimeError, TimeoutError) as e:
            keep_logs = True
            print(
                failure_report(e, _deployment_messages(APP_NAME), Path(temp_dir)), file=sys.stderr, flush=True
            )
            return 1
        flag.serving = True
        if flag.event.is_set():  # a signal between deploy() returning and the line above
            raise _Stopped()
        print(
            f"leanserve serve: ready\n"
            f"  gRPC     127.0.0.1:{grpc_port}  (leanserve.v1.TextGeneration, grpc.health.v1.Health)\n"
            f"  HTTP     http://{args.host}:{http_port}/v1/completions  /v1/chat/completions  /v1/models"
            "  /healthz\n"
            f"  metrics  http://127.0.0.1:{args.metrics_port}/metrics  (names prefixed ray_leanserve_)\n"
            f"  try      leanserve generate 'Hello' --server 127.0.0.1:{grpc_port} --stream\n"
            f"Ctrl-C to stop (in-flight requests get up to {drain_s:g} s).",
            flush=True,
        )
        try:
            while not flag.event.wait(0.5):
                pass
        except KeyboardInterrupt:  # run in-process (not via the supervisor): Ctrl-C
            pass
        t0 = time.monotonic()
        print(f"leanserve serve: draining (up to {drain_s:g} s) ...", file=sys.stderr, flush=True)
        drain_app(APP_NAME, drain_s)
        print(
            f"leanserve serve: drained in {time.monotonic() - t0:.1f} s; shutting down ...",
            file=sys.stderr,
            flush=True,
        )
    except _Stopped:
        print("leanserve serve: stopped during start-up; shutting down ...", file=sys.stderr, flush=True)
    finally:
        stop_local()
        if not keep_logs:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


def no_profile_warning(model_dir: Path) -> str:
    """What `leanserve serve` prints for a model directory without profile.json."""
    return (
        f"leanserve serve: warning: {model_dir} has no profile.json, so it is uncalibrated: the quality "
        "tiers are fractions of the step range, not measured, and latency_budget_ms runs the default "
        "step count (policy_reason 'latency_budget:uncalibrated'); measure it with "
        f"`leanserve eval {model_dir}` (`leanserve train` does, unless --no-profile)"
    )


def _deployment_messages(app_name: str) -> dict[str, str]:
    """Serve's status message of each deployment of the app (empty if Serve cannot say)."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - reporting a failure must not fail
        return {}
    if app is None:
        return {}
    messages = {name: d.message for name, d in app.deployments.items() if d.message}
    if app.message and not messages:
        messages[app_name] = app.message
    return messages


def failure_report(error: BaseException, messages: dict[str, str], session_dir: Path, tail: int = 12) -> str:
    """What `leanserve serve` prints when the app does not start: the error, the last `tail`
    lines of each deployment's status message (Serve puts the replica's traceback there,
    ending with the exception), the newest replica log's tail if Serve said nothing, and
    where the logs are kept."""
    lines = [f"leanserve serve: the application did not start: {error}"]
    for name, message in messages.items():
        body = [line for line in message.splitlines() if line.strip()]
        lines.append(f"{name}: " + (body[0] if body else ""))
        if len(body) > 1:
            if len(body) > tail + 1:
                lines.append("  ...")
            lines += ["  " + line for line in body[1:][-tail:]]
    logs = session_dir / "session_latest" / "logs"
    replica_logs = sorted((logs / "serve").glob("replica_*.log"), key=lambda p: p.stat().st_mtime)
    if not messages and replica_logs:
        newest = replica_logs[-1]
        lines.append(f"last lines of {newest}:")
        lines += ["  " + line for line in newest.read_text(errors="replace").splitlines()[-tail:]]
    lines.append(
        f"leanserve serve: logs kept in {logs} (replicas: serve/replica_*.log, controller: "
        f"serve/controller_*.log, worker stderr: worker-*.err)"
    )
    return "\n".join(lines)
