"""Integration: a short sweep (2 step settings x 4 requests) against a real `leanserve serve`.

The server is started as the user would start it, `leanserve serve MODEL_DIR` in
its own process (its own local Ray), serving a tiny model trained here exactly
(the `tiny_model_dir` fixture of tests/conftest.py). A separate process keeps
this test independent of the serving tests' in-process Ray. The sweep runs
through `python -m loadtest` (the same code as `leanserve loadtest`), and the
Locust alternative through the `locust` command with loadtest/locustfile.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.report import BASE_FILES, OVERLOAD_FILES, STEP_LOAD_FILES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(tiny_model_dir, free_port) -> Iterator[str]:
    """`leanserve serve` on free 127.0.0.1 ports with a tiny trained model; yields the gRPC target."""
    grpc_port = free_port()
    cmd = [
        sys.executable, "-m", "runtime.cli", "serve", str(tiny_model_dir), "--grpc-port", str(grpc_port),
        "--http-port", str(free_port()), "--metrics-port", str(free_port()), "--num-cpus", "2",
        "--threads", "1", "--startup-timeout", "240",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another test's Ray
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:  # read the server's output so its pipe never fills, and spot "ready"
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "leanserve serve: ready" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not ready.wait(1.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("leanserve serve did not become ready:\n" + "".join(lines[-40:]))
        yield f"127.0.0.1:{grpc_port}"
    finally:
        proc.send_signal(signal.SIGTERM)  # the server's clean shutdown (drain, Serve, Ray)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_short_sweep_against_leanserve_serve_writes_all_reports(served: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [
        sys.executable, "-m", "loadtest", "--target", served, "--steps", "2,4", "--requests", "4",
        "--rate", "4", "--duration", "20", "--max-tokens", "4", "--timeout", "60", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in BASE_FILES:
        assert (out / name).stat().st_size > 0, name
    for name in OVERLOAD_FILES + STEP_LOAD_FILES:  # neither scenario ran: no empty plots of them
        assert not (out / name).exists(), name
    points = json.loads((out / "points.json").read_text())["points"]
    assert [p["label"] for p in points] == ["N=2", "N=4"]
    for p, steps in zip(points, (2, 4), strict=True):
        assert p["ok"] == p["sent"] == 4, p["errors"]
        assert p["mean_steps"] == steps and p["policy_reasons"] == {"explicit": 4}
        assert p["ttft_p50_ms"] > 0 and p["e2e_p99_ms"] >= p["ttft_p99_ms"]


def test_locustfile_drives_the_same_grpc_calls(served: str, tmp_path: Path) -> None:
    """Locust (headless, 2 users, a few seconds) completes GenerateStream calls without failures."""
    locust = Path(sys.executable).with_name("locust")
    env = {
        **os.environ,
        "LEANSERVE_STEPS": "2",
        "LEANSERVE_MAX_TOKENS": "8",
        "LEANSERVE_PROMPT_LENGTHS": "fixed:4",  # the tiny model's context is 64 tokens
        "PYTHONPATH": str(ROOT),
    }
    cmd = [
        str(locust), "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless", "-u", "2", "-r", "2",
        "-t", "4s", "--host", served, "--csv", str(tmp_path / "locust"), "--only-summary",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (tmp_path / "locust_stats.csv").read_text().splitlines()
    header = rows[0].split(",")
    stats = {r.split(",")[header.index("Name")]: r.split(",") for r in rows[1:]}
    e2e = stats["GenerateStream"]
    assert int(e2e[header.index("Request Count")]) > 0
    assert int(e2e[header.index("Failure Count")]) == 0
    assert float(stats["GenerateStream TTFT"][header.index("Median Response Time")]) > 0
