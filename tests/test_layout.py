"""Import boundaries from DESIGN.md, checked statically with `ast`.

* `models/` is plain PyTorch: it never imports runtime, ray, grpc, prometheus_client or loadtest,
  not even lazily inside a function.
* The engine (`runtime/engine*`, `scheduler*`, `policy*`, `sampling*`) is testable on CPU without
  serving parts: it never imports ray or grpc.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MODELS_FORBIDDEN = {"runtime", "ray", "grpc", "prometheus_client", "loadtest"}
ENGINE_FORBIDDEN = {"ray", "grpc"}
ENGINE_GLOBS = ("engine*", "scheduler*", "policy*", "sampling*")


def imported_roots(source: str, filename: str = "<string>") -> set[str]:
    """Top-level names of every absolute import in `source` (relative imports stay in-package)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _is_forbidden(root: str, forbidden: set[str]) -> bool:
    # grpc_health, grpc_reflection, grpc_tools ship with grpc and count as grpc.
    return root in forbidden or ("grpc" in forbidden and root.startswith("grpc_"))


def violations(files: list[Path], forbidden: set[str]) -> list[str]:
    found = []
    for path in files:
        roots = imported_roots(path.read_text(encoding="utf-8"), filename=str(path))
        bad = sorted(r for r in roots if _is_forbidden(r, forbidden))
        if bad:
            found.append(f"{path.relative_to(REPO)} imports {', '.join(bad)}")
    return found


def _engine_files() -> list[Path]:
    runtime = REPO / "runtime"
    files: set[Path] = set()
    for pattern in ENGINE_GLOBS:
        for match in runtime.glob(pattern):
            if match.is_file() and match.suffix == ".py":
                files.add(match)
            elif match.is_dir():  # an engine package, e.g. runtime/engine/
                files.update(match.rglob("*.py"))
    return sorted(files)


def test_scanner_detects_forbidden_imports() -> None:
    source = (
        "import os, ray.serve\n"
        "from grpc import aio\n"
        "from . import layers\n"
        "def lazy():\n"
        "    import prometheus_client\n"
        "    from runtime.engine import Engine\n"
        "    import grpc_health.v1\n"
    )
    roots = imported_roots(source)
    assert roots == {"os", "ray", "grpc", "prometheus_client", "runtime", "grpc_health"}
    assert sorted(r for r in roots if _is_forbidden(r, MODELS_FORBIDDEN)) == [
        "grpc",
        "grpc_health",
        "prometheus_client",
        "ray",
        "runtime",
    ]


def test_models_is_plain_pytorch() -> None:
    files = sorted((REPO / "models").rglob("*.py"))
    assert files, "models/ has no .py files: the layout check would pass vacuously"
    assert violations(files, MODELS_FORBIDDEN) == []


def test_engine_has_no_serving_imports() -> None:
    # The engine files may not exist yet; the check applies to whichever do.
    assert violations(_engine_files(), ENGINE_FORBIDDEN) == []
