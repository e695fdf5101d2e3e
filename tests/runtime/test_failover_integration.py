"""Integration: replica crashes under load, and a bounded fuzz run, against a real Ray Serve.

One in-process Ray (module scope, always shut down) serves the tiny trained model
(`tiny_model_dir`) at two replicas. The kill tests find a replica's worker process
through Ray's GCS actor table (`loadtest.fuzz_soak.replica_pids`, which only returns
processes started under this test process) and `kill -9` it while clients keep
requests in flight:

* in-flight requests on the killed replica end with UNAVAILABLE (gRPC) / 503 (HTTP)
  or succeed, never INTERNAL / 500;
* the client's gRPC retry policy (runtime/client.py) turns a unary call cut off by
  the crash into a success on the other replica;
* requests on the other replica are unaffected, and requests sent after the
  kill succeed;
* time to recovery is measured and printed (`-s` shows it): until the first
  request sent after the kill succeeds, and until Serve runs a replacement.

The same is then measured with a single replica, and the module ends with a
bounded fuzz run (a few hundred hostile gRPC and HTTP requests, `loadtest.fuzz`)
and a short soak, which must find no BAD response and no engine death.

Every load loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from loadtest.fuzz_run import generate_cases, run_fuzz, summary_table
from loadtest.fuzz_soak import replica_pids, run_soak, soak_summary
from loadtest.fuzz_transport import Sender
from runtime.client import Client, build_request
from tests.helpers import local_serve

pytestmark = pytest.mark.integration

APP, DEPLOYMENT = "leanserve", "LeanServer"
MAX_TOKENS = 40  # prompt (2-3 tokens) + 40 fits the tiny model's 64-token context
LOAD_BOUND_S = 150.0  # no load loop runs longer than this
RECOVERY_BOUND_S = 120.0


def _args(model_dir: Path, replicas: int) -> dict[str, Any]:
    return {
        "model_dir": str(model_dir),
        "threads": 1,
        "engine": {"max_batch_size": 8, "max_waiting": 32},
        "deployment": {
            "num_replicas": replicas,
            "max_ongoing_requests": 40,
            "health_check_period_s": 1,
            "health_check_timeout_s": 10,
            "graceful_shutdown_timeout_s": 2,
        },
    }


def _replica_states() -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or DEPLOYMENT not in app.deployments:
        return {}
    return {str(k): v for k, v in app.deployments[DEPLOYMENT].replica_states.items()}


def _wait_replicas(n: int, timeout_s: float, exclude_pid: int | None = None) -> dict[str, int]:
    """Wait (bounded) until exactly `n` replicas run (and `exclude_pid` is not one of them)."""
    end, pids = time.monotonic() + timeout_s, {}
    while time.monotonic() < end:
        pids = replica_pids()
        states = _replica_states()
        if (
            len(pids) == n
            and states.get("RUNNING") == n
            and sum(states.values()) == n
            and exclude_pid not in pids.values()
        ):
            return pids
        time.sleep(0.25)
    raise AssertionError(f"not {n} running replicas after {timeout_s:.0f} s: {_replica_states()} pids={pids}")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, free_port) -> Iterator[dict[str, Any]]:
    """Ray + Serve with the app at two replicas, once for this module; always shut down."""
    from runtime.serve_app import deploy

    with local_serve(free_port, _args(tiny_model_dir, 2), "lsfo", num_cpus=4, timeout_s=300) as ports:
        _wait_replicas(2, 60)
        yield {
            **ports,
            "target": f"127.0.0.1:{ports['grpc']}",
            "url": f"http://127.0.0.1:{ports['http']}",
            "scale": lambda n: (deploy(_args(tiny_model_dir, n), timeout_s=300), _wait_replicas(n, 120))[1],
        }


# --- load with a record of every request --------------------------------------------------------


@dataclass
class Record:
    """One request: which client kind, when it ran, how it ended."""

    kind: str  # "unary" (retries on), "stream" (no retries), "http" (non-streaming)
    start: float
    end: float
    code: str
    detail: str = ""

    def in_flight_at(self, t: float) -> bool:
        return self.start < t < self.end


def _unary(target: str) -> Callable[[], tuple[str, str]]:
    client = Client(target)  # the retry policy of runtime/client.py

    def call() -> tuple[str, str]:
        req = build_request(client.pb2, "God said", max_tokens=MAX_TOKENS, steps=4)
        try:
            resp = client.generate(req, timeout=30)
            return ("OK", "") if resp.usage.completion_tokens > 0 else ("EMPTY", "")
        except grpc.RpcError as e:
            return e.code().name, e.details() or ""

    call.close = client.close  # type: ignore[attr-defined]
    return call


def _stream(target: str) -> Callable[[], tuple[str, str]]:
    client = Client(target, retries=False)  # see every stream failure as it is

    def call() -> tuple[str, str]:
        req = build_request(client.pb2, "God said", max_tokens=MAX_TOKENS, steps=4)
        try:
            deltas = list(client.stream(req, timeout=30))
            return ("OK", "") if deltas and deltas[-1].finish_reason != 0 else ("TRUNCATED", "")
        except grpc.RpcError as e:
            return e.code().name, e.details() or ""

    call.close = client.close  # type: ignore[attr-defined]
    return call


def _http(url: str) -> Callable[[], tuple[str, str]]:
    body = json.dumps({"prompt": "God said", "max_tokens": MAX_TOKENS, "steps": 4}).encode()

    def call() -> tuple[str, str]:
        req = urllib.request.Request(
            f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                r.read()
                return "OK", ""
        except urllib.error.HTTPError as e:
            return f"HTTP_{e.code}", e.read()[:300].decode("utf-8", "replace")
        except OSError as e:
            return "HTTP_NO_RESPONSE", str(e)

    call.close = lambda: None  # type: ignore[attr-defined]
    return call


class Load:
    """Closed-loop workers, each sending its next request when the last one ends (bounded)."""

    def __init__(self, workers: dict[str, list[Callable[[], tuple[str, str]]]], max_per_worker: int = 2000):
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.threads = [
            threading.Thread(target=self._loop, args=(kind, call, max_per_worker), daemon=True)
            for kind, calls in workers.items()
            for call in calls
        ]
        self.calls = [call for calls in workers.values() for call in calls]

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _loop(self, kind: str, call: Callable[[], tuple[str, str]], max_requests: int) -> None:
        for _ in range(max_requests):
            if self.stop.is_set() or self.now() > LOAD_BOUND_S:
                return
            start = self.now()
            code, detail = call()
            with self.lock:
                self.records.append(Record(kind, start, self.now(), code, detail))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        for call in self.calls:
            call.close()  # type: ignore[attr-defined]

    def ok_since(self, t: float) -> int:
        with self.lock:
            return sum(r.code == "OK" and r.start >= t for r in self.records)

    def wait_ok(self, n: int, since: float, timeout_s: float) -> float | None:
        """Time (run clock) when `n` requests started after `since` had succeeded; None on timeout."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self.lock:
                done = sorted(r.end for r in self.records if r.code == "OK" and r.start >= since)
            if len(done) >= n:
                return done[n - 1]
            time.sleep(0.05)
        return None


