"""Shared pytest configuration.

Kept minimal on purpose: nothing is read from or written to the environment at import
time. Markers (`slow`, `integration`, `cuda`) and the default timeout live in pyproject.toml.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest


def pytest_report_header(config) -> list[str]:
    """Prints the versions that matter for reproducing a failure (read from metadata, no imports)."""
    found = []
    for dist in ("torch", "ray", "grpcio", "onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return ["leanserve deps: " + ", ".join(found)]


# --- leaving the interpreter -----------------------------------------------------------------------
_session_status: list[int] = []


def pytest_collection_modifyitems(config, items) -> None:
    """Skip `cuda` tests, with the reason shown in the summary, where torch sees no GPU."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); scripts/gpu_check.sh runs these on one")
    for item in marked:
        item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Remembers the run's exit status for `pytest_unconfigure`."""
    _session_status.append(int(exitstatus))


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config) -> None:
    """Ends the process with pytest's exit status once the run is reported.

    First of the unconfigure hooks (the summary is printed and the cache written in
    `pytest_sessionfinish`, before this): the less teardown runs, the less can crash.

    The test process has loaded torch (inductor, AOTInductor runners), onnxruntime,
    grpcio (sync and aio, several event loops) and a Ray driver; tearing all of that
    down in the interpreter's finalisation crashed CI once after every test had passed
    (`1131 passed`, then exit 139, a segmentation fault in no test). So the process
    exits here, without finalisation, with the exit status pytest chose (5 for no
    tests stays 5). Set LEANSERVE_PYTEST_FINALIZE=1 to exit normally (to
    debug a crash at exit; scripts/test.sh sets PYTHONFAULTHANDLER, which prints it).
    """
    if not _session_status or os.environ.get("LEANSERVE_PYTEST_FINALIZE") == "1":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_session_status[-1])


# --- fixtures shared by the integration tests (serving, deploy, loadtest) -------------------------

_TINY_TEXT = (
    "In the beginning God created the heavens and the earth. The earth was formless and empty. "
    "Darkness was on the surface of the deep and God's Spirit was hovering over the surface of the waters. "
    'God said, "Let there be light," and there was light. God saw the light, and saw that it was good.\n'
) * 40


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny ODE + MoE model trained in a few seconds, once per test session."""
    from models.config import ModelConfig
    from models.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny-model")
    (root / "text.txt").write_text(_TINY_TEXT, encoding="utf-8")
    config = ModelConfig(
        name="serve-tiny", vocab_size=320, context_length=64, d_model=32, n_heads=4, d_ff=64,
        trunk="ode", min_steps=2, max_steps=4, block="sasp", ffn="moe", base_width=32, tree_depth=1,
    )  # fmt: skip
    tcfg = TrainConfig(
        iterations=20, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_interval=10, checkpoint_interval=20
    )
    train(config, tcfg, root / "model", text=root / "text.txt", progress=False)
    return root / "model"


@pytest.fixture(scope="session")
def calibrated_tiny_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """`tiny_model_dir` with a `profile.json` (a quick evaluate): tiers, a cost model, predictions."""
    import shutil

    from models.evaluate import evaluate

    root = tmp_path_factory.mktemp("tiny-calibrated") / "model"
    shutil.copytree(tiny_model_dir, root)
    text = str(tiny_model_dir.parent / "text.txt")
    evaluate(root, text=text, max_tokens=2048, latency_iters=2, calibrate_points=8)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Returns a function giving a free TCP port on 127.0.0.1."""
    return _free_port


@pytest.fixture(scope="session")
def ouro_tiny_dir(tmp_path_factory) -> Path:
    """The tiny random-weight Ouro directory of the golden values (HF layout, 3 shards, seed 0)."""
    from models.ouro_random import write_ouro_dir

    return write_ouro_dir(tmp_path_factory.mktemp("ouro") / "Ouro-tiny", "tiny", seed=0, shards=3)
