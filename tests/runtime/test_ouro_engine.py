"""Serving an Ouro directory (issue 23): the engine end to end, KV per loop, the dial, chat.

The tiny directory (`ouro_tiny_dir`, tests/conftest.py) is the one of the golden values of
tests/models/test_ouro.py (the reference's tokens, provenance there).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from runtime.settings import EngineConfig
from runtime.types import ComputeParams, GenerationRequest, SamplingParams
from tests.helpers import collect

GOLDEN = json.loads((Path(__file__).parents[1] / "models" / "golden" / "ouro_tiny.json").read_text())
PROMPT = GOLDEN["provenance"]["prompts"]["a"]
LOOPS = [1, 2, 3, 4]


def _engine(model_dir: Path, **settings):
    from runtime.engine import Engine

    ec = dict(kv_cache_bytes=2**20, page_size=8, max_batch_size=8, max_waiting=16)
    ec.update(settings)
    return Engine.from_model_dir(model_dir, EngineConfig(**ec))


def _request(rid: str, steps: int | None, max_tokens: int = 8) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(
        rid, prompt_token_ids=list(PROMPT), sampling=sampling, compute=ComputeParams(steps)
    )


def _forwards_seen(engine) -> list:
    """Every `Forward` the engine's backend runs, in order (a spy on `backend.forward`)."""
    seen: list = []
    forward = engine.backend.forward

    def spy(fwd):
        seen.append(fwd)
        return forward(fwd)

    engine.backend.forward = spy
    return seen


def _run_batch(engine, requests, arun) -> list:
    """Submit `requests` at once to a started engine; each one's (text, ids, last output)."""

    async def scenario():
        await engine.start()
        try:
            return await asyncio.gather(*(collect(engine.submit(r)) for r in requests))
        finally:
            await engine.stop()

    return arun(scenario())


def test_engine_generates_the_reference_tokens_for_every_loop_count_batched(ouro_tiny_dir, arun):
    """Four requests at loops 1..4 share the prefill and decode forwards (the trunk's mixed
    step schedule); each gets the reference's greedy tokens for its loop count."""
    engine = _engine(ouro_tiny_dir)
    forwards = _forwards_seen(engine)
    results = _run_batch(engine, [_request(f"r{n}", n) for n in LOOPS], arun)
    steps_seen = [f.steps for f in forwards]
    assert [ids for _, ids, _ in results] == [GOLDEN["loops"]["a"][str(n)]["greedy"] for n in LOOPS]
    assert [last.steps for _, _, last in results] == LOOPS
    assert any(len(set(s)) == 4 for s in steps_seen), (
        steps_seen
    )  # rows of all four loop counts in one forward
    assert engine.stats().kv_used_bytes == 0


def test_default_steps_run_every_loop(ouro_tiny_dir, arun):
    from tests.helpers import run_alone

    _, ids, last = arun(run_alone(_engine(ouro_tiny_dir), _request("d", None)))
    assert last.steps == 4 and ids == GOLDEN["loops"]["a"]["4"]["greedy"]


def test_kv_reservation_is_loops_x_layers_x_tokens(ouro_tiny_dir):
    engine = _engine(ouro_tiny_dir)
    c, runner = engine.model_config, engine.runner
    per_token_loop = 2 * c.loop_layers * c.n_kv_heads * c.head_dim * 4  # K and V, float32
    assert runner.allocator.page_bytes == per_token_loop * 8
    assert tuple(runner.storage.k.shape[1:]) == (8, c.loop_layers * c.n_kv_heads, c.head_dim)
    for n in LOOPS:  # a 24-token reservation: 3 pages per loop
        assert runner.allocator.pages_needed(n, 24) * runner.allocator.page_bytes == n * 24 * per_token_loop


def test_the_dial_reports_the_loop_range(ouro_tiny_dir):
    from runtime.openai_schema import compute_options

    engine = _engine(ouro_tiny_dir)
    opts = compute_options(engine)
    assert opts["steps"] == {"min": 1, "max": 4, "default": 4}
    assert opts["experts"] is None and opts["backend"] == "torch"
    assert opts["exit_threshold"] == {"min_exclusive": 0, "max": 1, "modes": ["all_loops", "stop_early"]}
    from runtime.grpc_servicer import model_info
    from runtime.proto_build import load_stubs

    pb2, _ = load_stubs()
    assert model_info(pb2, engine).exit_threshold_supported


