"""Training: loss goes down, resumption is exact, bad input fails clearly."""

from __future__ import annotations

import json

import pytest

from models.checkpoint import load_model
from models.config import ConfigError, ModelConfig
from models.data import DataError
from models.evaluate import evaluate, expert_settings
from models.train import TrainConfig, load_preset, preset_path, train

TEXT = (
    "In the beginning God created the heavens and the earth. The earth was formless and empty. "
    "Darkness was on the surface of the deep and God's Spirit was hovering over the surface of the waters. "
    'God said, "Let there be light," and there was light. God saw the light, and saw that it was good.\n'
) * 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _config(**kw) -> ModelConfig:
    base = dict(
        name="t",
        vocab_size=320,
        context_length=64,
        d_model=32,
        n_heads=4,
        d_ff=64,
        trunk="ode",
        min_steps=2,
        max_steps=4,
        block="sasp",
        ffn="moe",
        base_width=32,
        tree_depth=1,
    )
    base.update(kw)
    return ModelConfig(**base)


def _tcfg(**kw) -> TrainConfig:
    base = dict(
        iterations=20, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_interval=10, checkpoint_interval=5
    )
    base.update(kw)
    return TrainConfig(**base)


def test_twenty_steps_lower_the_loss_and_write_a_model(tmp_path, corpus):
    summary = train(_config(), _tcfg(), tmp_path / "m", text=corpus, progress=False)
    losses = summary["losses"]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    model = load_model(tmp_path / "m")
    assert model.config.extra["training"]["iterations"] == 20
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    }
    assert not (tmp_path / "m.train-state").exists()  # removed after a finished run


@pytest.mark.parametrize("ffn", ["moe", "tree"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus, ffn):
    full = train(_config(ffn=ffn), _tcfg(), tmp_path / "a", text=corpus, progress=False)["losses"]
    part = train(_config(ffn=ffn), _tcfg(), tmp_path / "b", text=corpus, progress=False, stop_after=10)
    assert part["stopped_at"] == 10 and not (tmp_path / "b").exists()
    assert (tmp_path / "b.train-state" / "state.safetensors").is_file()
    resumed = train(_config(ffn=ffn), _tcfg(), tmp_path / "b", text=corpus, progress=False)["losses"]
    assert resumed == pytest.approx(full, rel=1e-6, abs=1e-6)


def test_fixed_step_sampling_and_state_without_pickle(tmp_path, corpus):
    cfg = _tcfg(step_sampling="fixed", fixed_steps=3, iterations=6)
    train(_config(), cfg, tmp_path / "f", text=corpus, progress=False, keep_state=True)
    meta = json.loads((tmp_path / "f.train-state" / "state.json").read_text())
    assert meta["state"]["iteration"] == 6
    assert load_model(tmp_path / "f").config.extra["training"]["steps_range_trained"] == [3, 3]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"   \n\t ", "empty|whitespace"),
        (b"abc\x00def" * 10, "NUL|binary"),
        (b"\xff\xfe\xfa" * 50, "UTF-8"),
    ],
)
def test_bad_corpus_fails_clearly(tmp_path, content, match):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=match):
        train(_config(), _tcfg(), tmp_path / "m", text=bad, progress=False)
    with pytest.raises(DataError, match="does not exist|not found"):
        train(_config(), _tcfg(), tmp_path / "m", text=tmp_path / "missing.txt", progress=False)
    assert not (tmp_path / "m").exists()


def test_invalid_train_config_names_the_field():
    with pytest.raises(ConfigError, match="train.iterations"):
        TrainConfig(iterations=0)
    with pytest.raises(ConfigError, match="train.step_sampling"):
        TrainConfig(step_sampling="random")


def test_presets_load():
    for name in ("ode-tiny", "stack-tiny"):
        config, tcfg = load_preset(preset_path(name))
        assert config.name == name and tcfg.iterations > 0
    ode, _ = load_preset(preset_path("ode-tiny"))
    assert ode.trunk == "ode" and ode.parameterisation == "completep" and ode.step_range[1] >= 12


@pytest.mark.parametrize("ffn", ["moe", "tree", "dense"])
def test_eval_profile_covers_every_setting(tmp_path, corpus, ffn):
    train(_config(ffn=ffn), _tcfg(iterations=4), tmp_path / "m", text=corpus, progress=False)
    profile = evaluate(tmp_path / "m", max_tokens=256, latency_iters=2, calibrate_points=6)
    config = load_model(tmp_path / "m").config
    want = {(n, e) for n in range(2, 5) for e in expert_settings(config)}
    assert {(s["steps"], s["experts"]) for s in profile["settings"]} == want
    assert all(s["perplexity"] > 1 and s["ms_per_token"] > 0 for s in profile["settings"])
    assert set(profile["quality_tiers"]) == {"fast", "balanced", "best"}
    assert profile["quality_tiers"]["best"]["steps"] == 4
    assert json.loads((tmp_path / "m" / "profile.json").read_text()) == profile
    assert profile["cost_model"]["n_samples"] == 6
