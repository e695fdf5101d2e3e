"""A fuzz run: the seeded mix of cases (`generate_cases`), sending them one at a time with health
checks and recovery waits (`run_fuzz`), and what it found (`FuzzReport`, `summary_table`).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from loadtest.fuzz_case import BAD, COMPLETIONS, JSON_HEADERS, TIMEOUT, UNAVAILABLE, VERDICTS, Case, Outcome
from loadtest.fuzz_grpc_cases import METADATA_EDGES, GrpcCaseMaker, raw_grpc_payloads
from loadtest.fuzz_http_cases import http_bodies, http_mutation
from loadtest.fuzz_transport import Sender


def generate_cases(
    pb2: Any | None, seed: int, n: int, grpc_on: bool = True, http_on: bool = True
) -> list[Case]:
    """`n` cases, deterministic for a seed: the fixed lists first, then random mutations.

    Raises:
        ValueError: neither transport is on, or `n` < 1.
    """
    if not (grpc_on or http_on) or n < 1:
        raise ValueError(f"need a transport and n >= 1 (grpc={grpc_on}, http={http_on}, n={n})")
    rng = random.Random(seed)
    fixed: list[Case] = []
    if grpc_on:
        assert pb2 is not None
        fixed += [Case(0, "grpc_raw", label, data, "Generate") for data, label in raw_grpc_payloads(pb2, rng)]
    if http_on:
        fixed += [Case(0, "http", lbl, b, m, p, h) for b, lbl, h, m, p in http_bodies(rng)]
    rng.shuffle(fixed)
    maker = GrpcCaseMaker(pb2) if grpc_on else None
    cases: list[Case] = []
    fixed_every = max(2, n // max(1, len(fixed)))  # spread the fixed cases over the run
    while len(cases) < n:
        i = len(cases)
        if fixed and i % fixed_every == 0:
            case = fixed.pop(0)
        elif maker is not None and (not http_on or rng.random() < 0.55):
            data, label = maker.make(rng)
            method = "GenerateStream" if rng.random() < 0.3 else "Generate"
            case = Case(0, "grpc", label, data, method)
            if rng.random() < 0.15:
                key = rng.choice(sorted(METADATA_EDGES))
                case.metadata = [(key, rng.choice(METADATA_EDGES[key]))]
        else:
            body, label = http_mutation(rng)
            case = Case(0, "http", label, body, "POST", COMPLETIONS, dict(JSON_HEADERS))
        case.index = i
        cases.append(case)
    return cases


# --- the fuzz run ----------------------------------------------------------------------------


@dataclass
class Death:
    """One period in which the health check failed."""

    after_index: int
    reason: str
    suspects: list[str]
    recovered_after_s: float | None


@dataclass
class FuzzReport:
    """Everything a fuzz run found."""

    seed: int
    requested: int
    outcomes: list[Outcome]
    deaths: list[Death]
    health_checks: int
    wall_s: float
    stopped_early: str = ""

    @property
    def bad(self) -> list[Outcome]:
        """Outcomes with verdict BAD."""
        return [o for o in self.outcomes if o.verdict == BAD]

    @property
    def ok(self) -> bool:
        """No BAD response and no engine death."""
        return not self.bad and not self.deaths

    def counts(self) -> dict[str, Counter[str]]:
        """kind -> verdict -> count."""
        table: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            table.setdefault(o.kind, Counter())[o.verdict] += 1
        return table

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (BAD outcomes in full, the others as counts per code)."""
        codes: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            codes.setdefault(o.kind, Counter())[o.code] += 1
        not_shaped = sum(o.detail.startswith("[error body not OpenAI-shaped]") for o in self.outcomes)
        return {
            "seed": self.seed,
            "requested": self.requested,
            "sent": len(self.outcomes),
            "wall_s": round(self.wall_s, 2),
            "stopped_early": self.stopped_early,
            "health_checks": self.health_checks,
            "verdicts": {k: dict(v) for k, v in self.counts().items()},
            "codes": {k: dict(v) for k, v in codes.items()},
            "http_4xx_not_openai_shaped": not_shaped,
            "deaths": [asdict(d) for d in self.deaths],
            "bad": [asdict(o) for o in self.bad],
            "slowest": [asdict(o) for o in sorted(self.outcomes, key=lambda o: -o.seconds)[:10]],
        }