def test_a_model_without_an_exit_gate_says_so(tiny_model_dir):
    from runtime.grpc_servicer import model_info
    from runtime.openai_schema import compute_options
    from runtime.proto_build import load_stubs

    engine = _engine(tiny_model_dir)
    assert compute_options(engine)["exit_threshold"] is None
    assert not model_info(load_stubs()[0], engine).exit_threshold_supported


def test_steps_beyond_total_ut_steps_are_refused_naming_the_range(ouro_tiny_dir, arun):
    from runtime.types import InvalidRequestError

    engine = _engine(ouro_tiny_dir)

    async def scenario():
        await engine.start()
        try:
            with pytest.raises(InvalidRequestError, match=r"steps.*\[1, 4\]"):
                engine.submit(_request("x", 5))
        finally:
            await engine.stop()

    arun(scenario())


def test_compiled_decode_is_refused_for_ouro(ouro_tiny_dir):
    from models.checkpoint import load_model
    from runtime.backends.torch_backend import TorchBackend
    from runtime.settings import CompileSpec

    with pytest.raises(ValueError, match="compile: the compiled decode is built for LeanLM blocks"):
        TorchBackend(load_model(ouro_tiny_dir), CompileSpec())


def test_bfloat16_halves_the_kv_pool_and_keeps_the_first_token(ouro_tiny_dir):
    from models.checkpoint import load_model
    from runtime.backends.torch_backend import TorchBackend
    from runtime.runner import ModelRunner, Row

    backend = TorchBackend(load_model(ouro_tiny_dir).to(torch.bfloat16))
    runner = ModelRunner(backend, 2**20, 8)
    assert runner.storage.k.dtype == torch.bfloat16
    assert (
        runner.allocator.page_bytes == 2 * 2 * 2 * 16 * 2 * 8
    )  # K,V x layers x kv heads x hs x 2 bytes x page
    first = []
    for n in LOOPS:
        runner.allocator.reserve(f"s{n}", n, 16)
        first.append(Row(f"s{n}", list(PROMPT), 0, n, sampling=SamplingParams(temperature=0.0)))
    result = runner.execute(runner.prepare(first))
    gold = [GOLDEN["loops"]["a"][str(n)]["greedy"][0] for n in LOOPS]
    # bf16 weights and KV: logits move by < 0.1 (top-1 margins here are > 0.3), the tokens stay
    assert [result.tokens[f"s{n}"] for n in LOOPS] == gold


CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Loop <|im_end|> twice?"},
]
EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n"
    "<|im_start|>user\nLoop <|im_end|> twice?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_the_chat_template_renders_the_templates_expected_output(ouro_tiny_dir):
    from runtime.chat_template import ChatTemplate

    template = ChatTemplate.from_model_dir(ouro_tiny_dir)
    assert template.origin == "tokenizer_config.json"
    assert template.render(CONVERSATION) == EXPECTED
    with_system = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]]
    assert template.render(with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    )


def test_the_chat_template_renders_as_transformers_renders_it(ouro_tiny_dir):
    transformers = pytest.importorskip("transformers")
    from runtime.chat_template import ChatTemplate

    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(ouro_tiny_dir))  # no remote code
    assert hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == EXPECTED
    ours = ChatTemplate.from_model_dir(ouro_tiny_dir)
    from models.tokenizer import load_tokenizer

    ids = ours.encode(CONVERSATION, load_tokenizer(ouro_tiny_dir / "tokenizer.json"))
    # The template's 5 <|im_start|> (id 1) and 4 <|im_end|> (id 2) are control ids; the <|im_end|>
    # typed in the last user message is plain text (no fifth id 2).
    assert ids[0] == 1 and ids.count(1) == 5 and ids.count(2) == 4


