"""Generate the Python gRPC stubs of `proto/leanserve/v1/generation.proto`.

Stubs are never committed: they are generated into the git-ignored package
`runtime/_generated/` (`generation_pb2.py`, `generation_pb2_grpc.py`, `.pyi`)

* at build/install time, by the setuptools `build_py` hook in `setup.py`
  (so wheels and container images carry them), and
* lazily, by `load_stubs()`, when they are missing or older than the .proto
  (so a fresh clone with `pip install -e .` works without a build step).

protoc's Python plugin writes absolute imports (`from leanserve.v1 import
generation_pb2`) and module names (`leanserve.v1.generation_pb2`, used as the
message classes' `__module__`, which pickle follows), which only work with the
output folder on `sys.path`. We rewrite both to the real package, so the stubs import as
`runtime._generated.generation_pb2_grpc` from anywhere, including the Ray
Serve proxy actor, which imports the servicer function by that dotted path.

Run by hand: `python -m runtime.proto_build` (prints the generated files).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILE = PROTO_ROOT / "leanserve" / "v1" / "generation.proto"
OUT_DIR = Path(__file__).resolve().parent / "_generated"
PACKAGE = "runtime._generated"
# Dotted path of the servicer registration function, as Ray's gRPC proxy wants it: the
# generated one with malformed requests answered INVALID_ARGUMENT (runtime/grpc_servicer.py).
SERVICER_FUNCTION = "runtime.grpc_servicer.add_text_generation_servicer"
HEALTH_SERVICER_FUNCTION = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"

_GENERATED = ("generation_pb2.py", "generation_pb2_grpc.py", "generation_pb2.pyi")


def stubs_are_current(out_dir: Path = OUT_DIR, proto: Path = PROTO_FILE) -> bool:
    """True when every generated file exists and is newer than the .proto."""
    if not proto.exists():  # an installed wheel ships stubs but no proto/: trust them
        return all((out_dir / name).exists() for name in _GENERATED)
    src = proto.stat().st_mtime
    return all((out_dir / n).exists() and (out_dir / n).stat().st_mtime >= src for n in _GENERATED)


def generate(out_dir: Path = OUT_DIR, proto: Path = PROTO_FILE, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (from grpcio-tools) and write the stubs package.

    Writes to a temporary folder first and renames file by file, so a
    concurrent importer (e.g. two Ray workers starting) never sees a half file.

    Returns:
        The generated files.

    Raises:
        RuntimeError: protoc failed (its message says why, e.g. a syntax error).
    """
    from grpc_tools import protoc  # build-time dependency, imported only when generating

    # Well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    include = Path(protoc.__file__).resolve().parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".proto-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        gen = Path(tmp) / proto.relative_to(proto_root).parent
        grpc_file = gen / "generation_pb2_grpc.py"
        text = grpc_file.read_text(encoding="utf-8")
        # Package-relative import instead of protoc's `from leanserve.v1 import ...`.
        text = re.sub(r"^from leanserve\.v1 import ", "from . import ", text, flags=re.M)
        grpc_file.write_text(text, encoding="utf-8")
        # The message classes' __module__ comes from this string; Ray pickles messages between
        # the proxy and the replica, and pickle needs a module path that really imports.
        pb2_file = gen / "generation_pb2.py"
        text = pb2_file.read_text(encoding="utf-8")
        text = text.replace("'leanserve.v1.generation_pb2'", f"'{PACKAGE}.generation_pb2'")
        pb2_file.write_text(text, encoding="utf-8")
        init = out_dir / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC stubs (see runtime/proto_build.py); do not edit."""\n')
        written = []
        for name in _GENERATED:
            os.replace(gen / name, out_dir / name)
            written.append(out_dir / name)
    return written


def load_stubs() -> tuple[ModuleType, ModuleType]:
    """Import `(generation_pb2, generation_pb2_grpc)`, generating them first if needed."""
    if not stubs_are_current():
        generate()
        importlib.invalidate_caches()
        for name in (f"{PACKAGE}.generation_pb2", f"{PACKAGE}.generation_pb2_grpc"):
            sys.modules.pop(name, None)
    pb2 = importlib.import_module(f"{PACKAGE}.generation_pb2")
    pb2_grpc = importlib.import_module(f"{PACKAGE}.generation_pb2_grpc")
    return pb2, pb2_grpc


if __name__ == "__main__":
    for path in generate():
        print(path)
