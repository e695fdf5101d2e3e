"""A local, in-process Ray with Serve's gRPC and HTTP proxies: its environment, start, drain and stop.

Used by `leanserve serve`'s driver (runtime/serve_driver.py), `leanserve bench serve` and the
integration tests. Local runs bind to 127.0.0.1 and need no Ray token: `set_local_env` sets the
environment before Ray is imported (RAY_AUTH_MODE=disabled; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
which makes Ray use 127.0.0.1 instead of the route IP), plus Serve's latency and gRPC message
settings below. Note that Ray's gRPC proxy itself listens on all interfaces of its port; firewall
it if that matters. Importing this module imports the standard library only.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
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
    quiet_serve_logs()
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
    """Shut Serve and Ray down (idempotent; the app should have been drained, see `drain_app`).

    On the local cluster `start_local` started, `ray.shutdown` ends every Ray process (raylet
    first, which stops its workers: controller, proxies, replicas) and waits, bounded, for them.
    `serve.shutdown` is skipped there: its controller kills itself while this driver's calls to
    it (`graceful_shutdown`, the handles' `listen_for_change`) are pending, and Ray prints a
    "Task ServeController... failed ... killed by `ray.kill`" error line for each. On a cluster
    this process merely joined, `serve.shutdown` removes Serve from it first.
    """
    import ray
    from ray import serve
    from ray.serve import context

    if not ray.is_initialized():
        return
    node = ray._private.worker._global_node
    owned = node is not None and node.is_head()
    try:
        if not owned:
            serve.shutdown()
    finally:
        ray.shutdown(wait_for_processes=owned)
        context._set_global_client(None)  # serve.shutdown's own last step: forget the controller


# Serve's INFO lines that are false or noise for `start_local` + `deploy`: deploy's serve.run finds
# the instance start_local started a moment earlier (whose options were applied), and the drain's
# handle announces its router.
_NOISE_PREFIXES = (
    "Connecting to existing Serve app in namespace",
    "Started <ray.serve._private.router.SharedRouterLongPollClient",
)


class _ServeNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and record.getMessage().startswith(_NOISE_PREFIXES))


def quiet_serve_logs() -> None:
    """Drop `_NOISE_PREFIXES` from this process's `ray.serve` log (idempotent)."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, _ServeNoiseFilter) for f in serve_logger.filters):
        serve_logger.addFilter(_ServeNoiseFilter())


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
