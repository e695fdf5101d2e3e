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

Ctrl-C / SIGTERM: the app is deleted (replicas drain their engines, bounded),
Serve and Ray are shut down.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
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

LOCAL_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    **SERVE_LATENCY_ENV,
}


DEFAULT_GRPC_PORT = 9000
DEFAULT_HTTP_PORT = 8000


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
    if args.replicas:
        cfg.setdefault("deployment", {})["num_replicas"] = args.replicas
    return cfg


def main(args: Any) -> int:
    """Run `leanserve serve` until Ctrl-C or SIGTERM."""
    from runtime.local import resolve_model_dir
    from runtime.serve_app import ServeArgs, deploy

    cfg = _app_args(args)
    parsed = ServeArgs.from_dict(cfg)  # bad config fails here, before Ray starts
    args.grpc_port, args.http_port = resolve_ports(args)
    model_dir = resolve_model_dir(parsed.model_dir)
    stop = threading.Event()
    print(f"leanserve serve: starting Ray and deploying {model_dir} ...", file=sys.stderr)
    temp_dir = tempfile.mkdtemp(prefix="leanserve-ray-")
    start_local(
        args.grpc_port, args.http_port, args.metrics_port, args.num_cpus, args.host, temp_dir=temp_dir
    )
    # SIGTERM (Kubernetes, systemd) gets the same clean shutdown as Ctrl-C. Installed after
    # ray.init, whose core worker registers a SIGTERM handler that aborts the process (and
    # leaves Ray's agents running) instead of shutting down.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        deploy(cfg, timeout_s=args.startup_timeout)
        print(
            f"leanserve serve: ready\n"
            f"  gRPC     127.0.0.1:{args.grpc_port}  (leanserve.v1.TextGeneration, grpc.health.v1.Health)\n"
            f"  HTTP     http://{args.host}:{args.http_port}/v1/completions  /v1/models  /healthz\n"
            f"  metrics  http://127.0.0.1:{args.metrics_port}/metrics  (names prefixed ray_leanserve_)\n"
            f"  try      leanserve generate 'Hello' --server 127.0.0.1:{args.grpc_port} --stream\n"
            f"Ctrl-C to stop.",
            flush=True,
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        print("leanserve serve: shutting down ...", file=sys.stderr)
    finally:
        stop_local()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return 0
