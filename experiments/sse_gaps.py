"""Inter-event gaps of a streamed completion as the official `openai` client sees them.

One local Ray Serve start (127.0.0.1, free ports), then per step count 4 streams of 64
tokens (the first is a warm-up); prints p50 / p90 / mean of the gaps between chunks and
how many were under 0.1 ms (events that left the replica together). docs/api.md's
streaming table was measured with it:

    taskset -c 1 python -m experiments.sse_gaps                      # the default engine
    taskset -c 1 python -m experiments.sse_gaps '{"inline_decode_ms": 0}'
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo" / "ode-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gaps_ms(client, steps: int, runs: int = 4, max_tokens: int = 64) -> list[float]:
    """Gaps between consecutive chunks of `runs - 1` streams (after one warm-up), sorted."""
    gaps: list[float] = []
    for run in range(runs):
        last = None
        stream = client.completions.create(
            model="ode-tiny", prompt="God said", max_tokens=max_tokens, stream=True, temperature=0,
            extra_body={"steps": steps},
        )  # fmt: skip
        for _ in stream:
            now = time.perf_counter()
            if last is not None and run > 0:
                gaps.append((now - last) * 1e3)
            last = now
    return sorted(gaps)


def main(argv: list[str]) -> int:
    """Serve ode-tiny with the engine settings in argv[0] (JSON) and print the gap summary."""
    import openai

    from tests.helpers import local_serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    engine = json.loads(argv[0]) if argv else {}
    args = {"model_dir": str(ZOO), "threads": 1, "engine": engine}
    with local_serve(_free_port, args, "lssse") as ports:
        base = f"http://127.0.0.1:{ports['http']}/v1"
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
        for steps in (2, 12):
            g = gaps_ms(client, steps)
            p50, p90 = (g[int(p * (len(g) - 1))] for p in (0.5, 0.9))
            print(
                f"engine={engine} N={steps}: p50 {p50:.2f} p90 {p90:.2f} mean {statistics.mean(g):.2f} ms,"
                f" gaps < 0.1 ms: {sum(x < 0.1 for x in g)} of {len(g)}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