ALLOWED_FAILURES = {"UNAVAILABLE", "HTTP_503"}


def _kill(pid: int) -> None:
    """SIGKILL a replica worker; `replica_pids` only returns processes started under this test."""
    os.kill(pid, signal.SIGKILL)


def _ongoing(actor_id: str) -> int:
    """Requests the replica actor is working on now (Ray's own count)."""
    import ray
    from ray._private import state

    handle = ray.get_actor(state.actors(actor_id)["Name"], namespace="serve")
    return int(ray.get(handle.get_num_ongoing_requests.remote(), timeout=10))


def _report(title: str, load: Load, t_kill: float, t_first_ok: float | None, t_replaced: float | None) -> str:
    by_kind: dict[str, dict[str, int]] = {}
    for r in load.records:
        by_kind.setdefault(r.kind, {}).setdefault(r.code, 0)
        by_kind[r.kind][r.code] += 1
    in_flight = [r for r in load.records if r.in_flight_at(t_kill)]
    lines = [
        f"{title}: {len(load.records)} requests {by_kind}",
        f"  in flight at the kill: {len(in_flight)}, of which failed: "
        f"{[(r.kind, r.code) for r in in_flight if r.code != 'OK']}",
        f"  time to recovery: first success of a request sent after the kill "
        f"{'n/a' if t_first_ok is None else f'{t_first_ok - t_kill:.2f} s'}; replacement replica running "
        f"{'n/a' if t_replaced is None else f'{t_replaced - t_kill:.2f} s'} after the kill",
    ]
    return "\n".join(lines)


def _assert_no_internal(records: list[Record]) -> None:
    bad = [r for r in records if r.code not in ("OK", *ALLOWED_FAILURES)]
    assert not bad, (
        f"failures other than UNAVAILABLE/503: {[(r.kind, r.code, r.detail[:200]) for r in bad][:10]}"
    )


