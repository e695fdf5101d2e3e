"""Bounded fuzzer and soak driver for a running leanserve server (127.0.0.1 only).

    python -m loadtest.fuzz --grpc 127.0.0.1:9000 --http http://127.0.0.1:8000 \\
        --requests 5000 --seed 0 --time-limit 900 --out runs/fuzz/fuzz.json
    python -m loadtest.fuzz --grpc 127.0.0.1:9000 --http http://127.0.0.1:8000 --soak 10000

Fuzz mode sends hostile requests, one at a time (so a failure is attributable):

* gRPC `GenerateRequest`s built from the message descriptor, so every field the
  proto has (today's and tomorrow's) gets edge values of its type: float32 edges
  (1e-45, denormals, nan, +-inf, -0.0, values that round to 0 or overflow in
  float32), integer edges up to the type's maximum, empty / 1 MB / non-ASCII
  strings, thousands of stop strings. They go out as bytes through a raw-bytes
  method (`request_serializer=lambda b: b`), which also carries what protobuf
  cannot build: invalid UTF-8 in string fields, truncated and garbage messages,
  wrong wire types, lengths past the end, unknown fields, deep group nesting,
  messages over 4 MB.
* HTTP `/v1/completions` bodies: wrong types for every field, nulls, lists,
  nested objects, integers like 10**400, lone surrogates (`"\\ud800"` in the
  JSON text), NaN / Infinity tokens, JSON nested 100,000 deep, non-JSON and
  huge bodies, unknown fields, OpenAI list and token-id prompts, `logprobs`,
  `n`, `echo`, penalties; plus other routes and methods.

Every response is classified (`classify_grpc`, `classify_http`):

* OK: the request ran;
* REJECTED: a client error (4xx; gRPC INVALID_ARGUMENT, OUT_OF_RANGE,
  FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAUTHENTICATED, ...): expected;
* UNAVAILABLE: HTTP 503 / gRPC UNAVAILABLE, legitimate while a replica restarts
  (the health checks say whether the engine died);
* TIMEOUT: the client's deadline passed (DEADLINE_EXCEEDED, HTTP read timeout);
* BAD: HTTP 5xx other than 503, gRPC INTERNAL / UNKNOWN / DATA_LOSS /
  UNIMPLEMENTED, an error chunk with such a code inside a 200 stream, or a
  connection dropped without a response.

Every `--health-every` requests the fuzzer checks `/healthz` and sends one normal
request; when either fails, that is an engine death: it is counted, the cases
since the last good check are recorded as suspects, and the fuzzer waits (at
most `--recovery-timeout`) for the server to come back, recording how long it
took. The summary is printed as a table and written as JSON (`--out`), each
BAD case with its input (abbreviated) and the response. The exit status is 1
when there was any BAD response or death.

Soak mode (`--soak N`) sends N valid, mixed requests (unary, stream, HTTP,
various step counts, sampling settings, stop strings) and reports the replica's
resident memory before (after a warm-up) and after: from `--pid` (read
/proc/PID/status), else the `rss_bytes` field of `/stats` if the server has one,
else, when this process is the Ray driver of the cluster, the replica actors'
pids from Ray's state (GCS) API. Exit status 1 when a request failed or RSS grew
more than `--max-rss-growth` percent.

Cases come from a seeded `random.Random` (`--seed`): the same seed gives the same
cases, so a BAD case can be re-sent with `--replay INDEX`.

Modules: loadtest/fuzz_case.py (a case, its outcome, the verdicts), loadtest/fuzz_grpc_cases.py
and loadtest/fuzz_http_cases.py (the generators), loadtest/fuzz_transport.py (sending and
health checks), loadtest/fuzz_run.py (the fuzz run and its report), loadtest/fuzz_soak.py (soak
mode); this one is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from loadtest.fuzz_case import BAD, OK, Outcome
from loadtest.fuzz_run import generate_cases, run_fuzz, summary_table
from loadtest.fuzz_soak import run_soak, soak_summary
from loadtest.fuzz_transport import Sender


def build_parser() -> argparse.ArgumentParser:
    """The `python -m loadtest.fuzz` arguments."""
    p = argparse.ArgumentParser(prog="python -m loadtest.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--grpc", metavar="HOST:PORT", help="gRPC endpoint (127.0.0.1 only)")
    p.add_argument("--http", metavar="URL", help="HTTP base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=500, help="fuzz cases to send (default 500)")
    p.add_argument("--seed", type=int, default=0, help="case generator seed (default 0)")
    p.add_argument("--time-limit", type=float, default=600.0, help="wall-clock bound, seconds (default 600)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds (default 30)")
    p.add_argument("--health-every", type=int, default=25, help="health check every K requests (default 25)")
    p.add_argument("--recovery-timeout", type=float, default=60.0, help="wait for recovery after a death, s")
    p.add_argument("--replay", type=int, action="append", help="send only case INDEX (repeatable)")
    p.add_argument("--soak", type=int, metavar="N", help="soak mode: N valid mixed requests")
    p.add_argument("--pid", type=int, action="append", help="soak: replica pid(s) whose RSS to read")
    p.add_argument("--max-rss-growth", type=float, default=5.0, help="soak: fail above this growth, percent")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no per-request progress")
    return p


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fuzzer or the soak; 0 when nothing BAD happened, 1 otherwise, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    if not args.grpc and not args.http:
        print("loadtest.fuzz: give --grpc and/or --http", file=sys.stderr)
        return 2
    try:
        sender = Sender(args.grpc, args.http, timeout_s=args.timeout)
    except ValueError as e:
        print(f"loadtest.fuzz: {e}", file=sys.stderr)
        return 2
    pb2 = None
    if args.grpc or args.soak:
        from runtime.proto_build import load_stubs  # the generated stubs only

        pb2, _ = load_stubs()
    try:
        if args.soak:
            soak = run_soak(
                sender, pb2, args.soak, seed=args.seed, time_limit_s=args.time_limit, pids=args.pid
            )
            print(soak_summary(soak))
            _write_json(args.out, asdict(soak) | {"growth_pct": soak.growth_pct})
            grew = soak.growth_pct is not None and soak.growth_pct > args.max_rss_growth
            return 1 if grew or soak.verdicts.get(OK, 0) != soak.requests else 0
        cases = generate_cases(pb2, args.seed, args.requests, bool(args.grpc), bool(args.http))
        if args.replay:
            cases = [cases[i] for i in args.replay if 0 <= i < len(cases)]

        def progress(o: Outcome) -> None:
            if not args.quiet and (o.verdict == BAD or o.index % 100 == 0):
                print(f"#{o.index} {o.kind} {o.verdict} {o.code} {o.label[:80]}", file=sys.stderr)

        report = run_fuzz(
            sender, pb2, cases, seed=args.seed, time_limit_s=args.time_limit, health_every=args.health_every,
            recovery_timeout_s=args.recovery_timeout, on_outcome=progress,
        )  # fmt: skip
        print(summary_table(report))
        _write_json(args.out, report.to_json())
        return 0 if report.ok else 1
    finally:
        sender.close()


if __name__ == "__main__":
    sys.exit(main())
