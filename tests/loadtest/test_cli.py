"""`leanserve loadtest` arguments: parsed into a SweepConfig; the module imports nothing heavy."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from loadtest.cli import add_arguments, config_from_args


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_arguments_map_onto_the_sweep_config() -> None:
    cfg = config_from_args(
        _parse(
            "--steps",
            "2,6,12",
            "--experts",
            "all",
            "--tiers",
            "fast,best",
            "--rates",
            "1,2.5",
            "--slo",
            "ttft=0.3,itl=0.02,e2e=3",
            "--prompt-lengths",
            "uniform:4:32",
            "--overload",
            "--requests",
            "7",
            "--duration",
            "5",
            "--no-progress",
        )  # fmt: skip
    )
    assert cfg.steps == [2, 6, 12] and cfg.experts is None and cfg.tiers == ["fast", "best"]
    assert cfg.rates == [1.0, 2.5] and cfg.overload and cfg.max_requests == 7 and cfg.duration_s == 5
    assert (cfg.slo.ttft, cfg.slo.itl, cfg.slo.e2e) == (0.3, 0.02, 3.0)
    assert (cfg.prompt_lengths.low, cfg.prompt_lengths.high) == (4, 32) and not cfg.progress
    defaults = config_from_args(_parse())
    assert defaults.steps is None and defaults.experts == [] and defaults.target == "127.0.0.1:9000"
    with pytest.raises(SystemExit):
        _parse("--steps", "two")
    with pytest.raises(ValueError, match="rate"):
        config_from_args(_parse("--rate", "0"))


def test_cli_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, loadtest.cli; "
        "heavy = {'grpc', 'hdrh', 'matplotlib', 'torch', 'locust', 'aiohttp', 'numpy'} & set(sys.modules); "
        "print(sorted(heavy)); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