def test_kill_one_of_two_replicas_under_load(cluster) -> None:
    pids = _wait_replicas(2, RECOVERY_BOUND_S)
    workers = {
        "unary": [_unary(cluster["target"]) for _ in range(4)],
        "stream": [_stream(cluster["target"]) for _ in range(4)],
        "http": [_http(cluster["url"]) for _ in range(2)],
    }
    with Load(workers) as load:
        assert load.wait_ok(20, 0.0, 60) is not None, "no steady load before the kill"
        victim_id, victim = sorted(pids.items())[0]
        held, end = 0, time.monotonic() + 10
        while held < 2 and time.monotonic() < end:  # kill it while it is busy (bounded)
            held = _ongoing(victim_id)
        t_kill = load.now()
        _kill(victim)
        t_first_ok = load.wait_ok(1, t_kill + 1e-3, 30)
        _wait_replicas(2, RECOVERY_BOUND_S, exclude_pid=victim)
        t_replaced = load.now()
        assert load.wait_ok(20, t_replaced, 60) is not None, "no steady load after the replacement"
    print("\n" + _report("kill 1 of 2 replicas", load, t_kill, t_first_ok, t_replaced))
    print(f"  the killed replica held {held} requests just before the kill")

    records = load.records
    _assert_no_internal(records)
    in_flight = [r for r in records if r.in_flight_at(t_kill)]
    assert in_flight and held >= 1, f"nothing was in flight at the kill (the victim held {held})"
    # The retry policy hides the crash from unary calls: they end on the other replica.
    assert all(r.code == "OK" for r in records if r.kind == "unary"), [
        (r.code, r.detail) for r in records if r.kind == "unary" and r.code != "OK"
    ]
    # Only the killed replica's requests failed: no more than it held (plus the few that can start
    # between reading its count and the kill), and in-flight requests survived on the other one.
    failed = [r for r in in_flight if r.code != "OK"]
    assert len(failed) <= held + 2, f"{len(failed)} in-flight requests failed; the killed replica held {held}"
    assert len(failed) < len(in_flight), "every in-flight request failed, not only the killed replica's"
    # Requests sent after the kill (once the failed ones are out) all succeed.
    failures_end = max((r.end for r in records if r.code != "OK"), default=t_kill)
    later = [r for r in records if r.start > failures_end]
    assert later and all(r.code == "OK" for r in later)
    assert t_first_ok is not None and t_first_ok - t_kill < 10.0


def test_kill_the_only_replica_under_load(cluster) -> None:
    pids = cluster["scale"](1)
    workers = {
        "unary": [_unary(cluster["target"]) for _ in range(2)],
        "stream": [_stream(cluster["target"]) for _ in range(2)],
        "http": [_http(cluster["url"])],
    }
    try:
        with Load(workers) as load:
            assert load.wait_ok(10, 0.0, 60) is not None, "no steady load before the kill"
            (victim,) = pids.values()
            t_kill = load.now()
            _kill(victim)
            t_first_ok = load.wait_ok(1, t_kill + 1e-3, RECOVERY_BOUND_S)
            _wait_replicas(1, RECOVERY_BOUND_S, exclude_pid=victim)
            t_replaced = load.now()
            assert load.wait_ok(10, t_replaced, 60) is not None
        print("\n" + _report("kill the only replica", load, t_kill, t_first_ok, t_replaced))
        _assert_no_internal(load.records)
        assert t_first_ok is not None, f"no request succeeded within {RECOVERY_BOUND_S:.0f} s of the kill"
    finally:
        cluster["scale"](2)


def test_bounded_fuzz_run_finds_no_bad_response_and_no_engine_death(cluster, tmp_path) -> None:
    from runtime.proto_build import load_stubs

    _wait_replicas(2, RECOVERY_BOUND_S)
    pb2, _ = load_stubs()
    sender = Sender(cluster["target"], cluster["url"], timeout_s=30)
    try:
        cases = generate_cases(pb2, seed=0, n=300)
        report = run_fuzz(
            sender, pb2, cases, seed=0, time_limit_s=400, health_every=20, recovery_timeout_s=90
        )
    finally:
        sender.close()
    (tmp_path / "fuzz.json").write_text(json.dumps(report.to_json(), indent=1, default=str))
    print("\n" + summary_table(report))
    assert not report.stopped_early, report.stopped_early
    assert len(report.outcomes) == 300
    assert not report.deaths, [d.reason for d in report.deaths]
    assert not report.bad, [(o.code, o.label, o.detail[:200]) for o in report.bad]


def test_short_soak_keeps_serving_and_reads_replica_rss(cluster) -> None:
    from runtime.proto_build import load_stubs

    pids = _wait_replicas(2, RECOVERY_BOUND_S)
    pb2, _ = load_stubs()
    sender = Sender(cluster["target"], cluster["url"], timeout_s=30)
    try:
        soak = run_soak(sender, pb2, 200, seed=1, time_limit_s=200, pids=sorted(pids.values()), warmup=50)
    finally:
        sender.close()
    print("\n" + soak_summary(soak))
    assert soak.requests == 200 and soak.verdicts == {"OK": 200}, soak.failures[:5]
    assert soak.rss_before and soak.rss_after and soak.growth_pct is not None
