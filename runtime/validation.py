"""Request validation: the one place that decides whether a request is acceptable.

Every field of a `GenerationRequest` is checked here (`validate_request`),
before the engine does any work on it: size limits first (a client is hostile
until proven otherwise), then types and ranges, each failure an
`InvalidRequestError` naming the field, the value and what is allowed. The
HTTP and gRPC front ends only translate their wire formats; the ranges live
here and in the model's config (`ModelConfig.step_range`, `expert_setting`).
"""

from __future__ import annotations

import math
from typing import Any

from tokenizers import Tokenizer

from models.config import ModelConfig
from runtime.policy import Tier
from runtime.types import EXIT_MODES, MAX_LOGPROBS, GenerationRequest, InvalidRequestError

# Size limits, checked before any work is done on a field (a client is hostile
# until proven otherwise). The prompt's own limit comes from the model: see
# `max_prompt_chars`.
MAX_ID_CHARS = 256  # request_id, client_id
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 128
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300
MAX_TEMPERATURE = 100.0
MAX_PRIORITY = 100
PENALTY_RANGE = 2.0  # presence_penalty, frequency_penalty in [-2, 2] (OpenAI's range)
LOGIT_BIAS_RANGE = 100.0
MAX_LATENCY_BUDGET_MS = 86_400_000.0  # one day
# With `truncate_prompt_tokens` a prompt may be longer than the context: these bound it before
# it is tokenised (text) or checked (ids). 1 MiB is the HTTP body limit.
MAX_TRUNCATED_PROMPT_CHARS = 2**20
MAX_TRUNCATED_PROMPT_IDS = 2**18
_FLOAT_MAX = 3.4028234663852886e38  # float32: what sampling computes in


def has_exit_gate(config: ModelConfig) -> bool:
    """The model reads its output from an exit gate's loop choice when asked (`exit_threshold`)."""
    from models.ouro import OuroConfig

    return isinstance(config, OuroConfig)


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that converts to a finite float32 (10**400 does not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and abs(float(value)) <= _FLOAT_MAX
    except OverflowError:
        return False


def check_text(name: str, value: Any, max_chars: int | None = None) -> str:
    """A string that is valid Unicode (encodable as UTF-8) and at most `max_chars` long."""
    if not isinstance(value, str):
        raise InvalidRequestError(name, value, "must be a string")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidRequestError(name, value, f"must be at most {max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            name, value, f"must be valid Unicode: a lone surrogate at character {e.start} cannot be encoded"
        ) from None
    return value


def _check_ids(name: str, ids: Any, V: int, max_len: int | None = None) -> list[int]:
    if not isinstance(ids, list):
        raise InvalidRequestError(name, ids, "must be a list of token ids")
    if max_len is not None and len(ids) > max_len:
        raise InvalidRequestError(name, ids, f"must hold at most {max_len} token ids")
    for t in ids:
        if not is_int(t) or not 0 <= t < V:
            raise InvalidRequestError(name, t, f"every id must be an integer in [0, {V - 1}]")
    return list(ids)


def max_prompt_chars(config: ModelConfig, tokenizer: Tokenizer) -> int:
    """The longest text prompt that could still fit the context (checked before tokenising).

    No token spells more than the longest vocabulary entry's characters
    (byte-level entries are one symbol per byte, so this over-counts), so a
    text longer than `context_length` times that always tokenises to more
    than `context_length` tokens.
    """
    longest = max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)
    return config.context_length * max(longest, 1)


def check_prompt_text(text: Any, limit: int) -> str:
    """The cheap checks of a text prompt, before it is tokenised (type, size, Unicode).

    Raises:
        InvalidRequestError: naming `prompt`.
    """
    if not isinstance(text, str) or not text:
        raise InvalidRequestError("prompt", text, "must be a non-empty string")
    return check_text("prompt", text, limit)


def _check_prompt_length(name: str, length: int, context_length: int) -> None:
    """A prompt that leaves no room for one new token is the prompt's fault: name the prompt."""
    if length >= context_length:
        raise InvalidRequestError(
            name,
            f"<{length} tokens>",
            f"must be at most {context_length - 1} tokens to leave room for max_tokens >= 1 "
            f"(context_length={context_length}); truncate_prompt_tokens keeps the last N",
        )