def test_generation_config_eos_ids_stop_requests(ouro_tiny_dir, tmp_path, arun):
    """`generation_config.json`'s `eos_token_id` list becomes the engine's stop ids (Ouro's
    `<|im_end|>` ends a chat turn), unless the request sets `ignore_eos`."""
    import shutil

    from models.checkpoint import CheckpointError, generation_stop_ids

    engine = _engine(ouro_tiny_dir)
    assert set(generation_stop_ids(ouro_tiny_dir, engine.model_config.vocab_size)) <= set(engine._eot)
    free = arun(engine_run(engine, _request("free", 4, max_tokens=8)))  # ignore_eos: runs to 8
    stop_at = free.token_ids[2]
    copy = tmp_path / "ouro"
    shutil.copytree(ouro_tiny_dir, copy)
    gen = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [stop_at]}))
    stopping = _engine(copy)
    request = _request("stops", 4, max_tokens=8)
    request.sampling.ignore_eos = False
    out = arun(engine_run(stopping, request))
    first = free.token_ids.index(stop_at)
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    (copy / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [10**6]}))
    with pytest.raises(CheckpointError, match="eos_token_id"):
        generation_stop_ids(copy, engine.model_config.vocab_size)


async def engine_run(engine, request):
    """Start, generate one request (its merged output), stop."""
    await engine.start()
    try:
        return await engine.generate(request)
    finally:
        await engine.stop()


def _threshold_request(rid: str, threshold: float | None, steps: int | None = None) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    compute = ComputeParams(steps, exit_threshold=threshold)
    return GenerationRequest(rid, prompt_token_ids=list(PROMPT), sampling=sampling, compute=compute)


def test_exit_threshold_per_request_gives_the_reference_tokens_batched(ouro_tiny_dir, arun):
    """The reference's threshold exit (every loop runs, each token reads its exit loop's
    state) per request, served with the paged cache: the reference's greedy tokens (its full
    recompute per token) for every threshold, in one batch with plain requests at other loop
    counts, whose tokens stay theirs."""
    engine = _engine(ouro_tiny_dir)
    thresholds = ["0.25", "0.5", "0.75", "0.95"]
    forwards = _forwards_seen(engine)
    reqs = [_threshold_request(f"t{t}", float(t)) for t in thresholds]
    results = _run_batch(engine, reqs + [_request("plain2", 2), _request("plain4", 4)], arun)
    assert [r[2].mean_loops for r in results] == [4.0, 4.0, 4.0, 4.0, None, None]
    seen = [f.exit_threshold for f in forwards]
    for t, (_, ids, last) in zip(thresholds, results):
        assert ids == GOLDEN["threshold"]["a"][t]["greedy"], t
        assert last.steps == 4  # every loop ran
    assert results[4][1] == GOLDEN["loops"]["a"]["2"]["greedy"]
    assert results[5][1] == GOLDEN["loops"]["a"]["4"]["greedy"]
    mixed = [s for s in seen if s is not None and len(s) == 6]
    assert mixed, "the threshold rows and the plain rows never shared a forward"
    assert sorted(mixed[-1].tolist()) == [0.25, 0.5, 0.75, 0.949999988079071, 2.0, 2.0]
    assert engine.stats().kv_used_bytes == 0


def test_exit_threshold_is_refused_where_it_cannot_apply(ouro_tiny_dir, tiny_model_dir, arun):
    from runtime.types import InvalidRequestError

    engine = _engine(ouro_tiny_dir)
    lean = _engine(tiny_model_dir)

    async def scenario():
        await engine.start()
        await lean.start()
        try:
            for bad, field in (
                (0.0, "exit_threshold"),
                (1.5, "exit_threshold"),
                (float("nan"), "exit_threshold"),
            ):
                with pytest.raises(InvalidRequestError) as e:
                    engine.submit(_threshold_request("x", bad))
                assert e.value.field == field and "(0, 1]" in str(e.value)
            req = _threshold_request("y", 0.5)
            req.compute.draft_steps = 2
            with pytest.raises(InvalidRequestError) as e:
                engine.submit(req)
            assert e.value.field == "draft_steps"
            with pytest.raises(InvalidRequestError) as e:
                lean.submit(
                    GenerationRequest("z", prompt_token_ids=[1, 2], compute=ComputeParams(exit_threshold=0.5))
                )
            assert e.value.field == "exit_threshold" and "no exit gate" in str(e.value)
        finally:
            await engine.stop()
            await lean.stop()

    arun(scenario())


