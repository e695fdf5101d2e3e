"""The `leanserve` console script: fast help, version, registry dispatch, clean errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points, version
from pathlib import Path

import pytest

from runtime import cli

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "grpc", "onnxruntime", "prometheus_client", "numpy")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from runtime.cli import main\n"
        "rc = main(['--help'])\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "usage: leanserve" in proc.stdout
    assert "HEAVY []" in proc.stdout, proc.stdout


def test_help_import_time() -> None:
    # -X importtime lists every imported module on stderr: a second, independent check.
    proc = _run("-X", "importtime", "-c", "import sys, runtime.cli; sys.exit(runtime.cli.main(['--help']))")
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "runtime.cli" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_python_dash_m() -> None:
    proc = _run("-m", "runtime.cli", "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("leanserve ")


def test_console_script_points_at_main() -> None:
    (script,) = entry_points(group="console_scripts", name="leanserve")
    assert script.value == "runtime.cli:main"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"leanserve {version('leanserve')}"
    assert version("leanserve") == "0.1.0"


# --- a temporary command registered against this module ------------------------------------------

CALLS: list[argparse.Namespace] = []


def fake_command(args: argparse.Namespace) -> int:
    CALLS.append(args)
    if args.fail == "value":
        raise ValueError("steps=99 is out of range [1, 16]")
    if args.fail == "missing":
        raise FileNotFoundError("model directory /nope does not exist")
    if args.fail == "bug":
        raise RuntimeError("a bug")
    return args.code


def _add_fake_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--code", type=int, default=0)
    parser.add_argument("--fail", choices=["value", "missing", "bug"], default=None)


@pytest.fixture
def fake() -> Iterator[str]:
    name = "fake-test-command"
    cli.register(name, "a command used by tests", _add_fake_arguments, f"{__name__}:fake_command")
    CALLS.clear()
    yield name
    cli.unregister(name)


def test_dispatch_calls_target_with_namespace(fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([fake, "--code", "7"]) == 7
    assert len(CALLS) == 1
    assert CALLS[0].code == 7
    assert cli.main(["--help"]) == 0
    assert fake in capsys.readouterr().out


def test_register_rejects_duplicates_and_bad_targets(fake: str) -> None:
    with pytest.raises(ValueError, match="already registered"):
        cli.register(fake, "again", _add_fake_arguments, f"{__name__}:fake_command")
    with pytest.raises(ValueError, match="module:function"):
        cli.register("other-test-command", "bad", _add_fake_arguments, "no_colon_here")
    assert [c.name for c in cli.COMMANDS].count(fake) == 1
    assert "other-test-command" not in [c.name for c in cli.COMMANDS]


@pytest.mark.parametrize(
    ("kind", "message"),
    [("value", "steps=99 is out of range [1, 16]"), ("missing", "model directory /nope does not exist")],
)
def test_user_errors_are_clean(
    fake: str, kind: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([fake, "--fail", kind]) == 2
    err = capsys.readouterr().err
    assert err == f"leanserve {fake}: error: {message}\n"


def test_debug_shows_traceback(fake: str) -> None:
    with pytest.raises(ValueError, match="steps=99"):
        cli.main(["--debug", fake, "--fail", "value"])
    with pytest.raises(ValueError, match="steps=99"):
        cli.main([fake, "--fail", "value", "--debug"])


def test_other_exceptions_are_not_swallowed(fake: str) -> None:
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([fake, "--fail", "bug"])


def test_usage_errors_exit_2(fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([fake, "--code", "not-an-int"]) == 2
    assert cli.main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert CALLS == []
