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


# --- issue 19: your own model, end to end ------------------------------------------------------------


def _modes(root):
    """{relative path: mode} of everything below root, root included."""
    out = {".": root.stat().st_mode & 0o777}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = p.stat().st_mode & 0o777
    return out


def test_everything_train_writes_is_readable_whatever_the_umask(tmp_path, corpus):
    import os

    old = os.umask(0o077)  # as a root shell with a strict umask: files would be 0600, dirs 0700
    try:
        train(_config(), _tcfg(iterations=5), tmp_path / "m", text=corpus, progress=False, keep_state=True)
    finally:
        os.umask(old)
    for root in (tmp_path / "m", tmp_path / "m.train-state"):
        modes = _modes(root)
        assert "model.safetensors" in modes or "state.safetensors" in modes
        for name, mode in modes.items():
            want = 0o755 if (root / name).is_dir() else 0o644
            assert mode == want, (root, name, oct(mode))


def test_the_corpus_path_is_recorded_absolute_and_eval_finds_it_from_elsewhere(tmp_path, corpus, monkeypatch):
    import shutil

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(corpus, work / "my.txt")
    monkeypatch.chdir(work)
    train(_config(), _tcfg(iterations=4), tmp_path / "m", text="my.txt", progress=False)
    recorded = load_model(tmp_path / "m").config.extra["training"]["text"]
    assert recorded == str(work / "my.txt")
    monkeypatch.chdir(tmp_path)  # another directory: the relative "my.txt" would not be found here
    profile = evaluate(tmp_path / "m", max_tokens=256, latency_iters=2, calibrate_points=6)
    assert profile["settings"]


def test_a_recorded_corpus_that_is_gone_is_named(tmp_path, corpus):
    import shutil

    text = tmp_path / "gone.txt"
    shutil.copy(corpus, text)
    train(_config(), _tcfg(iterations=2), tmp_path / "m", text=text, progress=False)
    text.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{text}: the training corpus recorded in .*--text PATH"):
        evaluate(tmp_path / "m", max_tokens=256, latency_iters=2, calibrate_points=6)


def test_a_too_small_corpus_says_which_split_and_how_much_text(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(TEXT[:2100], encoding="utf-8")  # validation: one 52-character chunk
    with pytest.raises(DataError) as e:
        train(_config(), _tcfg(seq_len=32), tmp_path / "m", text=small, progress=False)
    message = str(e.value)
    assert "the validation split has" in message and "needs at least seq_len + 1 = 33 tokens" in message
    assert "2,100-byte corpus" in message and "a corpus of about 81,920 bytes is enough" in message
    assert str(small) in message
    assert not (tmp_path / "m").exists()


def test_eval_out_writes_elsewhere_and_a_tracked_profile_is_not_replaced_by_default(tmp_path, corpus):
    import subprocess

    train(_config(), _tcfg(iterations=2), tmp_path / "m", text=corpus, progress=False)
    kw = dict(max_tokens=256, latency_iters=2, calibrate_points=6)
    evaluate(tmp_path / "m", out=tmp_path / "elsewhere" / "p.json", **kw)
    assert (tmp_path / "elsewhere" / "p.json").is_file() and not (tmp_path / "m" / "profile.json").exists()
    evaluate(tmp_path / "m", **kw)  # untracked: in place
    assert (tmp_path / "m" / "profile.json").stat().st_mode & 0o777 == 0o644
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "m/profile.json"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "profile"], cwd=tmp_path, check=True)
    before = (tmp_path / "m" / "profile.json").read_bytes()
    with pytest.raises(ValueError, match=r"profile.json is tracked by git: .*--out"):
        evaluate(tmp_path / "m", **kw)
    assert (tmp_path / "m" / "profile.json").read_bytes() == before
    evaluate(tmp_path / "m", out=tmp_path / "m" / "profile.json", **kw)  # named: replaced


