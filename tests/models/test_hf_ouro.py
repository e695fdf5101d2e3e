"""Hugging Face Ouro directories (models/hf_ouro.py): the config mapping, and every broken or
unsupported directory refused at load naming the file and the field or tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.checkpoint import CheckpointError, check_model_dir, load_config, load_model
from models.hf_ouro import INDEX_FILE, config_from_hf, expected_hf_tensors
from models.ouro import OuroConfig
from models.ouro_random import hf_config, write_ouro_dir


@pytest.fixture
def ouro_dir(ouro_tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny directory, free to break."""
    return Path(shutil.copytree(ouro_tiny_dir, tmp_path / "Ouro-tiny"))


def _edit_config(model_dir: Path, **fields) -> None:
    path = model_dir / "config.json"
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def test_config_maps_onto_the_model_family(ouro_tiny_dir):
    c = load_config(ouro_tiny_dir)
    assert isinstance(c, OuroConfig)
    assert (c.name, c.vocab_size, c.context_length, c.d_model, c.d_ff) == ("Ouro-tiny", 288, 256, 64, 128)
    assert (c.loop_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (2, 4, 2, 16)
    assert c.step_range == (1, 4) and c.default_steps == 4  # steps = loops, 1..total_ut_steps
    assert c.kv_heads_per_step == 4 and c.expert_setting is None


def test_check_model_dir_reads_headers_only_and_returns_the_config(ouro_tiny_dir):
    assert check_model_dir(ouro_tiny_dir).step_range == (1, 4)


def test_early_exit_step_is_the_default_loop_count():
    c = config_from_hf(hf_config("tiny", early_exit_step=1), Path("config.json"))
    assert c.default_steps == 2 and c.step_range == (1, 4)


def test_rope_parameters_of_transformers_5_are_read():
    data = hf_config("tiny", rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    del data["rope_theta"]
    assert config_from_hf(data, Path("config.json")).rope_theta == 5e5


def test_a_single_file_checkpoint_without_an_index_loads(tmp_path):
    d = write_ouro_dir(tmp_path / "single", "tiny", seed=0, shards=1, tie_word_embeddings=True)
    assert not (d / INDEX_FILE).exists()
    m = load_model(d)
    assert m.lm_head is None and "lm_head.weight" not in expected_hf_tensors(m.config)


UNSUPPORTED = [
    ({"use_sliding_window": True}, "use_sliding_window=True"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types[1]='sliding_attention'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"early_exit_threshold": 0.5}, "early_exit_threshold=0.5"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"total_ut_steps": 0}, "total_ut_steps=0"),
    ({"early_exit_step": 4}, "early_exit_step=4"),
]


@pytest.mark.parametrize(("fields", "named"), UNSUPPORTED, ids=[u[1] for u in UNSUPPORTED])
def test_unsupported_configurations_fail_at_load_naming_the_field_and_value(ouro_dir, fields, named):
    _edit_config(ouro_dir, **fields)
    for load in (load_config, check_model_dir, load_model):
        with pytest.raises(CheckpointError) as e:
            load(ouro_dir)
        assert str(ouro_dir / "config.json") in str(e.value) and named in str(e.value)


def test_a_missing_field_is_named(ouro_dir):
    data = json.loads((ouro_dir / "config.json").read_text())
    del data["hidden_size"]
    (ouro_dir / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config\.json: field 'hidden_size' is missing"):
        load_config(ouro_dir)


def test_an_unknown_model_type_is_named(ouro_dir):
    _edit_config(ouro_dir, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config\.json: model_type='llama' is not supported.*'ouro'"):
        check_model_dir(ouro_dir)


def test_a_missing_shard_names_the_index_the_tensor_and_the_shard(ouro_dir):
    (ouro_dir / "model-00002-of-00003.safetensors").unlink()
    for load in (check_model_dir, load_model):
        with pytest.raises(CheckpointError) as e:
            load(ouro_dir)
        msg = str(e.value)
        assert INDEX_FILE in msg and "model-00002-of-00003.safetensors" in msg and "weight_map['model." in msg


def test_a_tensor_of_the_wrong_shape_names_the_shard_and_the_tensor(ouro_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    shard = ouro_dir / "model-00001-of-00003.safetensors"
    tensors = load_file(str(shard))
    name = "model.layers.0.self_attn.k_proj.weight"
    assert name in tensors
    tensors[name] = tensors[name][:16].clone()  # one kv head instead of two
    save_file(tensors, str(shard))
    for load in (check_model_dir, load_model):
        with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{name}' has shape \(16, 64\), config\.json implies \(32, 64\)"):  # fmt: skip  # noqa: E501
            load(ouro_dir)


def test_a_tensor_missing_from_the_index_is_named(ouro_dir):
    index = json.loads((ouro_dir / INDEX_FILE).read_text())
    del index["weight_map"]["model.early_exit_gate.bias"]
    (ouro_dir / INDEX_FILE).write_text(json.dumps(index))
    missing = r"index\.json: tensor 'model\.early_exit_gate\.bias' is missing"
    with pytest.raises(CheckpointError, match=missing):
        check_model_dir(ouro_dir)


def test_an_unexpected_tensor_is_named(ouro_dir):
    _edit_config(ouro_dir, tie_word_embeddings=True)  # the checkpoint still holds lm_head: tolerated
    assert load_model(ouro_dir).lm_head is None
    _edit_config(ouro_dir, tie_word_embeddings=False, num_hidden_layers=1, max_window_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.1\."):
        check_model_dir(ouro_dir)


def test_a_truncated_shard_is_named(ouro_dir):
    shard = ouro_dir / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard} is truncated"):
        check_model_dir(ouro_dir)


def test_a_missing_tokenizer_and_a_broken_generation_config_are_named(ouro_dir):
    (ouro_dir / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"generation_config\.json: not valid JSON"):
        check_model_dir(ouro_dir)
    (ouro_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: file not found"):
        check_model_dir(ouro_dir)
