"""Model directory I/O: exact round trip and a clear error for each breakage."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint import CheckpointError, load_model, save_model
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
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
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
