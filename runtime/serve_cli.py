"""`leanserve serve`: a local, in-process Ray with Serve's gRPC and HTTP proxies, then the app.

Local runs bind to 127.0.0.1 and need no Ray token: the environment is set
before Ray is imported (RAY_AUTH_MODE=disabled; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
which makes Ray use 127.0.0.1 instead of the route IP). Note that Ray's gRPC
proxy itself listens on all interfaces of its port; firewall it if that matters.

Endpoints (defaults): gRPC 127.0.0.1:9000 (`leanserve.v1.TextGeneration`,
`grpc.health.v1.Health`, Ray's `ray.serve.RayServeAPIService/Healthz`), HTTP
http://127.0.0.1:8000 (`/v1/completions`, `/v1/models`, `/healthz`, `/stats`)
and Prometheus metrics at http://127.0.0.1:8080/metrics (Ray's exporter; the
leanserve series carry a `ray_` prefix there).

Processes: `leanserve serve` itself (`main`, the supervisor: standard library only) starts
the driver (`driver_main`: model-directory check, Ray, Serve, the app) as a child in a new
session, and every Ray process the driver starts is its descendant in that session. A signal
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

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Ray Serve request-path settings for a latency-bound app (the Docker images set the same):
# the replica runs the handlers on its main event loop (the engine's forwards run in a
# worker thread, so nothing blocks that loop), and the proxy routes on its own loop;
# each saves a cross-thread hand-off per request. `leanserve bench serve` measured
# unary transport 8.2 -> 7.4 ms, stream (1 tok/msg) overhead +48 % -> +43 % (two paired runs each).
# RAY_SERVE_PROXY_USE_GRPC=1: the proxies send requests to the replica's gRPC server (which
# every replica starts anyway, on a free port) instead of as Ray actor tasks; unary transport
# 7.0-7.7 -> 5.0-5.4 ms, stream (1 tok/msg) +84-92 % -> +58-63 % compiled (two paired runs).
# Ray marks this transport experimental; the integration tier passes with it (cancellation,
# deadlines, backpressure, health), and setting it to 0 in the environment restores actor calls.
SERVE_LATENCY_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}

# gRPC message bounds: the proxy accepts at most 4 MiB from a client (gRPC's usual default;
# larger messages get RESOURCE_EXHAUSTED from the proxy itself), and the proxy-to-replica hop,
# which wraps the message in Ray's metadata, takes twice that, so that any message the proxy
# accepted also passes it. Ray's defaults were 2 GiB at the proxy and 4 MiB on the hop: a 4 MB
# request came back INTERNAL with Ray's internal error text.
GRPC_MESSAGE_ENV = {
    "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(4 * 2**20),
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(8 * 2**20),
}

LOCAL_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    **SERVE_LATENCY_ENV,
    **GRPC_MESSAGE_ENV,
}


DEFAULT_GRPC_PORT = 9000
DEFAULT_HTTP_PORT = 8000

# How long in-flight requests may run after SIGTERM (Serve's graceful_shutdown_timeout_s, which
# runtime.serve_app.deployment_options defaults to this too; Ray's own default is the same 20 s).
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0
# After the drain bound: time for Serve and Ray to shut down before the supervisor SIGKILLs the
# driver's session (a normal shutdown takes 2-6 s on 2 cores).
SHUTDOWN_MARGIN_S = 30.0


def set_local_env() -> None:
    """Environment for a local, token-free, loopback Ray (call before importing ray; Ray's
    processes inherit it). Values already set in the environment win."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def start_local(
    grpc_port: int = 9000,
    http_port: int = 8000,
    metrics_port: int = 8080,
    num_cpus: int | None = None,
    host: str = "127.0.0.1",
    temp_dir: str | None = None,
    system_config: dict[str, Any] | None = None,
) -> None:
    """Start an in-process Ray and Serve with leanserve's gRPC servicers (no app yet).

    Args:
        grpc_port: Serve gRPC proxy port.
        http_port: Serve HTTP proxy port.
        metrics_port: Ray's Prometheus export port.
        num_cpus: CPUs Ray may schedule (None = all).
        host: HTTP proxy bind address.
        temp_dir: Ray's session directory (None = a fresh temp dir).
        system_config: Ray `_system_config` (e.g. a shorter `metrics_report_interval_ms`).
    """
    set_local_env()
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions
    from ray.serve.schema import LoggingConfig

    from runtime.proto_build import load_stubs
    from runtime.serve_app import GRPC_SERVICER_FUNCTIONS

    load_stubs()  # generate before the proxy actor imports them
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
        _temp_dir=temp_dir or tempfile.mkdtemp(prefix="leanserve-ray-"),
        _system_config=system_config,
        configure_logging=False,
    )
    serve.start(
        http_options=HTTPOptions(host=host, port=http_port),
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS),
        # Per-request access logs cost milliseconds each on small machines.
        logging_config=LoggingConfig(enable_access_log=False),
    )


