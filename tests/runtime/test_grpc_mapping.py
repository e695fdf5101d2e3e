"""Unit tests (no Ray): the single error mapping, request conversion, OpenAI parsing, builder args."""

from __future__ import annotations

import time

import grpc
import pytest

from runtime import grpc_servicer as conv
from runtime import openai_http
from runtime.proto_build import load_stubs
from runtime.serve_app import ServeArgs, deployment_options
from runtime.types import (
    DeadlineExceededError,
    EngineUnavailableError,
    InvalidRequestError,
    OverloadedError,
    RequestCancelledError,
    RequestOutput,
)

pb2, _ = load_stubs()


class FakeContext:
    """Records set_code/set_details like Ray's RayServegRPCContext."""

    def __init__(self, metadata: list[tuple[str, str]] | None = None) -> None:
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None
        self._metadata = metadata or []

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("top_p", 2.0, "must lie in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
        (OverloadedError("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExceededError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (RequestCancelledError("gone"), grpc.StatusCode.CANCELLED),
        (EngineUnavailableError("draining"), grpc.StatusCode.UNAVAILABLE),
        (KeyError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_engine_error_maps_to_its_code(error, code):
    ctx = FakeContext()
    assert conv.set_error(ctx, error) is code
    assert ctx.code is code
    if code is grpc.StatusCode.INTERNAL:
        assert "bug" not in ctx.details  # internals stay in the log, not in the reply
    else:
        assert ctx.details == str(error)


def test_invalid_argument_details_name_field_and_range():
    code, details = conv.status_for(InvalidRequestError("top_p", 2.0, "must lie in (0, 1]"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "top_p" in details and "(0, 1]" in details


def test_unset_fields_keep_engine_defaults_and_set_fields_convert():
    req = conv.to_engine_request(pb2.GenerateRequest(prompt="hi"))
    assert req.prompt == "hi" and req.request_id
    assert (req.sampling.max_tokens, req.sampling.temperature, req.sampling.seed) == (16, 1.0, None)
    assert req.compute.steps is None and req.deadline is None
    msg = pb2.GenerateRequest(
        prompt="hi",
        request_id="r1",
        sampling=pb2.SamplingParams(max_tokens=5, temperature=0.0, seed=3, stop=["."], stop_token_ids=[7]),
        compute=pb2.ComputeParams(steps=0, experts_top_k=1),
    )
    req = conv.to_engine_request(msg)
    assert req.request_id == "r1"
    assert (req.sampling.max_tokens, req.sampling.temperature, req.sampling.seed) == (5, 0.0, 3)
    assert req.sampling.stop == ["."] and req.sampling.stop_token_ids == [7]
    # `optional` makes an explicit 0 distinguishable from unset, so the engine can reject it by name.
    assert req.compute.steps == 0 and req.compute.experts_top_k == 1
    assert req.compute.exit_threshold is None
    gated = conv.to_engine_request(
        pb2.GenerateRequest(prompt="hi", compute=pb2.ComputeParams(exit_threshold=0.5))
    )
    assert gated.compute.exit_threshold == 0.5


def test_deadline_feeds_latency_budget_only_without_explicit_compute():
    t0 = time.monotonic()
    req = conv.to_engine_request(pb2.GenerateRequest(prompt="hi"), timeout_ms=250.0)
    assert req.compute.latency_budget_ms == 250.0
    assert req.deadline is not None and 0.2 < req.deadline - t0 < 0.3
    explicit = pb2.GenerateRequest(prompt="hi", compute=pb2.ComputeParams(steps=3))
    req = conv.to_engine_request(explicit, timeout_ms=250.0)
    assert req.compute.latency_budget_ms is None and req.compute.steps == 3 and req.deadline is not None


def test_timeout_metadata_parsing():
    assert conv.timeout_ms_from_metadata(FakeContext([("x-leanserve-timeout-ms", "1500")])) == 1500.0
    assert conv.timeout_ms_from_metadata(FakeContext([("other", "1")])) is None
    assert conv.timeout_ms_from_metadata(None) is None
    with pytest.raises(InvalidRequestError, match="x-leanserve-timeout-ms"):
        conv.timeout_ms_from_metadata(FakeContext([("x-leanserve-timeout-ms", "-3")]))


def _out(**kw) -> RequestOutput:
    base = dict(
        request_id="r", text="ab", token_ids=[1, 2], finished=True, finish_reason="length",
        prompt_tokens=3, completion_tokens=2, steps=4, experts=None, policy_reason="explicit",
        queue_s=0.001, first_token_s=0.01, total_s=0.02,
    )  # fmt: skip
    base.update(kw)
    return RequestOutput(**base)


def test_response_fields_and_finish_reasons():
    resp = conv.to_response(pb2, _out())
    assert resp.finish_reason == pb2.FINISH_REASON_LENGTH
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 2)
    assert resp.compute.steps == 4 and not resp.compute.HasField("experts")
    assert resp.timings.first_token_s == pytest.approx(0.01)
    assert conv.to_response(pb2, _out(finished=False, finish_reason=None)).finish_reason == 0
    assert conv.to_response(pb2, _out(finish_reason="stop", experts=2)).compute.experts == 2
    assert not resp.compute.HasField("mean_loops")  # only requests with an exit threshold
    assert conv.to_response(pb2, _out(mean_loops=2.5)).compute.mean_loops == 2.5
    assert conv.merge_outputs([_out(mean_loops=4.0), _out(mean_loops=2.5)]).mean_loops == 2.5
    from runtime.openai_common import leanserve_block

    assert (
        "mean_loops" not in leanserve_block(_out())
        and leanserve_block(_out(mean_loops=2.5))["mean_loops"] == 2.5
    )
    merged = conv.merge_outputs(
        [_out(text="a", token_ids=[1], finished=False), _out(text="b", token_ids=[2])]
    )
    assert merged.text == "ab" and merged.token_ids == [1, 2]


def test_openai_parsing_and_error_statuses():
    req, stream = openai_http.parse_completion(
        {"model": "m", "prompt": ["hi"], "max_tokens": 4, "stream": True, "steps": 2, "temperature": 0}, "m"
    )
    assert stream and req.prompt == "hi" and req.compute.steps == 2 and req.sampling.max_tokens == 4
    with pytest.raises(openai_http.ModelNotFoundError):
        openai_http.parse_completion({"model": "other", "prompt": "x"}, "m")
    with pytest.raises(InvalidRequestError, match="bogus"):
        openai_http.parse_completion({"prompt": "x", "bogus": 1}, "m")
    assert openai_http.error_body(InvalidRequestError("top_p", 2, "must lie in (0, 1]"))[0] == 400
    assert openai_http.error_body(InvalidRequestError("top_p", 2, "x"))[1]["error"]["param"] == "top_p"
    assert openai_http.error_body(OverloadedError("full"))[0] == 429
    assert openai_http.error_body(EngineUnavailableError("loading"))[0] == 503
    assert openai_http.error_body(openai_http.ModelNotFoundError("no"))[0] == 404
    assert openai_http.error_body(RuntimeError("bug"))[0] == 500


def test_builder_args_are_validated_before_ray():
    args = ServeArgs.from_dict({"model_dir": "x", "max_waiting": 3, "deployment": {"num_replicas": 2}})
    assert args.engine == {"max_waiting": 3} and args.deployment == {"num_replicas": 2}
    with pytest.raises(ValueError, match="max_wating"):
        ServeArgs.from_dict({"max_wating": 3})
    with pytest.raises(ValueError, match="replicas"):
        ServeArgs.from_dict({"deployment": {"replicas": 2}})
    with pytest.raises(ValueError, match="stream_interval"):
        ServeArgs.from_dict({"stream_interval": 0})
    assert ServeArgs.from_dict({"compile": True}).compile is True
    with pytest.raises(ValueError, match="compile=true needs backend=torch"):
        ServeArgs.from_dict({"compile": True, "backend": "onnx"})
    with pytest.raises(ValueError, match="compile='yes' must be true or false"):
        ServeArgs.from_dict({"compile": "yes"})
    assert ServeArgs.from_dict({"compile": True, "compile_steps": [2, 12]}).compile_steps == [2, 12]
    assert ServeArgs.from_dict({"compile": True, "compile_steps": "all"}).compile_steps == "all"
    with pytest.raises(ValueError, match="compile_steps: needs compile=true"):
        ServeArgs.from_dict({"compile_steps": [2]})
    for bad in ("most", [2, "3"], 4, [True]):
        with pytest.raises(ValueError, match=r"compile_steps=.*: must be 'all', 'auto'"):
            ServeArgs.from_dict({"compile": True, "compile_steps": bad})


def _delta(i: int, n: int) -> RequestOutput:
    last = i == n - 1
    return RequestOutput(
        request_id="r",
        text=f"t{i} ",
        token_ids=[i],
        finished=last,
        finish_reason="length" if last else None,
        prompt_tokens=3,
        completion_tokens=i + 1,
        steps=4,
        experts=None,
        policy_reason="explicit",
    )


@pytest.mark.parametrize(
    ("n", "interval", "sizes"), [(10, 1, [1] * 10), (10, 4, [1, 4, 4, 1]), (3, 8, [1, 2])]
)
def test_stream_coalescing_first_at_once_then_every_interval_tokens(n, interval, sizes):
    import asyncio

    async def source():
        for i in range(n):
            yield _delta(i, n)

    async def collect():
        return [out async for out in conv.coalesce(source(), interval)]

    merged = asyncio.run(collect())
    assert [len(m.token_ids) for m in merged] == sizes
    assert "".join(m.text for m in merged) == "".join(f"t{i} " for i in range(n))
    assert [t for m in merged for t in m.token_ids] == list(range(n))
    assert merged[-1].finished and merged[-1].finish_reason == "length"
    assert not any(m.finished for m in merged[:-1])


def test_replica_admits_what_the_engine_can_hold_unless_configured():
    """Ray's default of 5 ongoing requests would cap continuous batching at 5 rows."""
    opts = deployment_options(ServeArgs.from_dict({"max_batch_size": 16, "max_waiting": 8}))
    assert opts["max_ongoing_requests"] == 24
    opts = deployment_options(
        ServeArgs.from_dict({"deployment": {"max_ongoing_requests": 7, "num_replicas": 2}})
    )
    assert opts["max_ongoing_requests"] == 7 and opts["num_replicas"] == 2
    # One drain bound for Ray's replica stop and the engine (runtime/serve_config.py's default).
    assert opts["graceful_shutdown_timeout_s"] == 20.0
    auto = deployment_options(
        ServeArgs.from_dict({"deployment": {"num_replicas": 2, "autoscaling_config": {}}})
    )
    assert "num_replicas" not in auto


def test_client_error_log_records_become_one_warning_line():
    import logging

    from runtime.grpc_servicer import AbortedRpcError, ClientErrorLogFilter

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "ray.serve", logging.ERROR, __file__, 1, "Request failed.", (), (type(exc), exc, None)
        )

    class WrappedError(Exception):  # Ray's gRPCStatusError in the proxy
        def __init__(self, original):
            self.original_exception = original

    f = ClientErrorLogFilter()
    for exc in (
        AbortedRpcError("INVALID_ARGUMENT: invalid top_p=2"),
        WrappedError(AbortedRpcError("UNAUTHENTICATED: x")),
    ):
        r = record(exc)
        assert f.filter(r) and r.levelno == logging.WARNING and r.exc_info is None
        assert r.getMessage().startswith("client error: ")
    internal = record(AbortedRpcError("INTERNAL: bug"))
    assert f.filter(internal) and internal.levelno == logging.ERROR and internal.exc_info is not None


# --- chat and truncation over gRPC (issue 19) ------------------------------------------------
def _chat(**kw) -> object:
    from runtime.client import build_request

    return build_request(pb2, kw.pop("prompt", ""), **kw)


def test_chat_requests_convert_only_with_their_encoding():
    msg = _chat(messages=[{"role": "user", "content": "hi"}], truncate_prompt_tokens=5, max_tokens=3)
    assert msg.sampling.truncate_prompt_tokens == 5 and msg.messages[0].role == "user"
    assert not msg.HasField("add_generation_prompt")
    request = conv.to_engine_request(msg, prompt_token_ids=[4, 5])
    assert (request.prompt, request.prompt_token_ids, request.sampling.truncate_prompt_tokens) == (
        None,
        [4, 5],
        5,
    )
    for bad in (msg, _chat(prompt="x", messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(InvalidRequestError) as err:
            conv.to_engine_request(bad)
        assert err.value.field == "messages"
    assert conv.to_engine_request(_chat(prompt="x")).sampling.truncate_prompt_tokens is None


def test_submit_generate_renders_the_conversation_and_names_the_fields(make_engine, arun):
    from runtime.chat_template import ChatTemplate

    engine, template = make_engine(), ChatTemplate.plain()
    hello = [{"role": "user", "content": "The scheduler admitted them"}]
    long = "The scheduler admitted them " * 40

    async def answer(msg, chat=template) -> object:
        try:
            outs = [o async for o in await conv.submit_generate(engine, msg, FakeContext(), chat)]
        except InvalidRequestError as e:
            return e
        return conv.merge_outputs(outs)

    async def go() -> list[object]:
        await engine.start()
        try:
            return [
                await answer(_chat(messages=hello, max_tokens=3, temperature=0)),
                await answer(_chat(messages=hello, max_tokens=3, add_generation_prompt=False)),
                await answer(_chat(messages=[{"role": "tool", "content": "x"}])),
                await answer(_chat(messages=hello * 30, max_tokens=3)),
                await answer(_chat(messages=hello, max_tokens=3), chat=None),
                await answer(_chat(prompt=long, max_tokens=2)),
                await answer(_chat(prompt=long, max_tokens=2, truncate_prompt_tokens=9)),
                await answer(_chat(messages=hello * 30, max_tokens=2, truncate_prompt_tokens=9)),
            ]
        finally:
            await engine.stop()

    chat, no_prompt, tool, long_chat, no_template, long_text, truncated, truncated_chat = arun(go())
    rendered = template.render(hello)
    assert chat.prompt_tokens == len(engine.tokenizer.encode(rendered).ids) and chat.completion_tokens >= 1
    assert no_prompt.prompt_tokens == len(engine.tokenizer.encode(template.render(hello, False)).ids)
    assert tool.field == "messages[0].role" and "tool" in str(tool)
    assert long_chat.field == "messages" and no_template.field == "messages"
    assert long_text.field == "prompt"  # the prompt alone is too long: not max_tokens
    assert truncated.prompt_tokens == 9 and truncated_chat.prompt_tokens == 9


def test_model_info_describes_the_compute_dial(make_engine):
    engine = make_engine()
    info = conv.model_info(
        pb2, engine, latency={(6, 2): 2.5}, measured_on={"threads": 2}, chat_template="plain"
    )
    setting = engine.model_config.expert_setting
    assert (info.min_steps, info.max_steps, info.context_length) == (2, 6, 64)
    assert (info.expert_setting.name, info.expert_setting.min, info.expert_setting.max) == (
        setting.name, setting.lo, setting.hi,
    )  # fmt: skip
    assert info.expert_setting.default == setting.default
    best = next(t for t in info.quality_tiers if t.name == "best")
    assert best.steps == 6 and best.ms_per_token == 2.5 and not best.HasField("perplexity")
    assert (info.dtype, info.chat_template, info.backend, dict(info.measured_on)) == (
        "float32", "plain", "torch", {"threads": "2"},
    )  # fmt: skip
    dense = conv.model_info(pb2, make_engine(ffn="dense"))
    assert not dense.HasField("expert_setting") and dense.chat_template == ""
