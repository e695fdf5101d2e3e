"""runtime/serve_local.py's environment for a local Ray (the Ray start and stop themselves are
covered by the integration tests, through tests.helpers.local_serve)."""

from __future__ import annotations


def test_local_env_fills_gaps_and_leaves_what_the_user_set(monkeypatch):
    """Local runs get the token-free loopback Ray and Serve's short request path (gRPC from
    proxy to replica, handlers on the replica's loop); a value already in the environment
    wins, so `RAY_SERVE_PROXY_USE_GRPC=0 leanserve serve` goes back to Ray actor calls."""
    import os

    from runtime.serve_local import LOCAL_ENV, SERVE_LATENCY_ENV, set_local_env

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
