"""setuptools hook: generate the gRPC stubs while building (metadata lives in pyproject.toml)."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop


def _generate() -> None:
    # runtime/proto_build.py imports nothing from the package, so it can be loaded by path here.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from runtime.proto_build import generate

    generate()


class BuildPyWithStubs(build_py):
    """`build_py` that first writes runtime/_generated/ from proto/ (wheels, images)."""

    def run(self) -> None:
        _generate()
        super().run()


class DevelopWithStubs(develop):
    """`develop` (legacy editable installs) that also writes the stubs."""

    def run(self) -> None:
        _generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs, "develop": DevelopWithStubs})
