"""Shared pytest configuration.

Kept minimal on purpose: nothing is read from or written to the environment at import
time. Markers (`slow`, `integration`) and the default timeout live in pyproject.toml.
"""

from __future__ import annotations

import socket
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """Returns a function giving a free TCP port on 127.0.0.1."""
    return _free_port
