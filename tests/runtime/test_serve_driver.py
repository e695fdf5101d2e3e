"""`leanserve serve`'s driver (runtime/serve_driver.py): the no-profile warning before Ray starts
(start_local stubbed), and the report of an app that did not start (no Ray here)."""

from __future__ import annotations

import argparse

import pytest

from runtime import serve_driver
from runtime.cli import build_parser
from runtime.serve_driver import failure_report


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_serve_warns_when_the_model_has_no_profile(tiny_model_dir, monkeypatch, capsys):
    """The driver says so before starting Ray (here start_local is stubbed to stop right there)."""
    assert not (tiny_model_dir / "profile.json").exists()

    class ReachedError(Exception):
        pass

    def stop_here(*args, **kwargs):
        raise ReachedError

    monkeypatch.setattr(serve_driver, "start_local", stop_here)
    monkeypatch.setattr(serve_driver.signal, "signal", lambda *a: None)  # keep pytest's handlers
    with pytest.raises(ReachedError):
        serve_driver.run(_parse(str(tiny_model_dir)))
    err = capsys.readouterr().err
    assert f"warning: {tiny_model_dir} has no profile.json" in err
    assert "uncalibrated" in err and f"leanserve eval {tiny_model_dir}" in err


def test_serve_is_quiet_about_a_calibrated_model(calibrated_tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(serve_driver, "start_local", lambda *a, **k: (_ for _ in ()).throw(LookupError))
    monkeypatch.setattr(serve_driver.signal, "signal", lambda *a: None)
    with pytest.raises(LookupError):
        serve_driver.run(_parse(str(calibrated_tiny_model_dir)))
    assert "profile" not in capsys.readouterr().err


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
