"""Kubernetes preStop hook of the Ray pods: drain this pod's Serve traffic, then stop Ray.

    python /home/ray/prestop.py [--settle S] [--wait S] [--head] [--stop-grace S]

1. Sleep `--settle` seconds: the removal of the terminating pod from its Services' endpoints
   reaches kube-proxy and load balancers, so new connections stop arriving here.
2. Workers: `ray drain-node` for this node (deadline `--wait`). Serve then stops the replicas
   on this node gracefully: each refuses new requests and finishes the ones it accepted, gRPC
   streams included, within `graceful_shutdown_timeout_s` (replacements start on other nodes);
   and it drains this node's proxy, whose open requests (to replicas anywhere) finish.
   The head cannot be drained; it keeps the GCS and the Serve controller up instead, which the
   workers' drains need when the whole cluster goes at once (a `NewCluster` upgrade).
3. Wait, at most `--wait` seconds, until no Serve replica or proxy runs in this pod (the head:
   until no replica runs here, then the rest of `--wait` for the workers).
4. `ray stop --grace-period S`.

Kubernetes allows `settle + wait + stop_grace` plus some slack: keep the pod's
`terminationGracePeriodSeconds` above it (tests/deploy checks the manifests). Needs only the
standard library and psutil (a Ray dependency).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

SERVE_PROCESSES = ("ray::ServeReplica", "ray::ProxyActor")  # Ray workers' process titles
REPLICA_PROCESSES = ("ray::ServeReplica",)
POLL_S = 1.0


def serve_processes(prefixes: Sequence[str] = SERVE_PROCESSES, root: int | None = None) -> list[int]:
    """Pids of this pod's processes whose title (argv[0]) starts with one of `prefixes`.

    Args:
        prefixes: process-title prefixes.
        root: only descendants of this pid (tests on a shared machine); None = every process
            of the pod.
    """
    import psutil

    procs = psutil.process_iter() if root is None else psutil.Process(root).children(recursive=True)
    found = []
    for proc in procs:
        try:
            cmdline = proc.cmdline()
        except psutil.Error:  # gone or not ours to read
            continue
        if cmdline and cmdline[0].startswith(tuple(prefixes)):
            found.append(proc.pid)
    return found


def wait_until_gone(
    prefixes: Sequence[str], timeout_s: float, listing: Callable[[Sequence[str]], list[int]] = serve_processes
) -> bool:
    """Poll until no process matches (True) or `timeout_s` passes (False)."""
    end = time.monotonic() + timeout_s
    while listing(prefixes):
        if time.monotonic() >= end:
            return False
        time.sleep(min(POLL_S, max(0.0, end - time.monotonic())))
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the hook; always ends with `ray stop` and exit 0 (a failing hook would not stop the pod
    sooner, it would only hide the reason in the kubelet's events)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settle", type=float, default=5.0, help="seconds for endpoint removal to propagate")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for Serve to drain this pod")
    p.add_argument("--stop-grace", type=int, default=10, help="`ray stop --grace-period`")
    p.add_argument("--head", action="store_true", help="the head pod: no drain-node; keep GCS up for --wait")
    p.add_argument(
        "--descendants-only", action="store_true", help="watch only this hook's own child processes (tests)"
    )
    args = p.parse_args(argv)
    root = os.getpid() if args.descendants_only else None

    def listing(prefixes: Sequence[str]) -> list[int]:
        return serve_processes(prefixes, root)

    def log(message: str) -> None:
        print(f"prestop: {message}", file=sys.stderr, flush=True)

    time.sleep(args.settle)
    t0 = time.monotonic()
    if args.head:
        wait_until_gone(REPLICA_PROCESSES, args.wait, listing)
        remaining = args.wait - (time.monotonic() - t0)
        log(f"head: GCS and Serve controller stay up {max(0.0, remaining):.0f} s more for the workers")
        time.sleep(max(0.0, remaining))
    else:
        drain = subprocess.run(
            [
                "ray", "drain-node", "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message", "Kubernetes is terminating this pod",
                "--deadline-remaining-seconds", str(int(args.wait)),
            ],
            check=False,
        )  # fmt: skip
        if drain.returncode != 0:
            log(f"ray drain-node failed (exit {drain.returncode}); waiting for Serve anyway")
        drained = wait_until_gone(SERVE_PROCESSES, args.wait, listing)
        log(f"{'drained' if drained else 'not drained'} after {time.monotonic() - t0:.0f} s")
    subprocess.run(["ray", "stop", "--grace-period", str(args.stop_grace)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
