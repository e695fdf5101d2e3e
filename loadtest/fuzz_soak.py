"""Soak mode: valid, mixed requests (`soak_requests`) and the replica's resident memory before
and after (`run_soak`, `soak_summary`), read from /proc for given pids, else from `/stats`'
`rss_bytes`, else from the replica actors' pids in Ray's GCS actor table (`replica_pids`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loadtest.fuzz_case import COMPLETIONS, JSON_HEADERS, MB, OK, Case
from loadtest.fuzz_transport import Sender

REPLICA_CLASS = "ServeReplica:leanserve:LeanServer"  # Ray's actor class name of the replicas


def read_rss_bytes(pid: int) -> int | None:
    """VmRSS of a local process from /proc (None if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _is_descendant(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` is `pid` or one of its parents (via /proc/PID/stat)."""
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)" and the state
    return False


def replica_pids(class_name: str = REPLICA_CLASS) -> dict[str, int]:
    """actor id -> pid of the ALIVE replica actors of the Ray cluster this process drives.

    Reads Ray's GCS actor table (`ray._private.state.actors`), which works
    without a dashboard; `ray.util.state.list_actors` would ask the dashboard
    at its default address, which on a shared machine can belong to someone
    else's cluster. Only processes started under this process (the Ray driver
    that started the cluster) are returned, so a pid from the table can never
    be another user's process.

    Raises:
        RuntimeError: Ray is not initialised in this process.
    """
    import ray
    from ray._private import state

    if not ray.is_initialized():
        raise RuntimeError("replica_pids needs the Ray driver of the cluster (ray.init in this process)")
    me = os.getpid()
    out = {}
    for actor_id, info in state.actors().items():
        pid = int(info.get("Pid") or 0)
        alive = info.get("ActorClassName") == class_name and info.get("State") == "ALIVE"
        if alive and pid and _is_descendant(pid, me):
            out[actor_id] = pid
    return out


def soak_requests(pb2: Any, rng: random.Random, n: int, grpc_on: bool, http_on: bool) -> Iterator[Case]:
    """`n` valid, mixed requests (unary, stream, HTTP; steps, sampling, stops vary)."""
    prompts = ["God said", "In the beginning", "The earth was", "Darkness was on the surface of the deep"]
    for i in range(n):
        prompt = rng.choice(prompts)
        max_tokens = rng.choice((1, 4, 8, 16, 24))
        temperature = rng.choice((0.0, 0.7, 1.0))
        steps = rng.choice((None, 2, 3, 4))
        stop = rng.choice(([], ["."], ["the", "and"]))
        use_http = http_on and (not grpc_on or rng.random() < 0.4)
        if use_http:
            body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
            if steps is not None:
                body["steps"] = steps
            if stop:
                body["stop"] = stop
            if rng.random() < 0.4:
                body["stream"] = True
            yield Case(i, "http", "soak", json.dumps(body).encode(), "POST", COMPLETIONS, dict(JSON_HEADERS))
        else:
            sampling = pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop)
            if temperature:
                sampling.top_p = rng.choice((1.0, 0.9))
                sampling.seed = rng.randrange(2**32)
            msg = pb2.GenerateRequest(prompt=prompt, sampling=sampling)
            if steps is not None:
                msg.compute.steps = steps
            method = "GenerateStream" if rng.random() < 0.5 else "Generate"
            yield Case(i, "grpc", "soak", msg.SerializeToString(), method)


def stats_rss(sender: Sender) -> int | None:
    """The `rss_bytes` field of `/stats`, if the server reports one."""
    if sender.http is None:
        return None
    status, body, _ = sender.send_http(Case(0, "http", "stats", b"", "GET", "/stats"))
    if status != 200:
        return None
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        value = json.loads(body).get("rss_bytes")
        return int(value) if value is not None else None
    return None


def rss_probe(sender: Sender, pids: Sequence[int] | None) -> tuple[str, Callable[[], int | None]]:
    """(source, function returning the replica RSS in bytes; summed over `pids`)."""
    if pids:
        return f"/proc/{','.join(map(str, pids))}", lambda: _sum_rss(pids)
    if stats_rss(sender) is not None:
        return "/stats rss_bytes", lambda: stats_rss(sender)
    with contextlib.suppress(Exception):
        found = sorted(replica_pids().values())
        if found:
            return f"/proc/{','.join(map(str, found))} (Ray state API)", lambda: _sum_rss(found)
    return "unavailable", lambda: None


def _sum_rss(pids: Sequence[int]) -> int | None:
    values = [read_rss_bytes(p) for p in pids]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


@dataclass
class SoakReport:
    """A soak run: request outcomes and the replica RSS over time."""

    requests: int
    verdicts: dict[str, int]
    rss_source: str
    rss_start: int | None
    rss_before: int | None  # after the warm-up
    rss_after: int | None
    samples: list[tuple[int, int | None]]
    wall_s: float
    failures: list[dict[str, Any]]

    @property
    def growth_pct(self) -> float | None:
        """RSS growth from after the warm-up to the end, percent."""
        if not self.rss_before or self.rss_after is None:
            return None
        return 100.0 * (self.rss_after - self.rss_before) / self.rss_before


def run_soak(
    sender: Sender,
    pb2: Any,
    n: int,
    *,
    seed: int = 0,
    time_limit_s: float = 3600.0,
    warmup: int | None = None,
    pids: Sequence[int] | None = None,
    samples: int = 10,
) -> SoakReport:
    """Send `n` valid mixed requests (bounded by `time_limit_s`) and track the replica's RSS."""
    rng = random.Random(seed)
    source, probe = rss_probe(sender, pids)
    warmup = min(200, max(1, n // 10)) if warmup is None else warmup
    start = probe()
    before: int | None = start
    series: list[tuple[int, int | None]] = [(0, start)]
    verdicts: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    every = max(1, n // max(1, samples))
    t0 = time.monotonic()
    sent = 0
    for case in soak_requests(pb2, rng, n, sender.channel is not None, sender.http is not None):
        if time.monotonic() - t0 > time_limit_s:
            break
        outcome = sender.send(case)
        sent += 1
        verdicts[outcome.verdict] += 1
        if outcome.verdict != OK and len(failures) < 50:
            failures.append(asdict(outcome) | {"input": case.describe()})
        if sent == warmup:
            before = probe()
            series.append((sent, before))
        elif sent % every == 0:
            series.append((sent, probe()))
    after = probe()
    series.append((sent, after))
    return SoakReport(
        sent, dict(verdicts), source, start, before, after, series, time.monotonic() - t0, failures
    )


def soak_summary(report: SoakReport) -> str:
    """Plain-text summary of a soak run."""

    def mb(v: int | None) -> str:
        return "n/a" if v is None else f"{v / MB:.1f} MB"

    growth = report.growth_pct
    return "\n".join(
        [
            f"soak: {report.requests} requests in {report.wall_s:.1f} s: {report.verdicts}",
            f"replica RSS ({report.rss_source}): start {mb(report.rss_start)}, after warm-up "
            f"{mb(report.rss_before)}, end {mb(report.rss_after)}, growth "
            + ("n/a" if growth is None else f"{growth:+.2f} %"),
            "samples: " + ", ".join(f"{i}:{mb(v)}" for i, v in report.samples),
        ]
    )
