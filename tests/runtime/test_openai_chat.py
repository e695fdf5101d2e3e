"""`/v1/chat/completions` without Ray (runtime/openai_chat.py): body fields, a real tiny engine
answering with and without streaming, the engine's errors naming `messages`, truncation; and
the compute dial of `/v1/models` and the OpenAPI request schemas (runtime/openai_schema.py).
The served route with the `openai` client: tests/runtime/test_openai_integration.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest

from runtime import openai_chat as chat
from runtime import openai_schema
from runtime.chat_template import ChatTemplate
from runtime.openai_common import SSE_DONE, ModelNotFoundError, error_body
from runtime.policy import ModelProfile
from runtime.types import InvalidRequestError

M = "m"
HELLO = [{"role": "user", "content": "The scheduler admitted them"}]


def _invalid(body: dict[str, Any]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        chat.parse_chat({"messages": HELLO, **body}, M)
    return err.value


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": []}, "functions"),
        ({"prompt": "x"}, "prompt"),
        ({"add_generation_prompt": "yes"}, "add_generation_prompt"),
        ({"steps": 2.5}, "steps"),
        ({"truncate_prompt_tokens": "4"}, "truncate_prompt_tokens"),
        ({"n": 17}, "n"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_chat_fields_are_checked_by_name(body, field):
    assert _invalid(body).field == field


def test_chat_body_reaches_the_plan():
    parsed = chat.parse_chat(
        {
            "messages": HELLO, "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 3, "n": 2,
            "seed": 4, "steps": 3, "quality": None, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "stream": True, "stream_options": {"include_usage": True},
            "add_generation_prompt": False, "truncate_prompt_tokens": 9, "user": "ann",
        },
        M,
    )  # fmt: skip
    plan = chat.build_plan(parsed, [1, 2, 3])
    assert plan.id.startswith("chatcmpl-") and (plan.n, plan.stream, plan.logprobs) == (2, True, 3)
    assert not parsed.add_generation_prompt and plan.include_usage
    r0, r1 = plan.requests
    assert r0.prompt_token_ids == [1, 2, 3] and r0.prompt is None
    assert (r0.sampling.max_tokens, r0.sampling.seed, r1.sampling.seed) == (5, 4, 5)
    assert (r0.sampling.truncate_prompt_tokens, r0.compute.steps, r0.client_id) == (9, 3, "ann")
    with pytest.raises(ModelNotFoundError):
        chat.parse_chat({"messages": HELLO, "model": "other"}, M)
    assert chat.parse_chat({"messages": HELLO}, M).add_generation_prompt


@pytest.fixture
def session(make_engine, arun):
    """`session(*bodies)`: each body's answer (the object, the SSE events or the error raised)
    from one real tiny engine, started and stopped in the same event loop."""

    def run(*bodies: dict[str, Any]) -> list[Any]:
        engine = make_engine()

        async def one(body: dict[str, Any]) -> Any:
            try:
                result = await chat.start_chat(engine, ChatTemplate.plain(), body, M, "client")
            except InvalidRequestError as e:
                return e
            return result if isinstance(result, dict) else [event async for event in result]

        async def go() -> list[Any]:
            await engine.start()
            try:
                return [await one(body) for body in bodies]
            finally:
                await engine.stop()

        out = arun(go())
        out.append(engine)
        return out

    return run


def test_chat_completion_against_a_real_engine(session):
    body = {"messages": HELLO, "max_tokens": 6, "temperature": 0, "steps": 3, "logprobs": True}
    done, engine = session(body | {"top_logprobs": 2})
    assert done["object"] == "chat.completion" and done["model"] == M
    (choice,) = done["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    entries = choice["logprobs"]["content"]
    assert len(entries) == done["usage"]["completion_tokens"] >= 1
    assert all(len(e["top_logprobs"]) == 2 and isinstance(e["bytes"], list) for e in entries)
    assert done["leanserve"]["steps"] == 3 and done["leanserve"]["policy_reason"] == "explicit"
    # The prompt is the plain template's rendering, tokenised.
    rendered = ChatTemplate.plain().render(HELLO)
    assert done["usage"]["prompt_tokens"] == len(engine.tokenizer.encode(rendered).ids)


def test_chat_stream_against_a_real_engine(session):
    body = {"messages": HELLO, "max_tokens": 5, "temperature": 0, "stream": True, "n": 2, "seed": 1}
    greedy = {"messages": HELLO, "max_tokens": 5, "temperature": 0}
    events, plain, streamed, _ = session(
        body | {"stream_options": {"include_usage": True}}, greedy, greedy | {"stream": True}
    )
    assert events[-1] == SSE_DONE
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert all("role" not in c["delta"] for c in mine[1:])
        assert mine[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in mine[:-1])
    # Greedy and stream-or-not agree on the text.
    text = "".join(json.loads(e[6:])["choices"][0]["delta"]["content"] for e in streamed[:-1])
    assert text == plain["choices"][0]["message"]["content"]


def test_chat_errors_name_messages_and_truncation_keeps_the_last_tokens(session):
    huge = [{"role": "user", "content": "The scheduler admitted them " * 40}]  # over the character bound
    many = [{"role": "user", "content": "Ünïcödé 🙂 zqxj " * 12}]  # within it, but over 64 tokens
    *answers, engine = session(
        {"messages": huge, "max_tokens": 2},
        {"messages": many, "max_tokens": 2},
        {"messages": huge, "max_tokens": 2, "truncate_prompt_tokens": 20},
        {"messages": HELLO, "max_tokens": 64},
        {"messages": [{"role": "user", "content": 3}]},
    )
    too_huge, too_many, truncated, no_room, bad = answers
    assert len(engine.tokenizer.encode(many[0]["content"]).ids) > engine.model_config.context_length
    for error in (too_huge, too_many):
        assert isinstance(error, InvalidRequestError) and error.field == "messages"
        assert error_body(error)[0] == 400 and "truncate_prompt_tokens" in str(error)
    assert "tokens" in str(too_many)
    assert truncated["usage"]["prompt_tokens"] == 20
    assert isinstance(no_room, InvalidRequestError) and no_room.field == "max_tokens"  # the prompt fits
    assert isinstance(bad, InvalidRequestError) and bad.field == "messages[0].content"


def test_models_card_describes_the_compute_dial(make_engine):
    profile = ModelProfile.from_dict(
        make_engine().model_config,
        {
            "quality_tiers": {"fast": {"steps": 2}},
            "settings": [{"steps": 2, "experts": 2, "perplexity": 9.5}],
        },
    )
    engine = make_engine(profile=profile)
    latency = {(2, 2): 1.25}
    body = openai_schema.models_list(
        M, 7, engine, latency=latency, measured_on={"threads": 2}, chat_template="plain"
    )
    (card,) = body["data"]
    dial = card["leanserve"]
    assert card["id"] == M and card["max_model_len"] == 64
    assert dial["steps"] == {"min": 2, "max": 6, "default": engine.stats().default_steps}
    fast = next(t for t in dial["quality_tiers"] if t["name"] == "fast")
    assert fast == {"name": "fast", "steps": 2, "experts": 2, "perplexity": 9.5, "ms_per_token": 1.25}
    assert [t["name"] for t in dial["quality_tiers"]] == ["fast", "balanced", "best"]
    setting = engine.model_config.expert_setting
    assert dial["experts"] == {
        "name": setting.name,
        "min": setting.lo,
        "max": setting.hi,
        "default": setting.default,
    }
    assert (dial["backend"], dial["dtype"], dial["chat_template"]) == ("torch", "float32", "plain")
    assert dial["measured_on"] == {"threads": 2} and dial["latency_budget_ms"]["calibrated"] is False
    assert openai_schema.models_list(M, 7)["data"][0] == {
        "id": M,
        "object": "model",
        "created": 7,
        "owned_by": "leanserve",
    }


def test_measured_latency_reads_the_profile(tmp_path):
    settings = [{"steps": 2, "experts": 1, "ms_per_token": 1.5}, {"steps": 3, "perplexity": 2.0}]
    (tmp_path / "profile.json").write_text(json.dumps({"settings": settings, "measured_on": {"threads": 1}}))
    assert openai_schema.measured_latency(tmp_path) == ({(2, 1): 1.5}, {"threads": 1})
    assert openai_schema.measured_latency(None) == ({}, {})


@pytest.mark.parametrize(
    ("extra", "good", "bad"),
    [
        (
            openai_schema.CHAT_OPENAPI,
            {"messages": HELLO, "steps": 3, "quality": None, "truncate_prompt_tokens": 8},
            {"messages": HELLO, "bogus": 1},
        ),
        (
            openai_schema.COMPLETIONS_OPENAPI,
            {"prompt": [1, 2], "experts_top_k": 1},
            {"prompt": "x", "steps": "3"},
        ),
    ],
)
def test_openapi_request_schemas_document_the_extra_fields(extra, good, bad):
    schema = extra["requestBody"]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    for name in (
        "steps",
        "quality",
        "latency_budget_ms",
        "experts_top_k",
        "expert_depth",
        "truncate_prompt_tokens",
    ):
        assert name in schema["properties"]


def test_each_sse_event_is_its_own_http_body_message(make_engine, arun):
    """Our generator through Starlette's StreamingResponse (what the route returns): one ASGI
    `http.response.body` message per event, sent as it is produced (Ray's proxy forwards each)."""
    from starlette.responses import StreamingResponse

    engine = make_engine()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # no disconnect while streaming
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def go() -> None:
        await engine.start()
        try:
            body = {"messages": HELLO, "max_tokens": 6, "temperature": 0, "stream": True, "logprobs": True}
            events = await chat.start_chat(engine, ChatTemplate.plain(), body, M)
            response = StreamingResponse(events, media_type="text/event-stream")
            await response({"type": "http", "method": "POST", "asgi": {"spec_version": "2.4"}}, receive, send)
        finally:
            await engine.stop()

    arun(go())
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body" and m["body"]]
    assert all(b.count(b"data: ") == 1 for b in bodies)
    tokens = [len(json.loads(b[6:])["choices"][0]["logprobs"]["content"]) for b in bodies[:-1]]
    assert tokens == [1] * len(tokens) and 1 <= len(tokens) <= 6 and bodies[-1] == SSE_DONE.encode()


def test_backend_dtype():
    import torch

    class Onnx:
        dtype = torch.float16

    class Torch:
        model = torch.nn.Linear(2, 2).to(torch.bfloat16)

    assert openai_schema.backend_dtype(Onnx()) == "float16"
    assert openai_schema.backend_dtype(Torch()) == "bfloat16"
    assert openai_schema.backend_dtype(object()) is None
