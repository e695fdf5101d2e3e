"""ONNX export: every block kind x FFN kind exports, validates and matches torch.

Export costs a few seconds per graph, so each configuration is exported once
(module-scoped cache) and every check on it reuses the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from models.config import ModelConfig
from models.export import ONNX_DIR, _parity_check, config_hash, export_onnx
from models.model import LeanLM

from .conftest import perturbed_model, tiny_config

BLOCKS = ["prenorm", "parallel", "sas", "sasp"]
FFNS = ["dense", "moe", "tree"]
# The three combinations the runtime parity tests also use run by default; the
# rest of the matrix is marked slow (about 4 s of export each on 2 cores).
FAST = {("prenorm", "dense"), ("sasp", "moe"), ("sas", "tree")}
# float32 graphs vs torch eager: different kernels and summation orders
# (the ONNX MoE / tree FFN evaluates every group and combines with weights).
TOL = 1e-4


def _case(block: str, ffn: str):
    marks = () if (block, ffn) in FAST else (pytest.mark.slow,)
    return pytest.param(block, ffn, marks=marks, id=f"{block}-{ffn}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export on first use: (block, ffn, trunk) -> (model, directory, manifest)."""
    cache: dict[tuple[str, str, str], tuple[LeanLM, Path, dict]] = {}

    def get(block: str, ffn: str, trunk: str = "ode"):
        key = (block, ffn, trunk)
        if key not in cache:
            model = perturbed_model(tiny_config(block=block, ffn=ffn, trunk=trunk))
            out = tmp_path_factory.mktemp(f"{block}-{ffn}-{trunk}")
            cache[key] = (model, out, export_onnx(model, out))
        return cache[key]

    return get


def _check_export(model: LeanLM, out: Path, manifest: dict) -> None:
    c: ModelConfig = model.config
    names = {"embed", "head", *(f"block_{k}" for k in range(c.n_blocks))}
    assert set(manifest["graphs"]) == names
    assert manifest["opset"] == 18
    assert manifest["config_hash"] == config_hash(c)
    assert manifest["n_blocks"] == c.n_blocks and manifest["ffn"] == c.ffn
    assert json.loads((out / ONNX_DIR / "manifest.json").read_text()) == manifest
    for name, g in manifest["graphs"].items():
        path = out / g["file"]
        assert path.is_file() and path.parent.name == ONNX_DIR
        if g["data"]:
            assert (out / g["data"]).is_file()
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
        assert [i.name for i in proto.graph.input] == g["inputs"]
        assert [o.name for o in proto.graph.output] == g["outputs"]
        if name.startswith("block_"):
            # R, T and S must stay symbolic for one graph to serve every call.
            dims = {
                i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in proto.graph.input
            }
            assert dims["x"] == ["R", "T", c.d_model]
            assert dims["past_k"] == ["R", c.n_heads, "S", c.head_dim]
            assert ("setting" in dims) == (c.ffn != "dense")
    assert _parity_check(model, out) <= TOL


@pytest.mark.parametrize(("block", "ffn"), [_case(b, f) for b in BLOCKS for f in FFNS])
def test_export_ode(exported, block: str, ffn: str) -> None:
    _check_export(*exported(block, ffn, "ode"))


def test_export_stack(exported) -> None:
    model, out, manifest = exported("prenorm", "dense", "stack")
    assert len([g for g in manifest["graphs"] if g.startswith("block_")]) == model.config.n_layers == 3
    _check_export(model, out, manifest)


def test_export_rejects_opset_17(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset=17"):
        export_onnx(perturbed_model(tiny_config()), tmp_path, opset=17)


def test_export_is_quiet_and_readable_whatever_the_umask(tmp_path: Path) -> None:
    """No "torchvision is not installed. Skipping torchvision::nms" lines (torch.onnx logs 4 per
    graph where torchvision is not installed), and the graphs are 0644 in a 0755 folder under umask 077."""
    import logging
    import os

    from models.export import _REGISTRATION_LOGGER

    records: list[logging.LogRecord] = []
    collector = logging.Handler()
    collector.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(_REGISTRATION_LOGGER)
    logger.addHandler(collector)  # sees what the logger's filters let through, as torch's handler does
    old = os.umask(0o077)
    try:
        export_onnx(perturbed_model(tiny_config(block="prenorm", ffn="dense")), tmp_path)
    finally:
        os.umask(old)
        logger.removeHandler(collector)
    assert not [r.getMessage() for r in records if "torchvision" in r.getMessage()]
    onnx_dir = tmp_path / ONNX_DIR
    assert onnx_dir.stat().st_mode & 0o777 == 0o755
    files = list(onnx_dir.iterdir())
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files)
