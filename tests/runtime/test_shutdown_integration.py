"""`leanserve serve` as a subprocess: SIGTERM drains, and a replica that fails at start is reported.

Each test starts the real CLI (supervisor, driver, Ray, Serve, the app) on free 127.0.0.1 ports
in a session of its own, so that a signal to its process group never reaches pytest. Every wait
is bounded; whatever the test started is killed at the end if it is still there.

The drain test serves a tiny model with a long context (1024 tokens), so that greedy streams of
`STREAM_TOKENS` tokens are still running when the signal arrives (about 5 s each on 2 cores),
and sets `LEANSERVE_API_KEY` in the server's environment only: the replica must have inherited
it (calls without the key are UNAUTHENTICATED).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from runtime.client import build_request
from runtime.serve_cli import session_members

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STREAMS = 4
STREAM_TOKENS = 400
DRAIN_S = 60.0  # --graceful-shutdown-timeout: far above what the streams need
EXIT_BOUND_S = DRAIN_S + 30.0  # stated bound: drain bound + Serve/Ray shutdown (measured 4-6 s)
API_KEY = "test-key-not-secret"
AUTH = [("authorization", f"Bearer {API_KEY}")]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny test model's recipe (as its config.json records it) with a 1024-token context and
    up to 8 steps, trained in a few seconds."""
    from models.checkpoint import load_config
    from models.config import ModelConfig
    from models.train import TrainConfig, train

    tiny = load_config(tiny_model_dir).to_dict()
    recipe = TrainConfig(**tiny.pop("extra")["training"]["train_config"])
    config = ModelConfig.from_dict({**tiny, "name": "drain-tiny", "context_length": 1024, "max_steps": 8})
    root = tmp_path_factory.mktemp("long-model")
    train(config, recipe, root / "model", text=tiny_model_dir.parent / "text.txt", progress=False)
    return root / "model"


