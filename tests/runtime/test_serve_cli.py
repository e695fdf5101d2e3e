"""`leanserve serve` argument resolution, failure report and the supervisor process (no Ray here:
the supervisor runs a fake driver)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime import serve_cli
from runtime.serve_cli import _app_args, failure_report, graceful_shutdown_timeout, parse_steps, resolve_ports

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "serve" / "leanserve.yaml"


def _args(**kw) -> argparse.Namespace:
    base = dict(
        config=None, grpc_port=None, http_port=None, model_dir=None, threads=None, replicas=None,
        max_batch_size=None, max_waiting=None, kv_cache_bytes=None, default_steps=None,
        slo_target_itl_ms=None, inline_decode_ms=None, compile=False, compile_steps=None,
        api_key=None, graceful_shutdown_timeout=None,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_ports_default_then_config_file_then_flags(tmp_path: Path):
    assert resolve_ports(_args()) == (9000, 8000)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "grpc_options:\n  port: 9500\nhttp_options:\n  host: 0.0.0.0\n  port: 8500\napplications: []\n"
    )
    assert resolve_ports(_args(config=str(cfg))) == (9500, 8500)
    assert resolve_ports(_args(config=str(cfg), grpc_port=9100)) == (9100, 8500)
    assert resolve_ports(_args(config=str(SERVE_CONFIG))) == (9000, 8000)


def test_bad_port_in_config_names_the_field(tmp_path: Path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("grpc_options:\n  port: 70000\n")
    with pytest.raises(ValueError, match=r"grpc_options.port=70000: must be an integer port in \[1, 65535\]"):
        resolve_ports(_args(config=str(cfg)))


def test_serve_config_application_args_and_flag_overrides():
    cfg = _app_args(_args(config=str(SERVE_CONFIG), max_batch_size=4, model_dir="models/zoo/ode-tiny"))
    assert cfg["model_dir"] == "models/zoo/ode-tiny"
    assert cfg["engine"]["max_batch_size"] == 4
    assert cfg["engine"]["page_size"] == 16  # from the file
    assert "grpc_options" not in cfg and "http_options" not in cfg
    assert "compile" not in cfg
    assert _app_args(_args(config=str(SERVE_CONFIG), compile=True))["compile"] is True
    assert "compile_steps" not in cfg
    assert _app_args(_args(compile=True, compile_steps="2,3,12"))["compile_steps"] == [2, 3, 12]
    assert "inline_decode_ms" not in cfg["engine"]
    assert _app_args(_args(inline_decode_ms=0.0))["engine"]["inline_decode_ms"] == 0.0


def test_compile_steps_flag_is_all_or_a_list():
    assert parse_steps("all") == "all"
    assert parse_steps("4") == [4]
    with pytest.raises(ValueError, match=r"--compile-steps='2-4': must be 'all' or comma-separated"):
        parse_steps("2-4")


def test_local_env_fills_gaps_and_leaves_what_the_user_set(monkeypatch):
    """Local runs get the token-free loopback Ray and Serve's short request path (gRPC from
    proxy to replica, handlers on the replica's loop); a value already in the environment
    wins, so `RAY_SERVE_PROXY_USE_GRPC=0 leanserve serve` goes back to Ray actor calls."""
    import os

    from runtime.serve_cli import LOCAL_ENV, SERVE_LATENCY_ENV, set_local_env

    assert SERVE_LATENCY_ENV["RAY_SERVE_PROXY_USE_GRPC"] == "1"
    assert LOCAL_ENV["RAY_AUTH_MODE"] == "disabled" and SERVE_LATENCY_ENV.items() <= LOCAL_ENV.items()
    for key in LOCAL_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")
    set_local_env()
    assert os.environ["RAY_SERVE_PROXY_USE_GRPC"] == "0"
    assert {k: os.environ[k] for k in LOCAL_ENV if k != "RAY_SERVE_PROXY_USE_GRPC"} == {
        k: v for k, v in LOCAL_ENV.items() if k != "RAY_SERVE_PROXY_USE_GRPC"
    }


def test_api_key_flag_goes_to_the_app_args_and_the_environment_does_not(monkeypatch):
    monkeypatch.setenv("LEANSERVE_API_KEY", "from-env")
    assert "api_key" not in _app_args(_args())  # the replica reads the env var it inherits
    assert _app_args(_args(api_key="s3cret"))["api_key"] == "s3cret"


def test_graceful_shutdown_timeout_default_file_and_flag():
    assert graceful_shutdown_timeout(_app_args(_args())) == serve_cli.DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S
    assert graceful_shutdown_timeout(_app_args(_args(config=str(SERVE_CONFIG)))) == 20.0  # the file's
    cfg = _app_args(_args(config=str(SERVE_CONFIG), graceful_shutdown_timeout=45.0, replicas=2))
    assert cfg["deployment"]["graceful_shutdown_timeout_s"] == 45.0 == graceful_shutdown_timeout(cfg)
    assert cfg["deployment"]["num_replicas"] == 2 and cfg["deployment"]["max_queued_requests"] == 256
    for bad in (-1, "10", float("inf"), True):
        with pytest.raises(
            ValueError, match=r"graceful_shutdown_timeout_s=.*must be a number of seconds >= 0"
        ):
            graceful_shutdown_timeout({"deployment": {"graceful_shutdown_timeout_s": bad}})


def test_deployment_options_give_replica_drain_and_ray_one_bound():
    from runtime.serve_app import ServeArgs, deployment_options

    options = deployment_options(ServeArgs.from_dict({}))
    assert options["graceful_shutdown_timeout_s"] == serve_cli.DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S
    assert options["graceful_shutdown_wait_loop_s"] <= 1.0
    set_ = deployment_options(ServeArgs.from_dict({"deployment": {"graceful_shutdown_timeout_s": 7}}))
    assert set_["graceful_shutdown_timeout_s"] == 7


def test_failure_report_names_the_error_and_keeps_the_logs(tmp_path):
    traceback = "\n".join(
        ["The deployment failed to start 3 times in a row. Error:"]
        + [f'  File "x.py", line {i}, in f' for i in range(30)]
        + ["AssertionError: Torch not compiled with CUDA enabled"]
    )
    report = failure_report(
        RuntimeError("application 'leanserve' is DEPLOY_FAILED"), {"LeanServer": traceback}, tmp_path
    )
    lines = report.splitlines()
    assert (
        lines[0] == "leanserve serve: the application did not start: application 'leanserve' is DEPLOY_FAILED"
    )
    assert lines[1] == "LeanServer: The deployment failed to start 3 times in a row. Error:"
    assert "AssertionError: Torch not compiled with CUDA enabled" in lines[-2] and "  ..." in lines
    assert len(lines) < 20
    assert lines[-1].startswith(f"leanserve serve: logs kept in {tmp_path / 'session_latest' / 'logs'}")
    # Serve said nothing (e.g. a start-up timeout): the newest replica log's tail instead.
    serve_logs = tmp_path / "session_latest" / "logs" / "serve"
    serve_logs.mkdir(parents=True)
    (serve_logs / "replica_leanserve_LeanServer_abc.log").write_text(
        "INFO started\nERROR model did not load\n"
    )
    report = failure_report(TimeoutError("not RUNNING after 600 s"), {}, tmp_path)
    assert "last lines of" in report and "  ERROR model did not load" in report


def test_session_members_lists_a_new_session():
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert serve_cli.session_members(proc.pid) == [proc.pid]
        assert os.getpid() not in serve_cli.session_members(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)
    assert serve_cli.session_members(proc.pid) == []


# --- the supervisor, with a fake driver (no Ray) -----------------------------------------------------
# The fake driver starts a grandchild in its session (as Ray's processes are) and, on SIGTERM,
# reports and exits leaving the grandchild behind, or ignores SIGTERM ("stubborn").
FAKE_DRIVER = """
import json, signal, subprocess, sys, time
from runtime.serve_cli import _die_with_parent
payload = json.loads(sys.stdin.read())
_die_with_parent(payload["_parent_pid"])
grandchild = subprocess.Popen(["sleep", "600"])
def on_term(*_):
    print("drained", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if payload["fake_mode"] == "stubborn" else on_term)
