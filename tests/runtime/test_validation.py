"""Prompt length and truncation in `runtime.validation.validate_request` (the one place)."""

from __future__ import annotations

import pytest

from runtime.policy import ModelProfile
from runtime.types import GenerationRequest, InvalidRequestError, SamplingParams
from runtime.validation import MAX_TRUNCATED_PROMPT_IDS, validate_request
from tests.runtime.conftest import tiny_model_config


@pytest.fixture
def check(tokenizer):
    config = tiny_model_config(tokenizer.get_vocab_size())  # context_length 64
    tiers = ModelProfile.default_tiers(config)

    def run(max_tokens: int = 4, keep: int | None = None, **prompt) -> list[int]:
        sampling = SamplingParams(max_tokens=max_tokens, truncate_prompt_tokens=keep)
        return validate_request(GenerationRequest("r", sampling=sampling, **prompt), config, tokenizer, tiers)

    return run


def _error(fn, **kw) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as err:
        fn(**kw)
    return err.value


def test_truncation_keeps_the_last_prompt_tokens(check, tokenizer):
    ids = list(range(1, 101))
    assert check(prompt_token_ids=ids, keep=10) == ids[-10:]
    assert check(prompt_token_ids=[5, 6], keep=10) == [5, 6]  # shorter prompts are kept whole
    text = "The scheduler admitted them first come, first served " * 20
    assert check(prompt=text, keep=12) == tokenizer.encode(text).ids[-12:]


def test_the_prompt_alone_too_long_names_the_prompt(check):
    err = _error(check, prompt_token_ids=[1] * 64)
    assert err.field == "prompt_token_ids" and "truncate_prompt_tokens" in err.allowed
    assert _error(check, prompt_token_ids=[1] * 10**6).field == "prompt_token_ids"  # refused before the loop
    text = "The scheduler admitted them first come, first served " * 20
    assert _error(check, prompt=text).field == "prompt"
    # The prompt fits; prompt + max_tokens does not: max_tokens is the field to change.
    err = _error(check, prompt_token_ids=[1] * 60, max_tokens=10)
    assert err.field == "max_tokens" and "at most 4" in err.allowed
    assert check(prompt_token_ids=[1] * 63, max_tokens=1) == [1] * 63


@pytest.mark.parametrize("keep", [0, -1, 65, 2.0, True, "3"])
def test_truncate_prompt_tokens_range(check, keep):
    assert _error(check, prompt_token_ids=[1], keep=keep).field == "truncate_prompt_tokens"


def test_truncated_prompts_are_still_bounded_and_checked(check):
    assert (
        _error(check, prompt_token_ids=[1] * (MAX_TRUNCATED_PROMPT_IDS + 1), keep=8).field
        == "prompt_token_ids"
    )
    assert (
        _error(check, prompt_token_ids=[1, 10**9], keep=8).field == "prompt_token_ids"
    )  # kept ids: in range
