"""The `leanserve` console script: fast help, version, registry dispatch, clean errors."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


# --- broken model directories: `leanserve info` and `leanserve serve` refuse them, naming the file ---


def _break_truncated(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])


def _rewrite_state(d: Path, edit: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    edit(state)
    save_file(state, str(d / "model.safetensors"))


def _wrong_shape(state: dict) -> None:
    import torch

    state["wpe.weight"] = torch.zeros(3, 3)


def _unexpected(state: dict) -> None:
    import torch

    state["bogus.weight"] = torch.zeros(2)


def _bad_config(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "n_heads": 0}))


BROKEN = {
    "truncated": (
        _break_truncated,
        r"model\.safetensors is truncated: header says \d+ kB of data, file has \d+ kB",
    ),
    "wrong-shape": (
        lambda d: _rewrite_state(d, _wrong_shape),
        r"model\.safetensors: tensor 'wpe\.weight' has shape \(3, 3\), config\.json implies \(64, 32\)",
    ),
    "missing-tensor": (
        lambda d: _rewrite_state(d, lambda s: s.pop("wte.weight")),
        r"model\.safetensors: tensor 'wte\.weight' is missing",
    ),
    "unexpected-tensor": (
        lambda d: _rewrite_state(d, _unexpected),
        r"model\.safetensors: unexpected tensor 'bogus\.weight'",
    ),
    "wrong-dtype": (
        lambda d: _rewrite_state(d, lambda s: s.update({"wpe.weight": s["wpe.weight"].double()})),
        r"model\.safetensors: tensor 'wpe\.weight' has dtype F64, the model expects F32",
    ),
    "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer\.json: file not found"),
    "corrupt-tokenizer": (
        lambda d: (d / "tokenizer.json").write_text('{"model": '),
        r"tokenizer\.json: does not load \(.*not valid JSON",
    ),
    "bad-config": (_bad_config, r"config\.json: invalid n_heads=0"),
}


@pytest.fixture
def broken_dir(request, tiny_model_dir, tmp_path) -> tuple[Path, str]:
    """A copy of the tiny test model, broken as the test's parameter says; (dir, expected message)."""
    import shutil

    breakage, message = BROKEN[request.param]
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    breakage(d)
    return d, message


def _leanserve(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    # A session of its own: if the check ever let a broken directory through, the Ray it started
    # goes down with the kill below, and nothing reaches pytest's process group.
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.monotonic() - t0


@pytest.mark.parametrize("broken_dir", sorted(BROKEN), indirect=True)
def test_info_and_serve_refuse_a_broken_model_directory(broken_dir, free_port) -> None:
    d, message = broken_dir
    info, _ = _leanserve("info", str(d))
    assert info.returncode == 2, info.stdout + info.stderr
    assert re.search(r"^leanserve info: error: .*" + message, info.stderr), info.stderr
    assert info.stdout == ""
    port = str(free_port())
    serve, elapsed = _leanserve("serve", str(d), "--grpc-port", port, "--http-port", str(free_port()),
                                "--metrics-port", str(free_port()), "--startup-timeout", "5")  # fmt: skip
    assert serve.returncode == 2, serve.stdout + serve.stderr
    assert re.search(r"^leanserve serve: error: .*" + message, serve.stderr, re.MULTILINE), serve.stderr
    assert "starting Ray" not in serve.stderr  # refused before Ray starts
    assert len(serve.stderr.strip().splitlines()) == 1  # one line, no traceback
    # Measured here: 0.2 s for a truncated file or a bad tokenizer/config, ~2 s when torch must
    # load to compare tensors (2 cores). The bound is generous against a busy machine.
    assert elapsed < 15, elapsed


def test_info_on_a_good_directory(tiny_model_dir) -> None:
    proc, _ = _leanserve("info", str(tiny_model_dir))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["name"] == "serve-tiny"