def test_training_says_what_it_does_and_validates_a_short_run(tmp_path, corpus, capsys):
    # 6 iterations with eval_interval 10: the validation loss comes at the end, never "nan".
    summary = train(_config(), _tcfg(iterations=6, eval_interval=10), tmp_path / "m", text=corpus)
    err = capsys.readouterr().err
    assert "every 10 iterations and at the end" in err
    assert "nan" not in err
    assert summary["val_losses"] == [(6, pytest.approx(summary["val_losses"][0][1]))]
    # The bar's loss is the reported final loss: the mean of the last LOSS_WINDOW iterations.
    from models.train import LOSS_WINDOW, recent_loss

    assert summary["final_train_loss"] == recent_loss(summary["losses"])
    assert f"loss={sum(summary['losses'][-LOSS_WINDOW:]) / 6:.3f}" in err


def test_a_stop_saves_the_state_and_the_next_run_says_it_resumes(tmp_path, corpus, capsys):
    import threading

    stop = threading.Event()
    stop.set()
    part = train(_config(), _tcfg(), tmp_path / "m", text=corpus, progress=False, stop_after=3)
    assert part["stopped_at"] == 3
    again = train(_config(), _tcfg(), tmp_path / "m", text=corpus, stop=stop)
    assert again["stopped_at"] == 3 and again["state_dir"] == str(tmp_path / "m.train-state")
    assert f"resuming from {tmp_path / 'm.train-state'} at iteration 3/20" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_retraining_drops_the_profile_of_the_old_weights(tmp_path, corpus):
    train(_config(), _tcfg(iterations=2), tmp_path / "m", text=corpus, progress=False)
    (tmp_path / "m" / "profile.json").write_text("{}")
    train(_config(), _tcfg(iterations=2), tmp_path / "m", text=corpus, progress=False, resume=False)
    assert not (tmp_path / "m" / "profile.json").exists()


def _preset(tmp_path, **train_overrides):
    config = _config(name="preset-name").to_dict()
    config.pop("extra", None)
    path = tmp_path / "preset.json"
    path.write_text(json.dumps({"model": config, "train": {**_tcfg().__dict__, **train_overrides}}))
    return path


def _train_cli(*argv):
    from models.train import cli_main
    from runtime.cli import build_parser

    return cli_main(build_parser().parse_args(["train", *argv]))


def test_train_name_goes_into_the_config_and_a_profile_is_written(tmp_path, corpus, capsys):
    out = tmp_path / "mine"
    assert _train_cli(str(_preset(tmp_path, iterations=4)), "--name", "my-model", "--out", str(out),
                      "--text", str(corpus)) == 0  # fmt: skip
    assert load_model(out).config.name == "my-model"
    profile = json.loads((out / "profile.json").read_text())
    assert profile["model"] == "my-model" and set(profile["quality_tiers"]) == {"fast", "balanced", "best"}
    assert (out / "profile.json").stat().st_mode & 0o777 == 0o644
    captured = capsys.readouterr()
    assert f"wrote {out} (my-model)" in captured.out and f"wrote {out / 'profile.json'}" in captured.out


def test_train_no_profile_says_the_model_serves_uncalibrated(tmp_path, corpus, capsys):
    out = tmp_path / "m"
    assert _train_cli(str(_preset(tmp_path, iterations=2)), "--out", str(out), "--text", str(corpus),
                      "--no-profile") == 0  # fmt: skip
    assert load_model(out).config.name == "preset-name" and not (out / "profile.json").exists()
    assert "uncalibrated" in capsys.readouterr().err


def test_sigterm_saves_the_state_and_says_so(tmp_path, corpus):
    """A real `leanserve train` process: SIGTERM once it has said it is training."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "runtime.cli", "train", str(_preset(tmp_path, iterations=100000)),
           "--out", str(out), "--text", str(corpus), "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=repo, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # bounded by the kill in `finally` and pytest's own timeout
            lines.append(line)
            if line.startswith("training preset-name:"):
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(lines) + stderr
    assert "SIGTERM: stopping after this iteration" in stderr
    assert (
        f"training state saved to {out}.train-state" in stderr and "run the same command to resume" in stderr
    )
    assert (Path(f"{out}.train-state") / "state.json").is_file() and not out.exists()
