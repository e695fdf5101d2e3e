"""`leanserve serve`'s argument resolution (runtime/serve_config.py): ports, app args from a --config
file and the flags, the drain bound."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from runtime.cli import build_parser
from runtime.serve_config import (
    DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S,
    app_args,
    graceful_shutdown_timeout,
    resolve_ports,
)

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "serve" / "leanserve.yaml"


def _args(**kw) -> argparse.Namespace:
    """`leanserve serve`'s parsed defaults (the real parser), with `kw` set (a test's own keys too)."""
    args = {k: v for k, v in vars(build_parser().parse_args(["serve"])).items() if not k.startswith("_")}
    return argparse.Namespace(**{**args, **kw})


def test_ports_default_then_config_file_then_flags(tmp_path: Path):
    assert resolve_ports(_args()) == (9000, 8000)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "grpc_options:\n  port: 9500\nhttp_options:\n  host: 0.0.0.0\n  port: 8500\napplications: []\n"
    )
    assert resolve_ports(_args(config=str(cfg))) == (9500, 8500)
    assert resolve_ports(_args(config=str(cfg), grpc_port=9100)) == (9100, 8500)
    assert resolve_ports(_args(config=str(SERVE_CONFIG))) == (9000, 8000)


def test_bad_port_in_config_names_the_field(tmp_path: Path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("grpc_options:\n  port: 70000\n")
    with pytest.raises(ValueError, match=r"grpc_options.port=70000: must be an integer port in \[1, 65535\]"):
        resolve_ports(_args(config=str(cfg)))


def test_serve_config_application_args_and_flag_overrides():
    cfg = app_args(_args(config=str(SERVE_CONFIG), max_batch_size=4, model_dir="models/zoo/ode-tiny"))
    assert cfg["model_dir"] == "models/zoo/ode-tiny"
    assert cfg["engine"]["max_batch_size"] == 4
    assert cfg["engine"]["page_size"] == 16  # from the file
    assert "grpc_options" not in cfg and "http_options" not in cfg
    assert "compile" not in cfg
    assert app_args(_args(config=str(SERVE_CONFIG), compile=True))["compile"] is True
    assert "compile_steps" not in cfg
    assert app_args(_args(compile=True, compile_steps="2,3,12"))["compile_steps"] == [2, 3, 12]
    assert "inline_decode_ms" not in cfg["engine"]
    assert app_args(_args(inline_decode_ms=0.0))["engine"]["inline_decode_ms"] == 0.0


def test_compile_steps_flag_is_all_or_a_list():
    assert app_args(_args(compile=True, compile_steps="all"))["compile_steps"] == "all"
    assert app_args(_args(compile=True, compile_steps="4"))["compile_steps"] == [4]
    with pytest.raises(ValueError, match=r"compile_steps='2-4': must be 'all', 'auto' or comma-separated"):
        app_args(_args(compile=True, compile_steps="2-4"))


def test_api_key_flag_goes_to_the_app_args_and_the_environment_does_not(monkeypatch):
    monkeypatch.setenv("LEANSERVE_API_KEY", "from-env")
    assert "api_key" not in app_args(_args())  # the replica reads the env var it inherits
    assert app_args(_args(api_key="s3cret"))["api_key"] == "s3cret"


def test_graceful_shutdown_timeout_default_file_and_flag():
    assert graceful_shutdown_timeout(app_args(_args())) == DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S
    assert graceful_shutdown_timeout(app_args(_args(config=str(SERVE_CONFIG)))) == 20.0  # the file's
    cfg = app_args(_args(config=str(SERVE_CONFIG), graceful_shutdown_timeout=45.0, replicas=2))
    assert cfg["deployment"]["graceful_shutdown_timeout_s"] == 45.0 == graceful_shutdown_timeout(cfg)
    assert cfg["deployment"]["num_replicas"] == 2 and cfg["deployment"]["max_queued_requests"] == 256
    for bad in (-1, "10", float("inf"), True):
        with pytest.raises(
            ValueError, match=r"graceful_shutdown_timeout_s=.*must be a number of seconds >= 0"
        ):
            graceful_shutdown_timeout({"deployment": {"graceful_shutdown_timeout_s": bad}})


def test_deployment_options_give_replica_drain_and_ray_one_bound():
    from runtime.serve_app import ServeArgs, deployment_options

    options = deployment_options(ServeArgs.from_dict({}))
    assert options["graceful_shutdown_timeout_s"] == DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S
    assert options["graceful_shutdown_wait_loop_s"] <= 1.0
    set_ = deployment_options(ServeArgs.from_dict({"deployment": {"graceful_shutdown_timeout_s": 7}}))
    assert set_["graceful_shutdown_timeout_s"] == 7
