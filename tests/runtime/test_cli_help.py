"""Every `--help` shows defaults; `generate` seeds randomly, echoes the prompt only after the
server answered and ends the text with a newline before the stats line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
import pytest

from runtime import cli, client, local


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser, the bench kinds included ("bench model", ...)."""
    out: dict[str, argparse.ArgumentParser] = {}
    top = cli.build_parser()
    for action in top._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():
            out[name] = sub
            for inner in sub._subparsers._group_actions if sub._subparsers else []:
                for kind, subsub in inner.choices.items():
                    out[f"{name} {kind}"] = subsub
    return out


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


# Commands whose every value-taking option says its default, also where it is None (the weaker
# check above covers every command, `bench` included).
OWN = ("train", "eval", "export", "serve", "generate", "info", "loadtest")


def test_every_option_with_a_default_shows_it():
    for name, parser in _parsers().items():
        for action in parser._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS):
                continue
            if action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
                continue
            assert "default" in _help_of(parser, action).lower(), (name, action.option_strings)


@pytest.mark.parametrize("name", OWN)
def test_every_value_option_of_the_own_commands_says_its_default(name):
    parser = _parsers()[name]
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.help not in (None, argparse.SUPPRESS):
            assert "default" in _help_of(parser, action).lower(), (name, action.option_strings)


def test_help_text_shows_a_default(capsys):
    assert cli.main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "tokens to generate at most (default: 64)" in " ".join(out.split())
    assert "(default: random" in out


def test_generate_seed_is_unset_unless_given():
    assert cli.build_parser().parse_args(["generate", "hi"]).seed is None
    assert cli.build_parser().parse_args(["generate", "hi", "--seed", "5"]).seed == 5
    assert local.generation_seed(5) == 5
    seeds = {local.generation_seed(None) for _ in range(4)}
    assert len(seeds) > 1 and all(0 <= s < 2**63 for s in seeds)


class _Reply:
    def __init__(self, text: str) -> None:
        self.text = text
        self.finish_reason = 0
        self.usage = argparse.Namespace(completion_tokens=2)
        self.compute = argparse.Namespace(steps=4, policy_reason="default:fixed")
        self.timings = argparse.Namespace(total_s=0.01)


class _RpcError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return "prompt: too long"


class _FakeClient:
    """Stands in for `runtime.client.Client`: the stream yields `replies`, then raises `error`."""

    replies: list[str] = []
    error: bool = False
    events: list[str] = []

    def __init__(self, target: str) -> None:
        from runtime.proto_build import load_stubs

        self.pb2, _ = load_stubs()

    def _gen(self) -> Any:
        for text in self.replies:
            _FakeClient.events.append(f"reply {text!r}")
            yield _Reply(text)
        if self.error:
            raise _RpcError()

    def stream(self, req: Any, timeout: float | None = None) -> Any:
        return self._gen()

    def generate(self, req: Any, timeout: float | None = None) -> Any:
        if self.error:
            raise _RpcError()
        return _Reply("".join(self.replies))

    def close(self) -> None:
        pass


class _Out:
    """stdout that records, in one list with the fake server's events, what was written when."""

    def write(self, text: str) -> None:
        if text:
            _FakeClient.events.append(f"out {text!r}")

    def flush(self) -> None:
        _FakeClient.events.append("flush")


def _generate(monkeypatch, *argv: str, replies: list[str], error: bool = False) -> list[str]:
    monkeypatch.setattr(client, "Client", _FakeClient)
    monkeypatch.setattr(_FakeClient, "replies", replies)
    monkeypatch.setattr(_FakeClient, "error", error)
    monkeypatch.setattr(_FakeClient, "events", [])
    monkeypatch.setattr(sys, "stdout", _Out())
    args = cli.build_parser().parse_args(["generate", "Hello", "--server", "127.0.0.1:1", *argv])
    rc = client.generate_main(args)
    _FakeClient.events.append(f"rc {rc}")
    return _FakeClient.events


@pytest.mark.parametrize("stream", [True, False])
def test_generate_echoes_the_prompt_after_the_server_answered(monkeypatch, capsys, stream):
    events = _generate(monkeypatch, *(["--stream"] if stream else []), replies=[" wor", "ld"])
    written = "".join(eval(e[4:]) for e in events if e.startswith("out "))  # noqa: S307 (our own repr)
    assert written == "Hello world\n"
    first_out = next(i for i, e in enumerate(events) if e.startswith("out "))
    if stream:
        assert events[first_out - 1] == "reply ' wor'"  # the prompt waits for the first delta
    last_out = max(i for i, e in enumerate(events) if e.startswith("out "))
    assert "flush" in events[last_out:]  # flushed before the stats line goes to stderr
    assert events[-1] == "rc 0"
    assert capsys.readouterr().err.startswith("[2 tokens, steps=4")


@pytest.mark.parametrize("stream", [True, False])
def test_an_error_before_any_text_prints_no_prompt(monkeypatch, capsys, stream):
    events = _generate(monkeypatch, *(["--stream"] if stream else []), replies=[], error=True)
    assert not [e for e in events if e.startswith("out ")]
    assert events[-1] == "rc 1"
    assert capsys.readouterr().err == "leanserve generate: INVALID_ARGUMENT: prompt: too long\n"


def test_an_error_mid_stream_ends_the_text_line_first(monkeypatch, capsys):
    events = _generate(monkeypatch, "--stream", replies=[" wor"], error=True)
    written = "".join(eval(e[4:]) for e in events if e.startswith("out "))  # noqa: S307
    assert written == "Hello wor\n"
    assert capsys.readouterr().err.startswith("leanserve generate: INVALID_ARGUMENT")
