"""`leanserve serve` is quiet: a clean start, one request and a SIGTERM stop print no warning or
error line (Ray's "Connecting to existing Serve app ... will not be applied" on start and its
"Task ServeController.graceful_shutdown failed ... killed by `ray.kill`" on every shutdown were).

The real CLI as a subprocess (supervisor, driver, Ray, Serve, the app) on free 127.0.0.1 ports,
serving a calibrated model (one without profile.json is warned about, rightly); every wait is
bounded and whatever is left is killed at the end.
"""

from __future__ import annotations

import json
import re
import signal
import urllib.request

import pytest

from tests.runtime.test_shutdown_integration import Server, _ports

pytestmark = pytest.mark.integration

# A log line's level as Ray and Python's logging print it ("WARNING 2026-...", "[WARNING]",
# "(raylet) ... failed"), or a word leanserve itself would use ("warning:", "error:").
NOISE = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|Traceback)\b|\bwarning:|\berror:|\(raylet\)", re.I)


def test_clean_start_request_and_stop_print_no_warning_or_error(calibrated_tiny_model_dir, free_port):
    server = Server(calibrated_tiny_model_dir, _ports(free_port), "--graceful-shutdown-timeout", "10")
    sessions: list[int] = []
    try:
        assert server.ready.wait(300), "not ready after 300 s:\n" + server.output()
        sessions.append(server.driver_pid())
        body = json.dumps({"prompt": "In the beginning", "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.ports['http']}/v1/completions",
            data=body,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            answer = json.loads(resp.read())
        assert answer["choices"][0]["finish_reason"] == "length"
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit(60) == 0, server.output()
    finally:
        server.stop(sessions)
    output = server.output()
    assert "leanserve serve: drained" in output  # the whole cycle ran
    noisy = [line for line in output.splitlines() if NOISE.search(line)]
    assert not noisy, "\n".join(noisy)


def test_the_noise_pattern_catches_what_ray_printed():
    """The two lines of the issue, as Ray printed them, and leanserve's own warning form."""
    assert NOISE.search(
        "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite "
        "retries remaining, so the task will be retried. Error: The actor is dead because it was killed "
        "by `ray.kill`."
    )
    assert NOISE.search("WARNING 2026-12-03 10:31:58,824 serve 7845 -- something")
    assert NOISE.search("leanserve serve: warning: m has no profile.json")
    assert not NOISE.search("leanserve serve: drained in 0.1 s; shutting down ...")
    assert not NOISE.search("INFO 2026-12-03 10:31:58,748 serve 7845 -- Started Serve in namespace")