def _check_range(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> None:
    ok = is_int(value) if integer else is_number(value)
    if not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise InvalidRequestError(name, value, f"must be {kind} in [{lo:g}, {hi:g}]")


def validate_request(
    request: GenerationRequest,
    config: ModelConfig,
    tokenizer: Tokenizer,
    tiers: dict[str, Tier],
    prompt_limit: int | None = None,
    prompt_ids: list[int] | None = None,
) -> list[int]:
    """Check every field of a request and return its prompt token ids.

    Every check is bounded in cost by the field's size limit before the
    field is used, and every value accepted here can be computed with
    (sampling is float32; see runtime/sampling.py).

    Args:
        request: the request.
        config: the model's configuration (ranges, vocabulary, context).
        tokenizer: tokenises a text prompt.
        tiers: quality tiers the model offers.
        prompt_limit: most characters of a text prompt (default
            `max_prompt_chars`).
        prompt_ids: the text prompt's ids when the caller tokenised it
            already (`Engine.submit_async` does, off the event loop).

    Returns:
        The prompt token ids (tokenised text or the given ids).

    Raises:
        InvalidRequestError: naming the first invalid field, its value and
            the allowed range.
    """
    if not isinstance(request.request_id, str) or not request.request_id:
        raise InvalidRequestError("request_id", request.request_id, "must be a non-empty string")
    check_text("request_id", request.request_id, MAX_ID_CHARS)
    check_text("client_id", request.client_id, MAX_ID_CHARS)
    _check_range("priority", request.priority, -MAX_PRIORITY, MAX_PRIORITY, integer=True)

    # --- prompt ---------------------------------------------------------------
    text, ids = request.prompt, request.prompt_token_ids
    if (text is None) == (ids is None):
        which = "both" if text is not None else "neither"
        raise InvalidRequestError("prompt", which, "give exactly one of prompt or prompt_token_ids")
    V, ctx = config.vocab_size, config.context_length
    keep = request.sampling.truncate_prompt_tokens
    if keep is not None:
        _check_range("truncate_prompt_tokens", keep, 1, ctx, integer=True)
    if text is not None:
        limit = prompt_limit if prompt_limit is not None else max_prompt_chars(config, tokenizer)
        check_prompt_text(text, limit if keep is None else max(limit, MAX_TRUNCATED_PROMPT_CHARS))
        if prompt_ids is None:
            prompt_ids = tokenizer.encode(text).ids
        if not prompt_ids:
            raise InvalidRequestError("prompt", text, "must encode to at least one token")
        if keep is not None:
            prompt_ids = prompt_ids[-keep:]
        _check_prompt_length("prompt", len(prompt_ids), ctx)
        if max(prompt_ids) >= V:
            raise InvalidRequestError(
                "prompt", text, f"tokenises to ids >= vocab_size={V}; tokenizer and model do not match"
            )
    else:
        if not isinstance(ids, list) or not ids:
            raise InvalidRequestError("prompt_token_ids", ids, "must be a non-empty list of token ids")
        if keep is not None:
            if len(ids) > MAX_TRUNCATED_PROMPT_IDS:
                raise InvalidRequestError(
                    "prompt_token_ids", ids, f"must hold at most {MAX_TRUNCATED_PROMPT_IDS} token ids"
                )
            ids = ids[-keep:]
        _check_prompt_length("prompt_token_ids", len(ids), ctx)
        prompt_ids = _check_ids("prompt_token_ids", ids, V)

    # --- sampling -------------------------------------------------------------
    s = request.sampling
    if not is_int(s.max_tokens) or not 1 <= s.max_tokens <= config.context_length:
        raise InvalidRequestError(
            "max_tokens", s.max_tokens, f"must be an integer in [1, context_length={config.context_length}]"
        )
    total = len(prompt_ids) + s.max_tokens
    if total > config.context_length:
        raise InvalidRequestError(
            "max_tokens",
            s.max_tokens,
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({s.max_tokens}) = {total} "
            f"must be <= context_length={config.context_length}: lower max_tokens to at most "
            f"{config.context_length - len(prompt_ids)}",
        )
    if not is_number(s.temperature) or not 0 <= s.temperature <= MAX_TEMPERATURE:
        raise InvalidRequestError(
            "temperature", s.temperature, f"must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy)"
        )
    if not is_number(s.top_p) or not 0 < s.top_p <= 1:
        raise InvalidRequestError("top_p", s.top_p, "must lie in (0, 1]")
    if not is_int(s.top_k) or s.top_k < 0:
        raise InvalidRequestError("top_k", s.top_k, "must be an integer >= 0 (0 = disabled)")
    if s.seed is not None and (not is_int(s.seed) or not 0 <= s.seed < 2**63):
        raise InvalidRequestError("seed", s.seed, f"must be an integer in [0, {2**63 - 1}] or unset")
    if not isinstance(s.stop, list) or len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", s.stop, f"must be a list of at most {MAX_STOP_STRINGS} strings")
    for x in s.stop:
        if not isinstance(x, str) or not x:
            raise InvalidRequestError("stop", x, "every stop string must be a non-empty string")
        check_text("stop", x, MAX_STOP_CHARS)
    _check_ids("stop_token_ids", s.stop_token_ids, V, MAX_STOP_TOKEN_IDS)
    if not isinstance(s.ignore_eos, bool):
        raise InvalidRequestError("ignore_eos", s.ignore_eos, "must be true or false")
    _check_range("presence_penalty", s.presence_penalty, -PENALTY_RANGE, PENALTY_RANGE)
    _check_range("frequency_penalty", s.frequency_penalty, -PENALTY_RANGE, PENALTY_RANGE)
    if not isinstance(s.logit_bias, dict) or len(s.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(
            "logit_bias", s.logit_bias, f"must map at most {MAX_LOGIT_BIAS} token ids to biases"
        )
    for t, bias in s.logit_bias.items():
        if not is_int(t) or not 0 <= t < V:
            raise InvalidRequestError("logit_bias", t, f"every key must be a token id in [0, {V - 1}]")
        _check_range("logit_bias", bias, -LOGIT_BIAS_RANGE, LOGIT_BIAS_RANGE)
    if s.logprobs is not None:
        _check_range("logprobs", s.logprobs, 0, MAX_LOGPROBS, integer=True)

    # --- compute --------------------------------------------------------------
    c = request.compute
    lo, hi = config.step_range
    if c.steps is not None and (not is_int(c.steps) or not lo <= c.steps <= hi):
        raise InvalidRequestError("steps", c.steps, f"must be an integer in [{lo}, {hi}] for this model")
    if c.quality is not None and (not isinstance(c.quality, str) or c.quality not in tiers):
        raise InvalidRequestError("quality", c.quality, f"must be one of {', '.join(sorted(tiers))}")
    if c.latency_budget_ms is not None and (
        not is_number(c.latency_budget_ms) or not 0 < c.latency_budget_ms <= MAX_LATENCY_BUDGET_MS
    ):
        raise InvalidRequestError(
            "latency_budget_ms", c.latency_budget_ms, f"must be a number in (0, {MAX_LATENCY_BUDGET_MS:g}]"
        )
    setting = config.expert_setting
    for name in ("experts_top_k", "expert_depth"):
        value = getattr(c, name)
        if value is None:
            continue
        if setting is None or name != setting.name:
            takes = f"it takes {setting.name} instead" if setting else "it takes no expert setting"
            raise InvalidRequestError(name, value, f"not supported by this model (ffn={config.ffn}); {takes}")
        if not is_int(value) or not setting.lo <= value <= setting.hi:
            raise InvalidRequestError(name, value, f"must be an integer in [{setting.lo}, {setting.hi}]")
    t = c.exit_threshold
    if t is not None:
        if not has_exit_gate(config):
            raise InvalidRequestError(
                "exit_threshold", t, "not supported by this model: it has no exit gate (Ouro models have one)"
            )
        if not is_number(t) or not 0 < t <= 1:
            raise InvalidRequestError("exit_threshold", t, "must be a number in (0, 1]")
        if c.draft_steps:
            raise InvalidRequestError(
                "draft_steps", c.draft_steps, "must be 0 or unset with exit_threshold (no speculation)"
            )
    if c.exit_mode is not None:
        if t is None:
            raise InvalidRequestError("exit_mode", c.exit_mode, "needs exit_threshold")
        if not isinstance(c.exit_mode, str) or c.exit_mode not in EXIT_MODES:
            raise InvalidRequestError("exit_mode", c.exit_mode, f"must be one of {', '.join(EXIT_MODES)}")
    from runtime.speculation import validate as validate_speculation  # imports this module's helpers

    validate_speculation(c, config)
    return prompt_ids
