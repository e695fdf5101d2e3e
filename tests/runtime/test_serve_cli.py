"""`leanserve serve` argument resolution (no Ray started here)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from runtime.serve_cli import _app_args, parse_steps, resolve_ports

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "serve" / "leanserve.yaml"


def _args(**kw) -> argparse.Namespace:
    base = dict(
        config=None, grpc_port=None, http_port=None, model_dir=None, threads=None, replicas=None,
        max_batch_size=None, max_waiting=None, kv_cache_bytes=None, default_steps=None,
        slo_target_itl_ms=None, inline_decode_ms=None, compile=False, compile_steps=None,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


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
    cfg = _app_args(_args(config=str(SERVE_CONFIG), max_batch_size=4, model_dir="models/zoo/ode-tiny"))
    assert cfg["model_dir"] == "models/zoo/ode-tiny"
    assert cfg["engine"]["max_batch_size"] == 4
    assert cfg["engine"]["page_size"] == 16  # from the file
    assert "grpc_options" not in cfg and "http_options" not in cfg
    assert "compile" not in cfg
    assert _app_args(_args(config=str(SERVE_CONFIG), compile=True))["compile"] is True
    assert "compile_steps" not in cfg
    assert _app_args(_args(compile=True, compile_steps="2,3,12"))["compile_steps"] == [2, 3, 12]
    assert "inline_decode_ms" not in cfg["engine"]
    assert _app_args(_args(inline_decode_ms=0.0))["engine"]["inline_decode_ms"] == 0.0


def test_compile_steps_flag_is_all_or_a_list():
    assert parse_steps("all") == "all"
    assert parse_steps("4") == [4]
    with pytest.raises(ValueError, match=r"--compile-steps='2-4': must be 'all' or comma-separated"):
        parse_steps("2-4")


def test_local_env_fills_gaps_and_leaves_what_the_user_set(monkeypatch):
    """Local runs get the token-free loopback Ray and Serve's short request path (gRPC from
    proxy to replica, handlers on the replica's loop); a value already in the environment
    wins, so `RAY_SERVE_PROXY_USE_GRPC=0 leanserve serve` goes back to Ray actor calls."""
    import os

    from runtime.serve_cli import LOCAL_ENV, SERVE_LATENCY_ENV, set_local_env

    assert SERVE_LATENCY_ENV["RAY_SERVE_PROXY_USE_GRPC"] == "1"
    assert LOCAL_ENV["RAY_AUTH_MODE"] == "disabled" and SERVE_LATENCY_ENV.items() <= LOCAL_ENV.items()
    for key in LOCAL_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")
    set_local_env()
    assert os.environ["RAY_SERVE_PROXY_USE_GRPC"] == "0"
    assert {k: os.environ[k] for k in LOCAL_ENV if k != "RAY_SERVE_PROXY_USE_GRPC"} == {
        k: v for k, v in LOCAL_ENV.items() if k != "RAY_SERVE_PROXY_USE_GRPC"
    }
