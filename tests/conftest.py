"""Shared pytest configuration.

Kept minimal on purpose: nothing is read from or written to the environment at import
time. Markers (`slow`, `integration`) and the default timeout live in pyproject.toml.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def pytest_report_header(config) -> list[str]:
    """Prints the versions that matter for reproducing a failure (read from metadata, no imports)."""
    found = []
    for dist in ("torch", "ray", "grpcio", "onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return ["leanserve deps: " + ", ".join(found)]