class Server:
    """One `leanserve serve` subprocess; `stop()` kills whatever of it is left (bounded)."""

    def __init__(
        self, model_dir: Path, ports: dict[str, int], *extra: str, env: dict[str, str] | None = None
    ):
        self.ports = ports
        cmd = [
            sys.executable, "-m", "runtime.cli", "serve", str(model_dir),
            "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]),
            "--metrics-port", str(ports["metrics"]), "--num-cpus", "2", "--threads", "1",
            "--startup-timeout", "240", *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.ready = threading.Event()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if line.startswith("leanserve serve: ready"):
                self.ready.set()

    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def driver_pid(self) -> int:
        """The driver: the supervisor's only child (it leads its own session)."""
        children = self.children()
        assert len(children) == 1, children
        return children[0]

    def wait_exit(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout_s)
        for t in self._readers:
            t.join(10)
        return rc

    def stop(self, sessions: list[int]) -> None:
        """Kill what is left: the supervisor and every process of the driver sessions given."""
        for sid in sessions:
            for pid in session_members(sid):
                _kill(pid)
        if self.proc.poll() is None:
            _kill(self.proc.pid)
            self.proc.wait(10)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _ports(free_port) -> dict[str, int]:
    return {"grpc": free_port(), "http": free_port(), "metrics": free_port()}


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@pytest.fixture
def started(request, long_model_dir, free_port) -> Iterator[Server]:
    server = Server(long_model_dir, _ports(free_port), "--graceful-shutdown-timeout", str(DRAIN_S),
                    env={"LEANSERVE_API_KEY": API_KEY})  # fmt: skip
    sessions: list[int] = []
    try:
        assert server.ready.wait(300), "not ready after 300 s:\n" + server.output()
        sessions.append(server.driver_pid())
        yield server
    finally:
        server.stop(sessions)


@pytest.mark.parametrize("target", ["process", "process-group"])
def test_sigterm_drains_streams_then_exits_with_nothing_left(started, target):
    from runtime.proto_build import load_stubs

    server, ports = started, started.ports
    driver = server.driver_pid()
    ray_pids = [pid for pid in session_members(driver) if pid != driver]
    assert ray_pids, "no Ray processes found in the driver's session"
    # Ray's processes are out of the supervisor's process group: a group signal cannot reach them.
    assert all(os.getpgid(pid) != server.proc.pid for pid in [driver, *ray_pids])

    pb2, pb2_grpc = load_stubs()
    channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}")
    stub = pb2_grpc.TextGenerationStub(channel)
    with pytest.raises(grpc.RpcError) as no_key:  # the key reached the replica through the env
        stub.Generate(build_request(pb2, "Hi", max_tokens=2), timeout=30)
    assert no_key.value.code() is grpc.StatusCode.UNAUTHENTICATED

    results: dict[int, dict[str, Any]] = {}
    first = threading.Barrier(STREAMS + 1, timeout=120)

    def stream(i: int) -> None:
        out: dict[str, Any] = {"tokens": 0, "finish": None, "error": None}
        results[i] = out
        request = build_request(pb2, "In the beginning", max_tokens=STREAM_TOKENS, temperature=0.0, steps=8)
        try:
            for n, msg in enumerate(stub.GenerateStream(request, timeout=180, metadata=AUTH)):
                out["tokens"] += len(msg.token_ids)
                out["finish"] = msg.finish_reason
                if n == 0:
                    first.wait()
        except grpc.RpcError as e:
            out["error"] = f"{e.code()}: {e.details()}"
        except threading.BrokenBarrierError:
            out["error"] = "barrier broken"
        out["ended"] = time.monotonic()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(STREAMS)]
    for t in threads:
        t.start()
    first.wait()  # every stream is under way

    t0 = time.monotonic()
    if target == "process-group":
        os.killpg(server.proc.pid, signal.SIGTERM)  # what `timeout`, systemd and Ctrl-C do
    else:
        os.kill(server.proc.pid, signal.SIGTERM)

    # New calls are refused while the streams finish: gRPC UNAVAILABLE, HTTP 503 (or, once the
    # proxies are gone, a refused connection, which gRPC reports as UNAVAILABLE too).
    grpc_codes, http_codes, http_errors = [], [], []
    end = time.monotonic() + 30
    # Until both protocols have shown their refusal (on a loaded machine one HTTP call can time
    # out first), bounded in time.
    while time.monotonic() < end and not (
        grpc_codes.count(grpc.StatusCode.UNAVAILABLE) >= 2 and 503 in http_codes
    ):
        try:
            stub.Generate(build_request(pb2, "Hi", max_tokens=2), timeout=10, metadata=AUTH)
            grpc_codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            grpc_codes.append(e.code())
        body = b'{"prompt": "Hi", "max_tokens": 2}'
        req = urllib.request.Request(
            f"http://127.0.0.1:{ports['http']}/v1/completions", data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                http_codes.append(r.status)
        except urllib.error.HTTPError as e:
            http_codes.append(e.code)
        except (urllib.error.URLError, ConnectionError) as e:
            http_codes.append("refused")
            http_errors.append(repr(e))
        time.sleep(0.2)
    # A call that raced the signal may still have been admitted (OK / 200); nothing else.
    assert grpc.StatusCode.UNAVAILABLE in grpc_codes, grpc_codes
    assert set(grpc_codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, grpc_codes
    # The draining replica answers 503 (a refused connection only once the proxies are gone).
    refusals = [c for c in http_codes if c != 200]
    assert 503 in refusals and set(refusals) <= {503, "refused"}, (http_codes, http_errors)
    assert 200 not in http_codes[http_codes.index(refusals[0]) :], http_codes  # none admitted after

    for t in threads:
        t.join(180)
    for i, out in sorted(results.items()):
        assert out["error"] is None, (i, out, server.output())
        assert out["tokens"] == STREAM_TOKENS and out["finish"] == pb2.FINISH_REASON_LENGTH, (i, out)
        assert out["ended"] > t0  # it was in flight when the signal came

    rc = server.wait_exit(EXIT_BOUND_S)
    exited = time.monotonic() - t0
    assert rc == 0, server.output()
    assert exited < EXIT_BOUND_S
    print(f"\n{target}: streams done {max(o['ended'] for o in results.values()) - t0:.1f} s, "
          f"exit {exited:.1f} s after SIGTERM")  # fmt: skip
    err = "".join(server.stderr)
    assert "SIGTERM: draining" in err and "drained in" in err, err
    assert "leftover" not in err, err  # the driver shut Ray down itself
    assert _wait_until(lambda: not any(_alive(pid) for pid in ray_pids), 10), [
        p for p in ray_pids if _alive(p)
    ]
    assert session_members(driver) == []
    assert not [name for name, port in ports.items() if _listening(port)]
    channel.close()


def test_a_replica_that_fails_at_start_is_reported_and_its_logs_kept(tiny_model_dir, free_port, tmp_path):
    """The directory passes the driver's check, but the replica cannot start: a device that
    exists nowhere (no CUDA build here; no 1000th GPU on a GPU host)."""
    import shutil

    config = tmp_path / "serve.yaml"
    config.write_text("device: cuda:999\n")
    ports = _ports(free_port)
    server = Server(tiny_model_dir, ports, "--config", str(config))
    sessions: list[int] = []
    kept: Path | None = None
    try:
        assert _wait_until(lambda: server.children(), 30), server.output()
        sessions.append(server.driver_pid())
        rc = server.wait_exit(300)
        err = "".join(server.stderr)
        assert rc == 1, server.output()
        assert "leanserve serve: the application did not start:" in err, err
        assert "LeanServer: " in err and ("CUDA" in err or "cuda" in err), err  # the replica's error
        line = next(x for x in err.splitlines() if x.startswith("leanserve serve: logs kept in "))
        kept = Path(line.removeprefix("leanserve serve: logs kept in ").split(" (")[0])
        assert kept.is_dir() and list((kept / "serve").glob("replica_*.log")), kept
        assert not server.ready.is_set()
        assert session_members(sessions[0]) == []
        assert not [name for name, port in ports.items() if _listening(port)]
    finally:
        server.stop(sessions)
        if kept is not None:
            shutil.rmtree(kept.parent.parent, ignore_errors=True)  # the session's temp dir (ours)