def stop_local() -> None:
    """Shut Serve and Ray down (idempotent)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    with open(path, encoding="utf-8") as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: must hold a mapping of builder args or a Serve config")
    return loaded


def resolve_ports(args: Any) -> tuple[int, int]:
    """(gRPC, HTTP) ports: the flags, else a Serve config file's `grpc_options` /
    `http_options` ports, else 9000 / 8000. The bind address never comes from
    the file (its 0.0.0.0 is for a cluster); `--host` sets it."""
    loaded = _load_config(args.config)
    grpc = args.grpc_port or (loaded.get("grpc_options") or {}).get("port") or DEFAULT_GRPC_PORT
    http = args.http_port or (loaded.get("http_options") or {}).get("port") or DEFAULT_HTTP_PORT
    for name, port in (("grpc_options.port", grpc), ("http_options.port", http)):
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"{name}={port!r}: must be an integer port in [1, 65535]")
    return grpc, http


def parse_steps(text: str) -> list[int] | str:
    """`--compile-steps`: "all" or comma-separated step counts ("2,3,12").

    Raises:
        ValueError: anything else (names the flag and the accepted forms).
    """
    if text.strip() == "all":
        return "all"
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--compile-steps={text!r}: must be 'all' or comma-separated step counts such as 2,3,12"
        ) from None


def _app_args(args: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    loaded = _load_config(args.config)
    # Accept a Serve config file too: take the first application's args.
    if "applications" in loaded:
        loaded = (loaded["applications"] or [{}])[0].get("args", {}) or {}
    else:
        loaded = {k: v for k, v in loaded.items() if k not in ("grpc_options", "http_options")}
    cfg.update(loaded)
    if args.model_dir:
        cfg["model_dir"] = args.model_dir
    if args.threads:
        cfg["threads"] = args.threads
    if args.compile:
        cfg["compile"] = True
    if args.compile_steps:
        cfg["compile_steps"] = parse_steps(args.compile_steps)
    engine = dict(cfg.pop("engine", None) or {})
    engine_flags = (
        "max_batch_size",
        "max_waiting",
        "kv_cache_bytes",
        "default_steps",
        "slo_target_itl_ms",
        "inline_decode_ms",
    )
    for flag in engine_flags:
        if getattr(args, flag) is not None:
            engine[flag] = getattr(args, flag)
    cfg["engine"] = engine
    deployment = dict(cfg.pop("deployment", None) or {})
    if args.replicas:
        deployment["num_replicas"] = args.replicas
    if getattr(args, "graceful_shutdown_timeout", None) is not None:
        deployment["graceful_shutdown_timeout_s"] = args.graceful_shutdown_timeout
    if deployment:
        cfg["deployment"] = deployment
    # No --api-key: the replica falls back to $LEANSERVE_API_KEY, which it inherits from this
    # process (the driver starts Ray's raylet, whose workers the replicas are).
    if getattr(args, "api_key", None):
        cfg["api_key"] = args.api_key
    return cfg


def graceful_shutdown_timeout(cfg: dict[str, Any]) -> float:
    """The drain bound of the app args `cfg` (`deployment.graceful_shutdown_timeout_s`, else
    `DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S`).

    Raises:
        ValueError: not a number >= 0 (names the field).
    """
    value = (cfg.get("deployment") or {}).get(
        "graceful_shutdown_timeout_s", DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"graceful_shutdown_timeout_s={value!r}: must be a number of seconds >= 0")
    return float(value)


# --- the supervisor: `leanserve serve` ------------------------------------------------------------
_DRIVER_CODE = "import sys; from runtime.serve_cli import driver_main; sys.exit(driver_main())"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_REAP_WAIT_S = 5.0  # per step (SIGTERM, then SIGKILL) when clearing the driver's session


def main(args: Any) -> int:
    """`leanserve serve`: run the driver in its own session until a stop signal, then drain.

    Returns the driver's exit status (0 after a graceful stop, 1 if the app failed to start,
    2 for a user error such as a broken model directory; 128 + N if signal N killed it).
    """
    drain_s = graceful_shutdown_timeout(_app_args(args))  # a bad --config fails here, at once
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
    previous = {sig: signal.signal(sig, supervisor.on_signal) for sig in _STOP_SIGNALS}
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


# --- the driver -----------------------------------------------------------------------------------
def driver_main() -> int:
    """Entry of the driver process that `main` starts: arguments as JSON on stdin."""
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
    from runtime.local import resolve_model_dir

    cfg = _app_args(args)
    model_dir = resolve_model_dir(cfg.get("model_dir"))
    # Before importing Ray or the app (seconds): a broken directory fails here, the file named.
    from models.checkpoint import check_model_dir

    check_model_dir(model_dir, require_onnx=cfg.get("backend") == "onnx")
    from runtime.serve_app import APP_NAME, ServeArgs, deploy

    ServeArgs.from_dict(cfg)  # bad config fails here, before Ray starts
    grpc_port, http_port = resolve_ports(args)
    drain_s = graceful_shutdown_timeout(cfg)
    flag = _StopFlag()
    for sig in _STOP_SIGNALS:
        signal.signal(sig, flag.handler)
    print(f"leanserve serve: starting Ray and deploying {model_dir} ...", file=sys.stderr, flush=True)
    temp_dir = tempfile.mkdtemp(prefix="leanserve-ray-")
    keep_logs = False
    try:
        start_local(grpc_port, http_port, args.metrics_port, args.num_cpus, args.host, temp_dir=temp_dir)
        # Again after ray.init, whose core worker registers a SIGTERM handler that aborts the
        # process (and leaves Ray's agents running) instead of shutting down.
        for sig in _STOP_SIGNALS:
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
            f"  HTTP     http://{args.host}:{http_port}/v1/completions  /v1/models  /healthz\n"
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


def drain_app(name: str, timeout_s: float) -> bool:
    """Drain every replica of app `name` at once: each refuses new requests (UNAVAILABLE / 503)
    and finishes the ones it accepted, for up to `timeout_s`, then fails the rest.

    This is the replica's shutdown method (`LeanServer.__del__`, idempotent) called through
    Serve's `broadcast`, while the routes still exist: deleting the app first would answer new
    calls with NOT_FOUND / 404, and `serve.shutdown` alone stops the proxies, cutting open streams.

    Returns:
        False if it did not complete (logged; the shutdown goes on).
    """
    from ray import serve

    try:
        handle = serve.get_app_handle(name)
        # The driver has no running event loop, so the handle's router needs its own loop,
        # whatever RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP says: LOCAL_ENV sets it to 0 for the
        # replicas, and a driver started with it already 0 in its environment (exported by a
        # shell, or inherited from a process that ran start_local) otherwise fails here at once
        # and cuts every stream.
        handle._init(_run_router_in_separate_loop=True)
        handle.broadcast("__del__").results(timeout_s=timeout_s + 10.0)
    except Exception as e:  # noqa: BLE001 - a replica died meanwhile, a timeout: shut down anyway
        print(f"leanserve serve: drain incomplete ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return False
    return True


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
