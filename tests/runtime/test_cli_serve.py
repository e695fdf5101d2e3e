"""`leanserve serve`'s arguments: engine flags generated from EngineConfig, --backend,
--served-model-name, --model-dir, a --config file's model directory (runtime/serve_config.py)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from runtime import serve_config
from runtime.cli import build_parser
from runtime.serve_config import app_args, resolve_serve_model_dir
from runtime.settings import EngineConfig

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "serve" / "leanserve.yaml"


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_every_engine_config_field_is_a_flag_and_reaches_the_engine_args():
    args = _parse()
    for f in dataclasses.fields(EngineConfig):
        assert getattr(args, f.name) is None, f.name  # not given: the config file's or EngineConfig's
    assert app_args(args)["engine"] == {}
    args = _parse("--page-size", "32", "--slo-hysteresis", "0.2", "--latency-budget-unmet", "reject")
    assert app_args(args)["engine"] == {
        "page_size": 32,
        "slo_hysteresis": 0.2,
        "latency_budget_unmet": "reject",
    }
    assert app_args(_parse("--no-slo-quality-ladder"))["engine"] == {"slo_quality_ladder": False}
    # The flags override the file's engine section and keep the rest of it.
    engine = app_args(_parse("--config", str(SERVE_CONFIG), "--max-waiting", "3"))["engine"]
    assert engine["max_waiting"] == 3 and engine["page_size"] == 16


def test_engine_help_shows_each_fields_default():
    text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    assert "--kv-cache-bytes" in text and f"(default: {EngineConfig.kv_cache_bytes})" in text
    assert "--no-slo-quality-ladder" in text


def test_a_field_added_to_engine_config_gets_a_flag(monkeypatch):
    @dataclasses.dataclass
    class Grown(EngineConfig):
        new_knob: int = 7
        new_switch: bool = False
        new_list: tuple[int, ...] | None = None

    monkeypatch.setattr(serve_config, "engine_fields", lambda: list(dataclasses.fields(Grown)))
    args = _parse("--new-knob", "9", "--new-switch", "--new-list", "[1, 2]")
    assert app_args(args)["engine"] == {"new_knob": 9, "new_switch": True, "new_list": [1, 2]}
    with pytest.raises(SystemExit):
        _parse("--new-knob", "nine")


def test_backend_and_served_model_name_go_to_the_app_args_only_when_given():
    cfg = app_args(_parse())
    assert "backend" not in cfg and "served_model_name" not in cfg
    assert app_args(_parse("--backend", "onnx"))["backend"] == "onnx"
    assert app_args(_parse("--config", str(SERVE_CONFIG), "--backend", "onnx"))["backend"] == "onnx"
    assert app_args(_parse("--served-model-name", "mine"))["served_model_name"] == "mine"
    with pytest.raises(SystemExit):
        _parse("--backend", "tensorrt")


def test_model_dir_positional_or_flag_but_not_two_different_ones(tmp_path):
    assert app_args(_parse(str(tmp_path)))["model_dir"] == str(tmp_path)
    assert app_args(_parse("--model-dir", str(tmp_path)))["model_dir"] == str(tmp_path)
    assert app_args(_parse(str(tmp_path), "--model-dir", str(tmp_path)))["model_dir"] == str(tmp_path)
    with pytest.raises(ValueError, match="two model directories given"):
        app_args(_parse(str(tmp_path), "--model-dir", str(tmp_path / "other")))


def test_shipped_config_serves_the_zoo_model_locally(capsys):
    args = _parse("--config", str(SERVE_CONFIG))
    cfg = app_args(args)
    assert cfg["model_dir"] == "/models/ode-tiny"  # the images' path
    assert not Path("/models/ode-tiny").exists()
    resolved = resolve_serve_model_dir(args, cfg)
    assert resolved == REPO / "models" / "zoo" / "ode-tiny"
    note = capsys.readouterr().err
    assert "/models/ode-tiny" in note and str(SERVE_CONFIG) in note and "--model-dir" in note
    # --model-dir wins over the file, silently.
    args = _parse("--config", str(SERVE_CONFIG), "--model-dir", str(REPO / "models" / "zoo" / "stack-tiny"))
    assert resolve_serve_model_dir(args, app_args(args)) == REPO / "models" / "zoo" / "stack-tiny"
    assert capsys.readouterr().err == ""


def test_config_model_dir_relative_to_the_file_else_a_clear_error(tmp_path):
    (tmp_path / "mymodel").mkdir()
    config = tmp_path / "serve.yaml"
    config.write_text("model_dir: mymodel\n")
    args = _parse("--config", str(config))
    assert resolve_serve_model_dir(args, app_args(args)) == tmp_path / "mymodel"
    config.write_text("model_dir: /nowhere/not-a-zoo-model\n")
    with pytest.raises(FileNotFoundError, match=r"/nowhere/not-a-zoo-model: model directory not found") as e:
        resolve_serve_model_dir(args, app_args(args))
    assert str(config) in str(e.value) and "--model-dir" in str(e.value)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        resolve_serve_model_dir(_parse(str(tmp_path / "missing")), {})


def test_dtype_and_served_name_reach_serve_args():
    """`--dtype` and `--served-model-name` become Serve args that ServeArgs accepts."""
    from runtime.serve_app import ServeArgs

    cfg = app_args(_parse("--dtype", "bfloat16", "--served-model-name", "mine"))
    parsed = ServeArgs.from_dict(cfg)
    assert (parsed.dtype, parsed.served_model_name) == ("bfloat16", "mine")
    assert "dtype" not in app_args(_parse())
    with pytest.raises(SystemExit):
        _parse("--dtype", "float16")


def test_bench_engine_takes_speculation():
    args = build_parser().parse_args(["bench", "engine", "--speculation", "--quick"])
    assert args.speculation is True