def wait_healthy(sender: Sender, pb2: Any | None, timeout_s: float, interval_s: float = 1.0) -> float | None:
    """Seconds until the server is healthy again, or None after `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if sender.healthy(pb2)[0]:
            return time.monotonic() - t0
        time.sleep(interval_s)
    return None


def run_fuzz(
    sender: Sender,
    pb2: Any | None,
    cases: Sequence[Case],
    *,
    seed: int = 0,
    time_limit_s: float = 600.0,
    health_every: int = 25,
    recovery_timeout_s: float = 60.0,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> FuzzReport:
    """Send `cases` one by one, health-checking every `health_every`; bounded by `time_limit_s`.

    The run stops early (noted in the report) at the time limit, or when the
    server does not recover within `recovery_timeout_s` after a death.
    """
    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    deaths: list[Death] = []
    checks = 0
    since_check: list[Case] = []
    stopped = ""

    def check(after: int) -> bool:
        nonlocal checks
        checks += 1
        ok, why = sender.healthy(pb2)
        if ok:
            return True
        recovered = wait_healthy(sender, pb2, recovery_timeout_s)
        deaths.append(Death(after, why, [c.describe(120) for c in since_check], recovered))
        return recovered is not None

    for case in cases:
        if time.monotonic() - t0 > time_limit_s:
            stopped = f"time limit {time_limit_s:.0f} s after {len(outcomes)} requests"
            break
        outcome = sender.send(case)
        outcomes.append(outcome)
        since_check.append(case)
        if on_outcome is not None:
            on_outcome(outcome)
        # Check at once after a symptom of a death, else every `health_every` requests.
        symptom = outcome.verdict in (BAD, UNAVAILABLE, TIMEOUT)
        if symptom or len(since_check) >= health_every:
            if not check(case.index):
                stopped = f"server did not recover within {recovery_timeout_s:.0f} s"
                break
            since_check = []
    else:
        if since_check and not check(cases[-1].index if cases else 0):
            stopped = f"server did not recover within {recovery_timeout_s:.0f} s"
    return FuzzReport(seed, len(cases), outcomes, deaths, checks, time.monotonic() - t0, stopped)


def summary_table(report: FuzzReport) -> str:
    """A plain-text table: kind x verdict counts, deaths, then each BAD case."""
    counts = report.counts()
    lines = [f"{'kind':<10}" + "".join(f"{v:>12}" for v in VERDICTS) + f"{'total':>8}"]
    for kind in sorted(counts):
        row = counts[kind]
        lines.append(f"{kind:<10}" + "".join(f"{row[v]:>12}" for v in VERDICTS) + f"{sum(row.values()):>8}")
    total = Counter[str]()
    for row in counts.values():
        total.update(row)
    lines.append(f"{'all':<10}" + "".join(f"{total[v]:>12}" for v in VERDICTS) + f"{sum(total.values()):>8}")
    lines.append(
        f"engine deaths: {len(report.deaths)}; health checks: {report.health_checks}; "
        f"wall {report.wall_s:.1f} s; seed {report.seed}"
        + (f"; stopped early: {report.stopped_early}" if report.stopped_early else "")
    )
    for d in report.deaths:
        rec = (
            "not recovered" if d.recovered_after_s is None else f"recovered after {d.recovered_after_s:.1f} s"
        )
        lines.append(f"  death after case {d.after_index}: {d.reason} ({rec}); suspects: {len(d.suspects)}")
    for o in report.bad:
        lines.append(f"  BAD #{o.index} {o.code}: {o.label} -> {o.detail[:160]!r}")
    return "\n".join(lines)