print("ready", grandchild.pid, payload["api_key"], flush=True)
for _ in range(1200):
    time.sleep(0.1)
"""


def _supervisor(mode: str, drain_s: float = 0.5) -> subprocess.Popen:
    """`serve_cli.main` in its own session (signals to it never reach pytest), fake driver inside."""
    args = vars(_args(fake_mode=mode, api_key="k", graceful_shutdown_timeout=drain_s))
    code = (
        "import argparse, sys\n"
        "from runtime import serve_cli\n"
        f"serve_cli._DRIVER_CODE = {FAKE_DRIVER!r}\n"
        "serve_cli.SHUTDOWN_MARGIN_S = 1.0\n"
        f"sys.exit(serve_cli.main(argparse.Namespace(**{args!r})))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _ready(proc: subprocess.Popen) -> int:
    line = proc.stdout.readline()
    assert line.startswith("ready "), line + proc.stderr.read()
    _, grandchild, key = line.split()
    assert key == "k"  # the arguments arrive through the pipe
    return int(grandchild)


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def supervise():
    """`supervise(mode, drain_s)` -> (supervisor process, grandchild pid); all killed afterwards."""
    started: list[tuple[subprocess.Popen, int]] = []

    def start(mode: str, drain_s: float = 0.5) -> tuple[subprocess.Popen, int]:
        proc = _supervisor(mode, drain_s)
        started.append((proc, -1))
        started[-1] = (proc, _ready(proc))
        return started[-1]

    yield start
    for proc, grandchild in started:
        proc.kill()
        proc.wait(10)
        if grandchild > 0 and not _gone(grandchild, 0.1):
            os.kill(grandchild, signal.SIGKILL)


@pytest.mark.parametrize("target", ["process", "group"])
def test_supervisor_forwards_sigterm_and_clears_the_session(supervise, target):
    proc, grandchild = supervise("graceful")
    assert os.getsid(grandchild) != os.getsid(proc.pid)  # the driver's session is its own
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)  # the supervisor leads its group (start_new_session)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    assert proc.stdout.read().strip() == "drained"  # the driver handled the forwarded SIGTERM
    assert _gone(grandchild), "the leftover in the driver's session was not stopped"
    err = proc.stderr.read()
    assert "SIGTERM: draining" in err and "leftover Ray process(es)" in err


@pytest.mark.parametrize(
    ("drain_s", "signals", "message"),
    [
        (0.5, [signal.SIGTERM], "killing it"),  # not gone 0.5 s drain + 1 s margin after the signal
        (300.0, [signal.SIGINT, signal.SIGINT], "SIGINT again: stopping at once"),
    ],
)
def test_supervisor_kills_a_driver_that_does_not_stop(supervise, drain_s, signals, message):
    proc, grandchild = supervise("stubborn", drain_s)
    t0 = time.monotonic()
    for sig in signals:
        os.kill(proc.pid, sig)
        time.sleep(0.5)
    assert proc.wait(30) == 128 + signal.SIGKILL
    assert time.monotonic() - t0 < 15  # generous bound
    assert _gone(grandchild)
    assert message in proc.stderr.read()


def test_driver_drains_when_the_supervisor_is_killed(supervise):
    proc, _ = supervise("graceful")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.stdout.readline().strip() == "drained"  # PR_SET_PDEATHSIG -> SIGTERM
