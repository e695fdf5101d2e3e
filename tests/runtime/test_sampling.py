"""Sampling and text-stream tests (no model)."""

from __future__ import annotations

import pytest
import torch

from runtime.sampling import TextStream, filter_logits, make_generator, sample_rows
from runtime.types import SamplingParams


def sample(logits, params, generators) -> list[int]:
    """The tokens `sample_rows` draws (no logit adjustments); a row's error is raised."""
    draws = sample_rows(logits, params, generators)
    for d in draws:
        if isinstance(d, BaseException):
            raise d
    return [d.token for d in draws]


def test_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0)]
    assert sample(logits, params, [None, None]) == [1, 0]


def test_top_k_keeps_k_most_likely():
    x = filter_logits(torch.tensor([1.0, 4.0, 3.0, 2.0]), temperature=1.0, top_k=2, top_p=1.0)
    assert torch.isfinite(x).tolist() == [False, True, True, False]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = filter_logits(probs.log(), temperature=1.0, top_k=0, top_p=0.8)
    assert torch.isfinite(x).tolist() == [True, True, False, False]
    # A tiny top_p still keeps the most likely token.
    x = filter_logits(probs.log(), temperature=1.0, top_k=0, top_p=1e-6)
    assert torch.isfinite(x).tolist() == [True, False, False, False]


def test_temperature_scales_logits():
    x = filter_logits(torch.tensor([2.0, 4.0]), temperature=2.0, top_k=0, top_p=1.0)
    assert x.tolist() == [1.0, 2.0]


def test_filtered_tokens_are_never_sampled():
    logits = torch.randn(1, 50)
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    p = SamplingParams(temperature=1.5, top_k=3)
    gen = make_generator(0)
    drawn = {sample(logits, [p], [gen])[0] for _ in range(200)}
    assert drawn <= allowed and len(drawn) > 1


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=123)
    other = SamplingParams(temperature=1.0, seed=7)
    alone_gen, batch_gen, other_gen = make_generator(123), make_generator(123), make_generator(7)
    alone = [sample(logits[1:2], [p], [alone_gen])[0] for _ in range(20)]
    batched = [
        sample(logits, [other, p, SamplingParams(temperature=0)], [other_gen, batch_gen, None])[1]
        for _ in range(20)
    ]
    assert alone == batched


def test_sample_checks_shapes():
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(2, 5), [SamplingParams()], [None])


class CharTok:
    """A stand-in tokenizer: id i decodes to chr(i) (enough for TextStream)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(stream: TextStream, text: str) -> list[str]:
    return [stream.push(ord(ch)) for ch in text]


def test_stop_string_not_emitted_and_tail_dropped():
    stream = TextStream(CharTok(), [], stop=["END"])
    out = feed(stream, "abcENDxyz")
    assert "".join(out) == "abc" and stream.stopped
    assert stream.finish() == ""


def test_possible_stop_prefix_is_held_back_then_released():
    stream = TextStream(CharTok(), [], stop=["abc"])
    out = feed(stream, "xab")
    assert out == ["x", "", ""]  # "a", "ab" could start "abc"
    assert stream.push(ord("d")) == "abd"  # disambiguated: not a stop
    out = feed(stream, "ab")
    assert stream.finish() == "ab"  # the stream ended before "abc" completed
    assert not stream.stopped


def test_earliest_of_several_stop_strings_wins():
    stream = TextStream(CharTok(), [], stop=["zz", "b"])
    assert "".join(feed(stream, "aabzz")) == "aa"


def test_stop_string_spanning_one_token(tokenizer):
    ids = tokenizer.encode("the queue was empty. Then").ids
    stream = TextStream(tokenizer, [], stop=["was"])
    text = "".join(stream.push(t) for t in ids) + stream.finish()
    assert text == "the queue "


def test_utf8_split_across_tokens_is_never_broken(tokenizer):
    text = "emoji 😀 and 中文"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text) - 4  # the emoji and CJK characters span several byte tokens
    stream = TextStream(tokenizer, [])
    deltas = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_greedy_ties_take_the_first_maximal_index():
    logits = torch.zeros(3, 8)
    logits[0, [2, 5]] = 1.0
    logits[1, [0, 7]] = 2.0  # rows 0 and 1 tie; row 2 is all equal
    params = [SamplingParams(temperature=0.0)] * 3
    assert sample(logits, params, [None] * 3) == [2, 0, 0]
