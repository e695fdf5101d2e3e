"""Model directory I/O: exact round trip and a clear error for each breakage."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint import (
    CheckpointError,
    check_model_dir,
    expected_tensors,
    load_config,
    load_model,
    save_model,
)
from models.model import LeanLM


@pytest.fixture
def saved(tmp_path, tiny, make_model):
    model = make_model(tiny(trunk="ode", block="sas", ffn="moe"))
    path = save_model(model, tmp_path / "m", tokenizer_json='{"fake": true}')
    return model, path


def test_round_trip_is_exact(saved):
    model, path = saved
    loaded = load_model(path)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(tokens, steps=3).logits, loaded(tokens, steps=3).logits)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_resave_keeps_other_files_and_leaves_no_temporaries(saved):
    model, path = saved
    (path / "profile.json").write_text("{}")
    save_model(model, path)
    assert (path / "profile.json").read_text() == "{}"
    assert [p.name for p in path.parent.iterdir()] == ["m"]


def test_missing_files(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: file not found"):
        load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file not found"):
        load_model(path)
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_model(path / "nope")


def test_truncated_safetensors(saved):
    _, path = saved
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:1000])  # inside the header
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors is truncated: header says it is \d+ bytes long"
    ):
        load_model(path)
    weights.write_bytes(data[: len(data) // 2])  # inside the tensor data
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors is truncated: header says \d+ kB of data, file has"
    ):
        load_model(path)


def test_garbage_safetensors(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(path)


def test_wrong_shape_names_the_tensor(saved):
    model, path = saved
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["wpe.weight"] = torch.zeros(3, 3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'wpe\.weight' has shape \(3, 3\)"):
        load_model(path)


def test_missing_and_unexpected_tensors(saved):
    model, path = saved
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["blocks.0.attn.alpha"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.attn\.alpha' is missing"):
        load_model(path)
    state["blocks.0.attn.alpha"] = model.blocks[0].attn.alpha.detach().clone()
    state["bogus"] = torch.zeros(1)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'bogus'"):
        load_model(path)


def test_config_that_does_not_match_weights(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["d_ff"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape .* config\.json implies"):
        load_model(path)


def test_invalid_config(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["block"] = "transformer++"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid block='transformer\+\+'"):
        load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(path)


def test_no_pickle_is_ever_loaded(saved, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert isinstance(load_model(saved[1]), LeanLM)


# --- check_model_dir: every broken directory is refused without loading weights ------------------


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    from models.tokenizer import train_tokenizer

    text = " ".join(f"header{i % 37} tensor{i % 53} shape{i % 29}" for i in range(400))
    tok = train_tokenizer(text, vocab_size=320)
    assert tok.get_vocab_size() > 310  # the oversized-vocabulary test needs ids >= 300
    return tok.to_str()


@pytest.fixture
def model_dir(tmp_path, tiny, make_model, tokenizer_json):
    """A complete, valid model directory (real tokenizer, profile.json)."""
    model = make_model(tiny(trunk="ode", block="sas", ffn="moe", vocab_size=320))
    return save_model(
        model, tmp_path / "m", tokenizer_json=tokenizer_json, extra_files={"profile.json": "{}"}
    )


def _state(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_valid_directory_passes_and_returns_its_config(model_dir):
    config = check_model_dir(model_dir)
    assert config.vocab_size == 320 and config.trunk == "ode"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(trunk="ode", block="sas", ffn="moe"),
        dict(trunk="ode", block="sasp", ffn="tree", n_shared_blocks=2),
        dict(trunk="stack", block="prenorm", ffn="dense", tie_embeddings=False),
        dict(trunk="stack", block="parallel", ffn="moe", norm="layernorm"),
    ],
)
def test_expected_tensors_match_a_real_model(tiny, overrides):
    """The meta-device state dict has exactly the names, shapes and dtypes of a real one."""
    config = tiny(**overrides)
    real = {k: (tuple(v.shape), v.dtype) for k, v in LeanLM(config).state_dict().items()}
    dtypes = {torch.float32: "F32"}
    assert expected_tensors(config) == {k: (shape, dtypes[dt]) for k, (shape, dt) in real.items()}


def test_truncated_weights_are_named_quickly(model_dir):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    t0 = time.perf_counter()
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors is truncated: header says .* of data, file has"
    ):
        check_model_dir(model_dir)
    assert time.perf_counter() - t0 < 3.0  # reads the header only (generous bound)


def test_corrupt_weights(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        check_model_dir(model_dir)
    weights.write_bytes(struct.pack("<Q", 6) + b"{nope}" + b"\x00" * 8)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header \(not JSON"):
        check_model_dir(model_dir)
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    with pytest.raises(
        CheckpointError, match=r"tensor 'a': F32 \(4,\) needs 16 bytes, its data_offsets span 8"
    ):
        check_model_dir(model_dir)


def test_trailing_bytes_after_the_data_are_corruption(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"junk")
    with pytest.raises(CheckpointError, match=r"corrupt safetensors file: 4 bytes after the last tensor"):
        check_model_dir(model_dir)


def test_wrong_shape_tensor(model_dir):
    state = _state(model_dir)
    state["wpe.weight"] = torch.zeros(3, 3)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'wpe\.weight' has shape \(3, 3\), config\.json implies \(40, 32\)",
    ):
        check_model_dir(model_dir)


def test_missing_tensor(model_dir):
    state = _state(model_dir)
    del state["wte.weight"]
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor 'wte\.weight' is missing \(1 missing\)"
    ):
        check_model_dir(model_dir)


def test_unexpected_tensor(model_dir):
    state = _state(model_dir)
    state["extra.bias"] = torch.zeros(2)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'extra\.bias'"):
        check_model_dir(model_dir)


def test_wrong_dtype_tensor(model_dir):
    state = _state(model_dir)
    state["wpe.weight"] = state["wpe.weight"].half()
    save_file(state, str(model_dir / "model.safetensors"))
    message = r"model\.safetensors: tensor 'wpe\.weight' has dtype F16, the model expects F32"
    with pytest.raises(CheckpointError, match=message):
        check_model_dir(model_dir)
    with pytest.raises(CheckpointError, match=message):  # loading refuses it too (no silent cast)
        load_model(model_dir)


def test_missing_tokenizer(model_dir):
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: file not found"):
        check_model_dir(model_dir)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"tokenizer\.json: does not load \(.*not valid JSON"),
        ('{"fake": true}', r"tokenizer\.json: does not load \(.*not a valid tokenizers JSON"),
        ("", r"tokenizer\.json: does not load"),
    ],
)
def test_corrupt_tokenizer(model_dir, content, message):
    (model_dir / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        check_model_dir(model_dir)


def test_tokenizer_larger_than_the_vocabulary(tmp_path, tiny, make_model, tokenizer_json):
    model = make_model(tiny(vocab_size=300))
    path = save_model(model, tmp_path / "small", tokenizer_json=tokenizer_json)
    with pytest.raises(
        CheckpointError, match=r"tokenizer\.json: vocabulary has ids up to 3\d\d .* vocab_size=300"
    ):
        check_model_dir(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: {**c, "block": "transformer++"}, r"config\.json: invalid block='transformer\+\+'"),
        (lambda c: {**c, "d_model": -1}, r"config\.json: invalid d_model=-1"),
        (lambda c: {**c, "no_such_field": 1}, r"config\.json: .*no_such_field"),
        (lambda c: [c], r"config\.json: must hold a JSON object, not list"),
        (lambda c: "{oops", r"config\.json: not valid JSON"),
    ],
)
def test_bad_config(model_dir, edit, message):
    path = model_dir / "config.json"
    new = edit(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(CheckpointError, match=message):
        check_model_dir(model_dir)


def test_config_for_another_model(model_dir):
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "d_ff": 128}))
    with pytest.raises(
        CheckpointError, match=r"tensor .* has shape \(4, 32, 64\), config\.json implies \(4, 32, 128\)"
    ):
        check_model_dir(model_dir)


def test_missing_directory_and_files(model_dir):
    with pytest.raises(CheckpointError, match="model directory not found"):
        check_model_dir(model_dir / "nope")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: file not found"):
        check_model_dir(model_dir)


@pytest.mark.parametrize("name", ["profile.json", "cost.json"])
def test_optional_json_files_must_parse(model_dir, name):
    (model_dir / name).write_text("{truncated")
    with pytest.raises(CheckpointError, match=rf"{name}: not valid JSON"):
        check_model_dir(model_dir)
    (model_dir / name).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=rf"{name}: must hold a JSON object, not list"):
        check_model_dir(model_dir)


def _tiny_onnx_graph(path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(path))


def test_onnx_directory_is_checked_where_present(model_dir):
    from models.export import MANIFEST_FORMAT, config_hash

    check_model_dir(model_dir)  # no onnx/: fine for the torch backend...
    with pytest.raises(CheckpointError, match=r"onnx/manifest\.json: file not found"):
        check_model_dir(model_dir, require_onnx=True)  # ...not for the onnx one
    onnx_dir = model_dir / "onnx"
    onnx_dir.mkdir()
    _tiny_onnx_graph(onnx_dir / "embed.onnx")
    manifest = {
        "format": MANIFEST_FORMAT,
        "config_hash": config_hash(load_config(model_dir)),
        "graphs": {"embed": {"file": "onnx/embed.onnx", "data": None}},
    }
    (onnx_dir / "manifest.json").write_text(json.dumps(manifest))
    check_model_dir(model_dir, require_onnx=True)
    (onnx_dir / "embed.onnx").write_bytes(b"\xff\xfe not protobuf")
    with pytest.raises(CheckpointError, match=r"embed\.onnx: not a valid ONNX graph 'embed'"):
        check_model_dir(model_dir)
    (onnx_dir / "manifest.json").write_text(json.dumps({**manifest, "config_hash": "0" * 64}))
    with pytest.raises(CheckpointError, match=r"manifest\.json: exported for a different config\.json"):
        check_model_dir(model_dir)
    (onnx_dir / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"manifest\.json: not valid JSON"):
        check_model_dir(model_dir)


def test_demo_models_pass():
    from pathlib import Path

    zoo = Path(__file__).resolve().parents[2] / "models" / "zoo"
    for name in ("ode-tiny", "stack-tiny"):
        assert check_model_dir(zoo / name).name == name


def test_save_model_writes_with_the_umask_like_any_file(tmp_path, tiny):
    """Directory 0777 and files 0666 less the umask (not mkdtemp's 0700, safetensors' 0600)."""
    import os

    from models.checkpoint import save_model
    from models.model import LeanLM

    old = os.umask(0o022)
    try:
        save_model(LeanLM(tiny()), tmp_path / "m")
    finally:
        os.umask(old)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()} == {
        "config.json": 0o644,
        "model.safetensors": 0o644,
    }