def test_stop_early_exit_mode_saves_loops_and_frees_the_kv(ouro_tiny_dir, arun):
    """exit_mode "stop_early" (experimental): a generated token stops looping at its exit loop.
    Its own choice is the reference's (it depends on its loops so far), and the prompt runs
    every loop, so the first two tokens equal the reference's threshold tokens; later tokens
    read copied KV in the loops earlier tokens skipped. The decode runs fewer loops, plain rows
    batched with it keep their tokens, and every page is freed."""
    from models.ouro import OuroExecutor

    engine = _engine(ouro_tiny_dir)
    applied: list[int] = []  # rows per loop application of one-token forwards
    block = OuroExecutor.block

    def counting(self, k, x, h, view, setting):
        if x.shape[1] == 1:
            applied.append(x.shape[0])
        return block(self, k, x, h, view, setting)

    OuroExecutor.block = counting
    try:
        early = _threshold_request("early", 0.25)
        early.compute.exit_mode = "stop_early"
        results = _run_batch(engine, [early, _request("plain4", 4)], arun)
    finally:
        OuroExecutor.block = block
    (_, ids, last), (_, plain, _) = results
    gold = GOLDEN["threshold"]["a"]["0.25"]["greedy"]
    assert ids[:2] == gold[:2] and len(ids) == 8
    assert last.steps == 4  # the loops it may run; the decode ran fewer
    assert 1 <= last.mean_loops < 4  # what it ran, reported
    assert plain == GOLDEN["loops"]["a"]["4"]["greedy"]
    # 7 decode iterations of 2 rows at 4 loops would apply 7 x 4 loops to 2 rows each.
    assert sum(applied) < 7 * 4 * 2, applied
    assert engine.stats().kv_used_bytes == 0


def test_stop_early_at_an_unreachable_threshold_is_the_all_loops_mode(ouro_tiny_dir, arun):
    requests = []
    for mode in ("all_loops", "stop_early"):
        r = _threshold_request(mode, 1.0)
        r.compute.exit_mode = mode
        requests.append(r)
    (_, a, last_a), (_, b, last_b) = _run_batch(_engine(ouro_tiny_dir), requests, arun)
    assert a == b == GOLDEN["loops"]["a"]["4"]["greedy"]
    assert last_a.mean_loops == last_b.mean_loops == 4.0


def test_exit_mode_is_checked(ouro_tiny_dir, arun):
    from runtime.types import InvalidRequestError

    engine = _engine(ouro_tiny_dir)

    async def scenario():
        await engine.start()
        try:
            bad = _threshold_request("m", 0.5)
            bad.compute.exit_mode = "sometimes"
            with pytest.raises(InvalidRequestError, match="all_loops, stop_early") as e:
                engine.submit(bad)
            assert e.value.field == "exit_mode"
            alone = _request("n", 4)
            alone.compute.exit_mode = "stop_early"
            with pytest.raises(InvalidRequestError, match="needs exit_threshold"):
                engine.submit(alone)
        finally:
            await engine.stop()

    arun(scenario())


def test_stop_early_alone_when_every_row_exits_at_the_first_loop(ouro_tiny_dir, arun):
    """A decode forward whose only row exits after loop 1: the later loops run no row at all.
    For prompt "a" at 0.25 every generated token exits at loop 1 (measured), so no token ever
    reads copied KV and the tokens are the reference's."""
    r = _threshold_request("alone", 0.25)
    r.compute.exit_mode = "stop_early"
    ((_, ids, last),) = _run_batch(_engine(ouro_tiny_dir), [r], arun)
    assert ids == GOLDEN["threshold"]["a"]["0.25"]["greedy"]
    # The first token came from the prompt's forward (every loop), the 7 others after 1 loop each.
    assert last.mean_loops == pytest.approx((4 + 7 * 1) / 8)
