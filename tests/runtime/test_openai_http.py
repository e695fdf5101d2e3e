"""OpenAI `/v1/completions` without Ray: body bounds, field parsing, fan-out, response shapes.

Fan-out and responses run against `FakeEngine` (scripted deltas, the real test
tokenizer), and once against a real tiny `Engine`; the FastAPI exception
handlers are driven through the ASGI app directly. The served route itself is
covered by tests/runtime/test_serve_integration.py (the `openai` client).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import openai_http as oa
from runtime.types import (
    MAX_LOGPROBS,
    InvalidRequestError,
    OverloadedError,
    RequestOutput,
    TokenLogprob,
)

M = "m"  # the served model's name


def plan(**body: Any) -> oa.CompletionPlan:
    return oa.parse_completions({"prompt": "hi", **body}, M)


def invalid(body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        oa.parse_completions(body, M)
    return err.value


# --- body bounds -------------------------------------------------------------------------------
def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9', max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text('[]{}"\\x', max_size=4), inner, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_json, st.integers(0, 6), st.booleans())
def test_json_depth_check_matches_the_real_depth(value, limit, ascii_only):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    assert oa.json_depth_exceeds(raw, limit) == (_depth(value) > limit)


def test_deep_large_and_malformed_bodies_are_client_errors():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidRequestError, match="nest at most") as err:
        oa.parse_json_body(deep)
    assert oa.error_body(err.value)[0] == 400
    unbalanced = b'{"prompt": ' + b"[" * 100_000
    assert oa.error_body(_raises(oa.parse_json_body, unbalanced))[0] == 400
    # Brackets inside strings (escaped quotes included) are text, not nesting.
    text = json.dumps({"prompt": '\\"' + "[" * 1000 + '"\\'}).encode()
    assert oa.parse_json_body(text)["prompt"].count("[") == 1000
    with pytest.raises(oa.BodyTooLargeError) as err:
        oa.parse_json_body(b" " * (oa.MAX_BODY_BYTES + 1))
    status, payload = oa.error_body(err.value)
    assert status == 413 and payload["error"]["param"] == "body"
    for raw in (b"{", b"NaN", b'{"temperature": Infinity}', b"\xff\xfe{", b""):
        assert oa.error_body(_raises(oa.parse_json_body, raw))[0] == 400, raw


def _raises(fn, *args) -> BaseException:
    with pytest.raises(Exception) as err:
        fn(*args)
    return err.value


# --- fields ------------------------------------------------------------------------------------
def test_the_four_prompt_forms_and_choice_order():
    assert [r.prompt for r in plan().requests] == ["hi"]
    assert [r.prompt for r in plan(prompt=["a", "b"]).requests] == ["a", "b"]
    assert [r.prompt_token_ids for r in plan(prompt=[1, 2]).requests] == [[1, 2]]
    p = plan(prompt=[[1], [2, 3]], n=2, seed=7)
    assert [r.prompt_token_ids for r in p.requests] == [[1], [1], [2, 3], [2, 3]]  # prompt-major
    assert [r.sampling.seed for r in p.requests] == [7, 8, 7, 8]  # choice j: seed + j
    assert len({r.request_id for r in p.requests}) == 4 and all(
        r.request_id.startswith(p.id) for r in p.requests
    )
    assert plan().requests[0].request_id == plan().id or plan().id.startswith("cmpl-")
    single = plan()
    assert single.requests[0].request_id == single.id
    assert plan(n=3).requests[0].sampling.seed is None
    assert plan(n=2, seed=2**63 - 1).requests[1].sampling.seed == 0  # wraps, stays in range
    assert plan(n=2, seed=-1).requests[1].sampling.seed == -1  # invalid: the engine names it


def test_every_optional_field_may_be_null():
    nulls = {name: None for name in oa._FIELDS if name != "prompt"}
    p = oa.parse_completions({"prompt": "hi", **nulls}, M)
    default = oa.parse_completions({"prompt": "hi"}, M)
    assert (p.n, p.stream, p.echo, p.logprobs, p.include_usage) == (1, False, False, None, False)
    assert p.requests[0].sampling == default.requests[0].sampling
    assert p.requests[0].compute == default.requests[0].compute


def test_fields_reach_the_engine_request():
    p = oa.parse_completions(
        {
            "model": M, "prompt": "hi", "max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": -1,
            "seed": 3, "stop": "x", "stop_token_ids": [4], "presence_penalty": 1, "frequency_penalty": -0.5,
            "logit_bias": {"5": -100, "7": 2.5}, "logprobs": 3, "user": "alice", "priority": -2,
            "steps": 2, "quality": "fast", "latency_budget_ms": 50, "experts_top_k": 1, "expert_depth": 1,
            "exit_threshold": 0.75, "best_of": 1, "suffix": "", "stream": True,
            "stream_options": {"include_usage": True},
        },
        M,
        client_id="10.0.0.1",
    )  # fmt: skip
    (r,) = p.requests
    s, c = r.sampling, r.compute
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (5, 0.0, 0.5, 0, 3)
    assert isinstance(s.temperature, float) and isinstance(s.presence_penalty, float)
    assert (s.stop, s.stop_token_ids, s.presence_penalty, s.frequency_penalty) == (["x"], [4], 1.0, -0.5)
    assert s.logit_bias == {5: -100.0, 7: 2.5} and s.logprobs == 3
    assert (r.client_id, r.priority) == ("alice", -2)
    assert (c.steps, c.quality, c.latency_budget_ms, c.experts_top_k, c.expert_depth) == (
        2,
        "fast",
        50.0,
        1,
        1,
    )
    assert c.exit_threshold == 0.75
    assert p.stream and p.include_usage and p.logprobs == 3
    assert plan().requests[0].client_id == ""
    assert oa.parse_completions({"prompt": "x"}, M, client_id="10.0.0.1").requests[0].client_id == "10.0.0.1"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"quality": ["fast"]}, "quality"),
        ({"temperature": 10**400}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"top_p": True}, "top_p"),
        ({"latency_budget_ms": 10**400}, "latency_budget_ms"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"steps": "2"}, "steps"),
        ({"n": "2"}, "n"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"prompt": ["a", "b"], "n": 9}, "n"),
        ({"n": 10**400}, "n"),
        ({"best_of": 3, "n": 2}, "best_of"),
        ({"stream": "yes"}, "stream"),
        ({"echo": 1}, "echo"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"suffix": "tail"}, "suffix"),
        ({"suffix": 5}, "suffix"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": ["ok", "\udfff"]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1], "a"]}, "prompt"),
        ({"prompt": [[1], [True]]}, "prompt"),
        ({"prompt": {"a": 1}}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"stop": 5}, "stop"),
        ({"stop": ["\ud800"]}, "stop"),
        ({"stop_token_ids": ["1"]}, "stop_token_ids"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"٣": 1}}, "logit_bias"),  # a non-ASCII digit is not a token id
        ({"logit_bias": {"1" * 5000: 1}}, "logit_bias"),
        ({"logit_bias": {"5": "a"}}, "logit_bias"),
        ({"logit_bias": {"5": None}}, "logit_bias"),
        ({"logit_bias": {"5": 10**400}}, "logit_bias"),
        ({"user": 5}, "user"),
        ({"user": "\ud800"}, "user"),
        ({"priority": 1.5}, "priority"),
        ({"model": ["m"]}, "model"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": 1}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "y"}}, "include_usage"),
        ({"stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_wrong_types_are_400_naming_the_field(body, field):
    error = invalid({"prompt": "hi", **body})
    status, payload = oa.error_body(error)
    assert status == 400 and payload["error"]["param"] == field
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert len(payload["error"]["message"]) < 300  # the offending value is shortened
    json.loads(oa.dumps(payload))  # encodable, lone surrogates included


def test_body_must_be_an_object_and_model_must_match():
    assert invalid([1]).field == "body"  # type: ignore[arg-type]
    with pytest.raises(oa.ModelNotFoundError):
        oa.parse_completions({"model": "other", "prompt": "x"}, M)
    assert oa.error_body(_raises(oa.parse_completions, {"model": "\ud800", "prompt": "x"}, M))[0] == 400
    assert oa.error_body(oa.ModelNotFoundError("no"))[0] == 404
    with pytest.raises(InvalidRequestError, match="one choice"):
        oa.parse_completion({"prompt": ["a", "b"]}, M)


def test_error_messages_are_bounded():
    status, payload = oa.error_body(InvalidRequestError("prompt", "x" * 100_000, "too long"))
    assert status == 400 and len(payload["error"]["message"]) <= oa.MAX_MESSAGE_CHARS + 3


# --- fan-out and responses -----------------------------------------------------------------------
class FakeEngine:
    """Scripted deltas per request: "<tag>a", "b" (two tokens each), logprobs when asked for.

    `fail_at`: the submit with this index raises OverloadedError; `error_after`: the stream
    of this choice raises after its first delta.
    """

    def __init__(self, tokenizer: Any, fail_at: int | None = None, error_after: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.fail_at, self.error_after = fail_at, error_after
        self.submitted: list[Any] = []
        self.cancelled: list[str] = []
        self.closed: list[str] = []

    async def submit_async(self, request: Any) -> AsyncIterator[RequestOutput]:
        if len(self.submitted) == self.fail_at:
            raise OverloadedError("queue full")
        self.submitted.append(request)
        return self._stream(request, len(self.submitted) - 1)

    def cancel(self, request_id: str) -> bool:
        self.cancelled.append(request_id)
        return True

    async def _stream(self, request: Any, index: int) -> AsyncIterator[RequestOutput]:
        k = request.sampling.logprobs
        prompt_tokens = len(request.prompt_token_ids or request.prompt.split())
        try:
            for step, (text, token) in enumerate(((f"{index}a", 65), ("b", 66))):
                await asyncio.sleep(0)
                if step == 1 and index == self.error_after:
                    raise OverloadedError("boom")
                lp = None
                if k is not None:
                    logprob = -0.5 if step == 0 else -math.inf
                    lp = [TokenLogprob(token, logprob, [(token, logprob), (67, -1.0)][:k])]
                yield RequestOutput(
                    request.request_id, text, [token], step == 1, "length" if step == 1 else None,
                    prompt_tokens, step + 1, 2, None, "explicit", logprobs=lp,
                )  # fmt: skip
        finally:
            self.closed.append(request.request_id)


def _run(engine: FakeEngine, body: dict[str, Any], arun) -> Any:
    async def go() -> Any:
        p = oa.parse_completions(body, M)
        streams = await oa.submit_all(engine, p)
        if not p.stream:
            return await oa.complete(engine, p, streams, M, created=1)
        return [e async for e in oa.sse_events(engine, p, streams, M, created=1)]

    return arun(go())


def _events(events: list[str]) -> list[Any]:
    assert events[-1] == oa.SSE_DONE and all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def test_non_streaming_choices_usage_and_logprobs(tokenizer, arun):
    engine = FakeEngine(tokenizer)
    body = _run(engine, {"prompt": ["one two", "three"], "n": 2, "logprobs": 1, "max_tokens": 2}, arun)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["0ab", "1ab", "2ab", "3ab"]
    assert [r.prompt for r in engine.submitted] == ["one two", "one two", "three", "three"]
    assert body["usage"] == {"prompt_tokens": 2 + 1, "completion_tokens": 8, "total_tokens": 11}
    assert body["object"] == "text_completion" and body["created"] == 1 and body["model"] == M
    lp = body["choices"][0]["logprobs"]
    a, b, c = (tokenizer.decode([t], skip_special_tokens=False) for t in (65, 66, 67))
    assert lp["tokens"] == [a, b]
    assert lp["token_logprobs"] == [-0.5, oa.LOGPROB_FLOOR]  # -inf is not JSON
    assert lp["top_logprobs"] == [{a: -0.5}, {b: oa.LOGPROB_FLOOR}]  # the sampled token is always listed
    assert lp["text_offset"] == [0, len(a)]
    assert body["leanserve"] == {"steps": 2, "experts": None, "policy_reason": "explicit"}
    assert body["choices"][0]["finish_reason"] == "length"
    json.loads(oa.dumps(body))
    assert sorted(engine.closed) == sorted(r.request_id for r in engine.submitted)
    two = _run(FakeEngine(tokenizer), {"prompt": "x", "logprobs": 2}, arun)["choices"][0]["logprobs"]
    assert two["top_logprobs"][0] == {a: -0.5, c: -1.0}
    assert _run(FakeEngine(tokenizer), {"prompt": "x"}, arun)["choices"][0]["logprobs"] is None


def test_tokens_of_part_of_a_character_are_shown_as_bytes_and_share_its_offset(tokenizer):
    ids = tokenizer.encode("\U0001f642 \u00fc!").ids  # the emoji and the u-umlaut span several tokens
    choices = oa._Choices(oa.parse_completions({"prompt": "x", "logprobs": 1}, M), tokenizer)
    lp = choices.logprobs(0, [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids])
    assert lp is not None and len(set(lp["tokens"])) == len(set(ids))
    raw = b"".join(
        bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
        for t in lp["tokens"]
    )
    assert raw.decode() == "\U0001f642 \u00fc!" and lp["tokens"][0].startswith("bytes:\\xf0")
    text = "\U0001f642 \u00fc!"
    starts = [text.index(ch) for ch in text]
    assert sorted(set(lp["text_offset"])) == starts  # every character's tokens start where it does
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_echo_prepends_the_prompt_text_or_the_decoded_ids(tokenizer, arun):
    ids = tokenizer.encode("The queue was empty").ids
    body = _run(FakeEngine(tokenizer), {"prompt": ["Say", "Do"], "echo": True}, arun)
    assert [c["text"] for c in body["choices"]] == ["Say0ab", "Do1ab"]
    body = _run(FakeEngine(tokenizer), {"prompt": ids, "echo": True}, arun)
    assert body["choices"][0]["text"] == "The queue was empty0ab"
    events = _events(_run(FakeEngine(tokenizer), {"prompt": "Say", "echo": True, "stream": True}, arun))
    assert "".join(e["choices"][0]["text"] for e in events) == "Say0ab"


def test_streaming_chunks_carry_the_choice_index_and_usage(tokenizer, arun):
    events = _events(_run(FakeEngine(tokenizer), {"prompt": ["p", "q"], "stream": True, "logprobs": 0}, arun))
    assert len(events) == 4 and {e["id"] for e in events} == {events[0]["id"]}
    by_index: dict[int, str] = {}
    for e in events:
        (choice,) = e["choices"]
        by_index[choice["index"]] = by_index.get(choice["index"], "") + choice["text"]
        assert (choice["finish_reason"] is None) == ("usage" not in e)  # a choice's last chunk: its usage
        assert len(choice["logprobs"]["tokens"]) == 1
    assert by_index == {0: "0ab", 1: "1ab"}
    offsets = [e["choices"][0]["logprobs"]["text_offset"][0] for e in events if e["choices"][0]["index"] == 0]
    assert offsets == [0, len(tokenizer.decode([65]))]

    body = {"prompt": "p", "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    events = _events(_run(FakeEngine(tokenizer), body, arun))
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    assert events[-1]["usage"]["prompt_tokens"] == 1  # the prompt is counted once, not per choice


def test_a_refused_choice_cancels_the_queued_ones(tokenizer, arun):
    engine = FakeEngine(tokenizer, fail_at=2)
    with pytest.raises(OverloadedError):
        _run(engine, {"prompt": "p", "n": 3}, arun)
    assert engine.cancelled == [r.request_id for r in engine.submitted] and len(engine.submitted) == 2


def test_an_engine_error_names_the_openai_field(tokenizer, arun):
    class Refusing(FakeEngine):
        async def submit_async(self, request: Any) -> AsyncIterator[RequestOutput]:
            raise InvalidRequestError("prompt_token_ids", 999, "every id must be in [0, 319]")

    with pytest.raises(InvalidRequestError) as err:
        _run(Refusing(tokenizer), {"prompt": [999]}, arun)
    assert err.value.field == "prompt"


def test_an_error_mid_stream_is_reported_in_band_and_stops_every_choice(tokenizer, arun):
    engine = FakeEngine(tokenizer, error_after=1)
    events = _events(_run(engine, {"prompt": "p", "n": 3, "stream": True}, arun))
    assert events[-1]["error"]["code"] == "resource_exhausted"
    assert set(engine.cancelled) == {r.request_id for r in engine.submitted}
    assert sorted(engine.closed) == sorted(r.request_id for r in engine.submitted)
    with pytest.raises(OverloadedError):
        _run(FakeEngine(tokenizer, error_after=0), {"prompt": "p", "n": 2}, arun)


def test_a_consumer_that_leaves_early_cancels_every_choice(tokenizer, arun):
    engine = FakeEngine(tokenizer)

    async def go() -> None:
        p = oa.parse_completions({"prompt": "p", "n": 2, "stream": True}, M)
        events = oa.sse_events(engine, p, await oa.submit_all(engine, p), M)
        await events.__anext__()
        await events.aclose()

    arun(go())
    assert set(engine.cancelled) == {r.request_id for r in engine.submitted}
    assert len(engine.closed) == 2


# --- a real engine --------------------------------------------------------------------------------
def test_a_real_engine_serves_list_prompts_n_and_logprobs(make_engine, tokenizer, arun):
    engine = make_engine()

    async def go() -> dict[str, Any]:
        await engine.start()
        try:
            prompts = [tokenizer.encode("The queue").ids, tokenizer.encode("The model").ids]
            body = {
                "prompt": prompts, "n": 2, "max_tokens": 4, "seed": 1, "logprobs": 2, "temperature": 1.0,
                "steps": 2,
            }  # fmt: skip
            p = oa.parse_completions(body, M)
            return await oa.complete(engine, p, await oa.submit_all(engine, p), M)
        finally:
            await engine.stop()

    body = arun(go())
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for choice in body["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) >= 1
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
            assert logprob <= 0 and token in top and 2 <= len(top) <= 3
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in body["choices"])


# --- FastAPI's own errors and the body reader (no Ray: the ASGI app directly) ---------------------
async def _asgi(method: str, path: str, body: bytes = b"", headers: list | None = None) -> tuple[int, Any]:
    from runtime.serve_app import app

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": headers or [], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.mark.parametrize(
    "method, path, status, code",
    [("GET", "/nope", 404, "not_found"), ("GET", "/v1/completions", 405, "method_not_allowed"),
     ("POST", "/v1/models", 405, "method_not_allowed")],
)  # fmt: skip
def test_fastapi_errors_are_openai_shaped(method, path, status, code, arun):
    got, body = arun(_asgi(method, path))
    assert (
        got == status and body["error"]["code"] == code and body["error"]["type"] == "invalid_request_error"
    )
    assert set(body["error"]) == {"message", "type", "param", "code"} and path in body["error"]["message"]


def test_read_json_bounds_the_body_before_reading_it(arun):
    from starlette.requests import Request

    from runtime.serve_app import _read_json

    def request(parts: list[bytes], length: str | None = None) -> Request:
        messages = [
            {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)
        ]

        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        headers = [] if length is None else [(b"content-length", length.encode())]
        return Request({"type": "http", "method": "POST", "headers": headers}, receive)

    assert arun(_read_json(request([b'{"prompt":', b' "hi"}']))) == {"prompt": "hi"}
    big = b" " * (256 * 1024) + b'{"a": 1}'  # parsed in a thread
    assert arun(_read_json(request([big]))) == {"a": 1}
    for req in (request([b"{}"], str(oa.MAX_BODY_BYTES + 1)), request([b"{}"], "9" * 5000)):
        with pytest.raises(oa.BodyTooLargeError):
            arun(_read_json(req))
    chunk = b" " * (1024 * 1024)
    with pytest.raises(oa.BodyTooLargeError):  # no (or a false) content-length: counted while read
        arun(_read_json(request([chunk] * 5 + [b"{}"])))
    with pytest.raises(InvalidRequestError, match="nest"):
        arun(_read_json(request([b"[" * 100_000])))


def test_truncation_is_applied_before_the_engine_and_echo_shows_it(tokenizer, arun):
    engine = FakeEngine(tokenizer)
    text = "The scheduler admitted them first come, first served " * 30
    body = _run(engine, {"prompt": text, "n": 2, "echo": True, "truncate_prompt_tokens": 5}, arun)
    kept = tokenizer.encode(text).ids[-5:]
    assert [(r.prompt, r.prompt_token_ids) for r in engine.submitted] == [(None, kept), (None, kept)]
    assert body["choices"][0]["text"].startswith(tokenizer.decode(kept))
    _run(engine, {"prompt": [[1, 2, 3, 4]], "truncate_prompt_tokens": 2}, arun)
    assert engine.submitted[-1].prompt_token_ids == [3, 4]
    _run(engine, {"prompt": "short", "truncate_prompt_tokens": 0}, arun)  # invalid N: the engine names it
    assert engine.submitted[-1].prompt == "short"
