"""The engine against hostile input and failing models (issue 17 "Hardening").

Property tests (hypothesis) draw every sampling and compute field from its
whole domain, float32 edge values included: each request either runs to the
end or raises `InvalidRequestError` naming its field, and the engine serves
the next request. Fault tests wrap the real backend so that chosen forwards
raise or return NaN logits: only the affected requests fail, and only
repeated failures kill the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.tokenizer import EOT_TOKEN, eot_id
from runtime.sampling import GREEDY_BELOW_TEMPERATURE, LogitAdjust, NonFiniteLogitsError, sample_rows
from runtime.types import (
    ComputeParams,
    EngineUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)
from runtime.validation import validate_request
from tests.helpers import PROMPT, collect, req

# Float edge values: float32's smallest denormal and normal, values that round to 0 or
# overflow in float32, signed zeros, and the non-finite ones.
FLOAT_EDGES = [
    0.0, -0.0, 1e-45, 1.4e-45, 1e-300, 1.17549435e-38, 1e-38, 1e-7, GREEDY_BELOW_TEMPERATURE,
    0.5, 1.0, 1.0000001, 2.0, 100.0, 100.0001, 3.4e38, 3.5e38, 1e300,
    float("inf"), float("-inf"), float("nan"), -1e-45, -1.0,
]  # fmt: skip
ANY_NUMBER = st.one_of(
    st.sampled_from(FLOAT_EDGES),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=2.0),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=-3, max_value=30),
)
ANY_VALUE = st.one_of(
    ANY_NUMBER, st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2)
)
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _sampling(draw: Any) -> SamplingParams:
    return SamplingParams(
        max_tokens=draw(st.one_of(st.integers(min_value=1, max_value=3), ANY_VALUE)),
        temperature=draw(ANY_NUMBER),
        top_p=draw(ANY_NUMBER),
        top_k=draw(st.one_of(st.integers(min_value=-2, max_value=400), ANY_VALUE)),
        seed=draw(st.one_of(st.none(), st.integers(min_value=-1, max_value=2**64))),
        stop=draw(st.one_of(st.lists(st.text(max_size=3), max_size=3), ANY_VALUE)),
        presence_penalty=draw(ANY_NUMBER),
        frequency_penalty=draw(ANY_NUMBER),
        logit_bias=draw(
            st.one_of(
                st.dictionaries(st.integers(min_value=-1, max_value=330), ANY_NUMBER, max_size=3), ANY_VALUE
            )
        ),
        logprobs=draw(st.one_of(st.none(), st.integers(min_value=-1, max_value=25), ANY_VALUE)),
    )


@st.composite
def hostile_requests(draw: Any) -> GenerationRequest:
    """A request whose every field may be anything the wire formats can carry."""
    compute = ComputeParams(
        steps=draw(st.one_of(st.none(), st.integers(min_value=0, max_value=8), ANY_VALUE)),
        quality=draw(st.one_of(st.none(), st.sampled_from(["fast", "best", "turbo"]), ANY_VALUE)),
        latency_budget_ms=draw(st.one_of(st.none(), ANY_NUMBER)),
        experts_top_k=draw(st.one_of(st.none(), st.integers(min_value=0, max_value=3), ANY_VALUE)),
    )
    prompt = draw(
        st.one_of(
            st.just(PROMPT),
            st.text(min_size=1, max_size=20),  # lone surrogates included
            st.sampled_from([EOT_TOKEN, f"a{EOT_TOKEN}b", "", " "]),
        )
    )
    return GenerationRequest(
        request_id=draw(st.one_of(st.just("r"), st.text(max_size=3))),
        prompt=prompt,
        sampling=_sampling(draw),
        compute=compute,
        priority=draw(st.one_of(st.just(0), st.integers(min_value=-200, max_value=200), ANY_VALUE)),
    )


@SETTINGS
@given(request=hostile_requests())
def test_any_request_runs_or_names_its_field(make_engine, arun, request: GenerationRequest) -> None:
    """Every generated request runs to its end or is refused naming a field; the engine goes on."""
    engine = make_engine()

    async def scenario() -> None:
        await engine.start()
        try:
            try:
                stream = engine.submit(request)
            except InvalidRequestError as e:
                assert e.field and e.field in str(e) and len(str(e)) < 400
            else:
                _, ids, last = await collect(stream)
                assert last.finished and last.finish_reason in ("stop", "length")
                assert 1 <= len(ids) <= request.sampling.max_tokens
            _, ids, _ = await collect(engine.submit(req("next", max_tokens=2)))  # still serving
            assert len(ids) == 2 and engine.state == "running"
        finally:
            await engine.stop()

    arun(scenario())


@settings(max_examples=300, deadline=None)
@given(
    temperature=ANY_NUMBER, top_p=ANY_NUMBER, top_k=st.integers(min_value=0, max_value=400),
    presence=ANY_NUMBER, frequency=ANY_NUMBER, bias=ANY_NUMBER,
    scale=st.sampled_from([1.0, 1e-30, 1e4, 1e30]),
)  # fmt: skip
def test_validated_params_always_sample(
    tokenizer, temperature, top_p, top_k, presence, frequency, bias, scale
):
    """Whatever validation accepts, `sample_rows` draws a valid token from finite logits."""
    from tests.runtime.conftest import tiny_model_config

    config = tiny_model_config(tokenizer.get_vocab_size())
    p = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence,
        frequency_penalty=frequency, logit_bias={3: bias}, logprobs=2,
    )  # fmt: skip
    try:
        validate_request(GenerationRequest("r", prompt="x", sampling=p), config, tokenizer, {})
    except InvalidRequestError:
        return
    V = config.vocab_size
    logits = torch.randn(2, V) * scale
    gens = [torch.Generator().manual_seed(0) for _ in range(2)]
    draws = sample_rows(logits, [p, p], gens, [LogitAdjust.for_params(p)] * 2, [[1, 1, 2], []])
    for draw in draws:
        assert not isinstance(draw, BaseException)
        assert 0 <= draw.token < V
        assert draw.logprob is not None and len(draw.logprob.top) == 2


def test_float32_edge_sampling_values_run_and_the_engine_keeps_serving(make_engine, arun) -> None:
    """The values that killed the engine before (temperature=1e-45, top_p=1e-300) now just run."""
    engine = make_engine()

    async def scenario() -> list[int]:
        await engine.start()
        try:
            for kw in ({"temperature": 1e-45}, {"top_p": 1e-300, "temperature": 1.0}, {"temperature": 1e-38}):
                _, ids, last = await collect(engine.submit(req("edge", max_tokens=4, **kw)))
                assert len(ids) == 4 and last.finish_reason == "length"
            _, ids, _ = await collect(engine.submit(req("after", max_tokens=3)))
            return ids
        finally:
            await engine.stop()

    assert len(arun(scenario())) == 3


def test_tiny_temperature_is_greedy(make_engine, arun) -> None:
    engine = make_engine()

    async def scenario() -> tuple[list[int], list[int]]:
        await engine.start()
        try:
            _, greedy, _ = await collect(engine.submit(req("g", max_tokens=6)))
            _, tiny, _ = await collect(engine.submit(req("t", max_tokens=6, temperature=1e-30, seed=1)))
            return greedy, tiny
        finally:
            await engine.stop()

    greedy, tiny = arun(scenario())
    assert greedy == tiny


# --- faults --------------------------------------------------------------------------------
class _FlakyBackend:
    """Wraps a backend: forwards that contain `poison` in their tokens raise or return NaN."""

    def __init__(self, inner: Any, poison: int, mode: str = "raise") -> None:
        self._inner, self.poison, self.mode = inner, poison, mode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def forward(self, fwd):
        out = self._inner.forward(fwd)
        rows = (fwd.tokens == self.poison).any(dim=1)  # (B,)
        if rows.any():
            if self.mode == "raise":
                raise RuntimeError("injected fault")
            logits = out.logits.clone()  # inference tensors are read-only outside inference mode
            logits[rows] = float("nan")
            out = dataclasses.replace(out, logits=logits)
        return out


def _poisoned_engine(make_engine, tokenizer, mode: str, **kwargs: Any):
    engine = make_engine(**kwargs)
    poison = tokenizer.encode("Z").ids[0]
    engine.runner.backend = _FlakyBackend(engine.runner.backend, poison, mode)
    return engine


def test_a_failing_forward_fails_only_its_iteration(make_engine, tokenizer, arun) -> None:
    """A forward that raises fails the requests of that iteration; the loop goes on serving."""
    engine = _poisoned_engine(make_engine, tokenizer, "raise")

    async def scenario() -> None:
        await engine.start()
        try:
            with pytest.raises(EngineUnavailableError, match="injected|RuntimeError"):
                await collect(engine.submit(req("bad", prompt="Z Z Z")))
            for i in range(5):  # more than max_consecutive_failures good ones in between
                _, ids, _ = await collect(engine.submit(req(f"ok{i}", max_tokens=3)))
                assert len(ids) == 3
                with pytest.raises(EngineUnavailableError):
                    await collect(engine.submit(req(f"bad{i}", prompt="Z")))
            assert engine.state == "running"
            assert engine.kv.used_bytes == 0
        finally:
            await engine.stop()

    arun(scenario())


def test_repeated_failures_mark_the_engine_dead(make_engine, tokenizer, arun) -> None:
    engine = _poisoned_engine(make_engine, tokenizer, "raise", max_consecutive_failures=2)

    async def scenario() -> None:
        await engine.start()
        try:
            # Two poisoned requests arriving together fail in consecutive iterations only if
            # they are prefilled separately; submit them one after another.
            for i in range(2):
                with pytest.raises(EngineUnavailableError):
                    await collect(engine.submit(req(f"bad{i}", prompt="Z")))
            await asyncio.sleep(0)
            assert engine.state == "dead"
            with pytest.raises(EngineUnavailableError):
                engine.submit(req("after"))
        finally:
            await engine.stop()

    arun(scenario())


def test_non_finite_logits_fail_only_their_row(make_engine, tokenizer, arun) -> None:
    """NaN logits in one row fail that request; the rows batched with it finish normally."""
    engine = _poisoned_engine(make_engine, tokenizer, "nan")

    async def scenario() -> None:
        await engine.start()
        try:
            bad = engine.submit(req("bad", prompt="Z Z"))
            good = [engine.submit(req(f"g{i}", max_tokens=5)) for i in range(3)]
            results = await asyncio.gather(collect(bad), *map(collect, good), return_exceptions=True)
            assert isinstance(results[0], NonFiniteLogitsError)
            assert all(len(r[1]) == 5 for r in results[1:])
            assert engine.state == "running" and engine.kv.used_bytes == 0
        finally:
            await engine.stop()

    arun(scenario())


# --- OpenAI sampling fields ---------------------------------------------------------------
def test_logit_bias_forces_and_bans_tokens(make_engine, arun) -> None:
    engine = make_engine()

    async def scenario() -> tuple[list[int], list[int]]:
        await engine.start()
        try:
            _, forced, _ = await collect(engine.submit(req("f", max_tokens=4, logit_bias={7: 100.0})))
            _, free, _ = await collect(engine.submit(req("n", max_tokens=6)))
            banned_id = free[0]
            _, banned, _ = await collect(
                engine.submit(req("b", max_tokens=6, logit_bias={banned_id: -100.0}))
            )
            return forced, [banned_id, *banned]
        finally:
            await engine.stop()

    forced, (banned_id, *banned) = arun(scenario())
    assert forced == [7, 7, 7, 7]
    assert banned_id not in banned


def test_frequency_penalty_stops_repetition(make_engine, arun) -> None:
    engine = make_engine()

    async def scenario() -> tuple[list[int], list[int]]:
        await engine.start()
        try:
            # A bias makes token 9 the greedy choice; a frequency penalty larger than the
            # bias's lead can only allow it a bounded number of times.
            base = {"max_tokens": 12, "logit_bias": {9: 8.0}}
            _, plain, _ = await collect(engine.submit(req("p", **base)))
            _, penalised, _ = await collect(engine.submit(req("q", frequency_penalty=2.0, **base)))
            return plain, penalised
        finally:
            await engine.stop()

    plain, penalised = arun(scenario())
    assert plain.count(9) == 12
    assert penalised.count(9) < 12


def test_logprobs_report_the_sampled_token_and_top_alternatives(make_engine, arun) -> None:
    engine = make_engine()

    async def scenario():
        await engine.start()
        try:
            outs = [o async for o in engine.submit(req("l", max_tokens=5, logprobs=3))]
            plain = [o async for o in engine.submit(req("m", max_tokens=2))]
            return outs, plain
        finally:
            await engine.stop()

    outs, plain = arun(scenario())
    entries = [lp for o in outs for lp in o.logprobs]
    assert [e.token_id for e in entries] == [t for o in outs for t in o.token_ids]
    for e in entries:
        assert len(e.top) == 3
        values = [v for _, v in e.top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert e.top[0] == (e.token_id, pytest.approx(e.logprob))  # greedy: the top token
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-5
    assert all(o.logprobs is None for o in plain)


# --- control tokens, limits, off-loop tokenisation ----------------------------------------
def test_prompt_spelling_the_special_token_is_plain_text(make_engine, tokenizer, arun) -> None:
    """A client typing `<|endoftext|>` sends text, not the control id (issue 25)."""
    engine = make_engine()
    prompt = f"Ignore this.{EOT_TOKEN}And now"

    async def scenario():
        await engine.start()
        try:
            return await collect(engine.submit(req("s", prompt=prompt, max_tokens=3)))
        finally:
            await engine.stop()

    _, _, last = arun(scenario())
    ids = engine.tokenizer.encode(prompt).ids
    assert eot_id(engine.tokenizer) not in ids
    assert last.prompt_tokens == len(ids)
    assert engine.tokenizer.decode(ids) == prompt


def test_a_stop_string_spelling_the_special_token_matches_text_only(make_engine, arun) -> None:
    engine = make_engine()

    async def scenario():
        await engine.start()
        try:
            return await collect(engine.submit(req("s", max_tokens=8, stop=[EOT_TOKEN])))
        finally:
            await engine.stop()

    text, ids, last = arun(scenario())
    assert len(ids) == 8 and last.finish_reason == "length"  # ignore_eos: the id never stops it


def test_long_prompts_are_refused_before_tokenising_and_tokenised_off_loop(make_engine, arun):
    import threading

    engine = make_engine(tokenize_inline_chars=8)
    threads: list[str] = []
    encode = engine._encode_ids

    def spy(text: str) -> list[int]:
        threads.append(threading.current_thread().name)
        return encode(text)

    engine._encode_ids = spy

    async def scenario():
        await engine.start()
        try:
            with pytest.raises(InvalidRequestError, match="prompt.*at most"):
                await engine.submit_async(req("big", prompt="x" * 1_000_000))
            assert threads == []  # refused before any tokenisation
            return await collect(await engine.submit_async(req("long", prompt=PROMPT * 2, max_tokens=2)))
        finally:
            await engine.stop()

    _, ids, last = arun(scenario())
    assert len(ids) == 2 and last.prompt_tokens == len(engine.tokenizer.encode(PROMPT * 2).ids)
    assert len(threads) == 1 and threads[0] != threading.main_thread().name


def test_every_delta_of_a_logprobs_request_carries_a_list_even_a_cancelled_ones_last(make_engine, arun):
    """The final delta of a cancelled request has no token; its logprobs are [] (not None), so
    merged outputs keep every token's entry."""
    from runtime.grpc_servicer import merge_outputs

    engine = make_engine()

    async def scenario():
        await engine.start()
        try:
            outs = []
            async for out in engine.submit(req("c", max_tokens=30, logprobs=1)):
                outs.append(out)
                if len(outs) == 3:
                    engine.cancel("c")
            return outs
        finally:
            await engine.stop()

    outs = arun(scenario())
    assert outs[-1].finish_reason == "cancelled" and all(o.logprobs is not None for o in outs)
    merged = merge_outputs(outs)
    assert [lp.token_id for lp in merged.logprobs] == merged.token_ids
