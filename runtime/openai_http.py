"""OpenAI-compatible `/v1/completions` and `/v1/models`: body parsing, engine fan-out, response shapes.

Nothing here imports Ray or FastAPI: runtime/serve_app.py wires these functions
to the routes of the Serve deployment, and the unit tests call them with fake
engines (anything with `submit_async`, `cancel` and `tokenizer`).

Requests are accepted as the `openai` client sends them:

* `prompt`: a string, a list of strings, a list of token ids or a list of
  token-id lists. Each prompt times `n` becomes one engine request (distinct
  request ids; with a `seed`, choice `j` of a prompt uses `seed + j`, as
  vLLM does), so a body holds at most `MAX_CHOICES` choices. Choices are
  numbered prompt-major (`index = prompt * n + j`), as OpenAI does.
* `logprobs` (0..20): the sampled token's log-probability and the `logprobs`
  most likely alternatives, in OpenAI's completions format; `echo` prepends
  the prompt (token-id prompts are decoded); `echo` together with
  `logprobs` (prompt log-probabilities) is refused; `presence_penalty`,
  `frequency_penalty` and `logit_bias` go to the sampler; `user` is the
  client identity of fair admission, the extra field `priority` the order
  among that client's requests; `stream_options.include_usage` adds a final
  chunk with the usage of the whole request.
* `suffix` is refused unless null or "", `best_of` unless null or equal to
  `n`; any other field this server does not know is refused by name. A null
  value means the field is absent, for every optional field.
* Compute fields as extra body fields (`extra_body={...}` in the client):
  `steps`, `quality`, `latency_budget_ms`, `experts_top_k`, `expert_depth`.
  Responses carry an extra `leanserve` object with the compute used.

Bodies are bounded before they are parsed (`MAX_BODY_BYTES`, HTTP 413, and
`MAX_JSON_DEPTH` levels of nesting, 400), and every field is type-checked
here, so a wrong JSON type is a 400 naming the field rather than a 500; the
ranges are checked by the engine (`runtime.engine.validate_request`).

Errors use OpenAI's format `{"error": {"message", "type", "param", "code"}}`.
The HTTP status is derived from the same single error mapping as gRPC
(`runtime.grpc_servicer.status_for`): INVALID_ARGUMENT -> 400,
RESOURCE_EXHAUSTED -> 429, UNAVAILABLE -> 503, DEADLINE_EXCEEDED -> 504,
CANCELLED -> 499, UNAUTHENTICATED -> 401, anything else -> 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc

from runtime.engine import check_text
from runtime.grpc_servicer import merge_outputs, status_for
from runtime.types import (
    MAX_LOGPROBS,
    ComputeParams,
    GenerationRequest,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

# 1 MiB holds 16 prompts of a whole context each many times over; the bound keeps the worst
# case of the depth check plus json.loads (both hold the GIL) near 0.1 s per request.
MAX_BODY_BYTES = 2**20
MAX_JSON_DEPTH = 16  # a completions body needs 3 (body -> prompt list -> token-id list)
MAX_CHOICES = 16  # prompts x n per request
MAX_MESSAGE_CHARS = 2000  # error messages quote the offending value: never echo a whole prompt
LOGPROB_FLOOR = -9999.0  # stands in for -inf / NaN, which JSON cannot carry (vLLM's value)
_SEED_RANGE = 2**63

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
}
_COMPUTE_INTS = ("steps", "experts_top_k", "expert_depth")
_FIELDS = frozenset(
    {
        # OpenAI's completions fields
        "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stream",
        "stream_options", "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty",
        "best_of", "logit_bias", "user", "seed",
        # extensions (vLLM's names where vLLM has them)
        "top_k", "stop_token_ids", "priority",
        *_COMPUTE_INTS, "quality", "latency_budget_ms",
    }
)  # fmt: skip
# Engine field names that have another name in the OpenAI body.
_OPENAI_NAMES = {"prompt_token_ids": "prompt", "client_id": "user"}


class ModelNotFoundError(LookupError):
    """The request names a model this server does not serve (HTTP 404)."""


class BodyTooLargeError(InvalidRequestError):
    """The request body exceeds `MAX_BODY_BYTES` (HTTP 413)."""

    def __init__(self, size: int | str) -> None:
        super().__init__("body", f"{size} bytes", f"must be at most {MAX_BODY_BYTES} bytes")


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------
def error_payload(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """`(HTTP status, OpenAI error JSON)` for an exception."""
    if isinstance(error, BodyTooLargeError):
        return 413, error_payload(str(error), "invalid_request_error", "body", "request_too_large")
    if isinstance(error, ModelNotFoundError):
        code, message = grpc.StatusCode.NOT_FOUND, str(error)
    else:
        code, message = status_for(error)
    status, kind = _HTTP_STATUS.get(code, (500, "internal_error"))
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return status, error_payload(message, kind, getattr(error, "field", None), code.name.lower())


def http_error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """An OpenAI error object for an HTTP-level error (unknown route, wrong method, ...)."""
    kind = "invalid_request_error" if status < 500 else "internal_error"
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
    return error_payload(message, kind, param, code or f"http_{status}")


def dumps(payload: Any) -> str:
    """JSON text that is always encodable (non-ASCII escaped, so even a lone surrogate is safe)."""
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":"))


# ----------------------------------------------------------------------------
# Body: size, depth, JSON
# ----------------------------------------------------------------------------
_STRING = re.compile(rb'"[^"]*"')  # linear: runs after escaped quotes are removed
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text `raw` nests arrays/objects deeper than `limit` (brackets that do
    not balance may count as too deep), without recursion, in at most `limit` linear passes
    of C string operations.

    Strings are dropped first (escaped backslashes and quotes removed, then everything
    between quotes), leaving the structural brackets; each pass then removes the
    innermost empty pairs, i.e. exactly one level (a placeholder keeps the pairs that
    only become empty in this pass, such as the outer one of `{[]}`, for the next).
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # cannot nest deeper (whether it balances is for the JSON parser to say)
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _STRING.sub(b"", unescaped).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        shorter = brackets.replace(b"[]", b".").replace(b"{}", b".").translate(None, b".")
        if len(shorter) == len(brackets):
            return True  # no empty pair left: the brackets do not balance
        brackets = shorter
    return bool(brackets)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> Any:
    """Parse a request body with bounded size and nesting (`MAX_BODY_BYTES`, `MAX_JSON_DEPTH`).

    Raises:
        BodyTooLargeError: over `MAX_BODY_BYTES`.
        InvalidRequestError: not JSON (NaN/Infinity included), or nested too deep.
    """
    if len(raw) > MAX_BODY_BYTES:
        raise BodyTooLargeError(len(raw))
    if json_depth_exceeds(raw):
        raise InvalidRequestError("body", "nested JSON", f"must nest at most {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise InvalidRequestError("body", "not JSON", f"must be a JSON object ({e})") from None


# ----------------------------------------------------------------------------
# Fields: defensive conversions (a wrong JSON type is a 400 naming the field)
# ----------------------------------------------------------------------------
class _Shown:
    """A value as it appears in an error message (long values shortened)."""

    def __init__(self, value: Any) -> None:
        if isinstance(value, (list, dict)):
            self.text = f"<{type(value).__name__} of {len(value)} items>"
        elif isinstance(value, str) and len(value) > 64:
            self.text = repr(value[:64]) + f"... ({len(value)} characters)"
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
            self.text = f"<integer of {value.bit_length()} bits>"
        else:
            self.text = repr(value)

    def __repr__(self) -> str:
        return self.text


def _invalid(name: str, value: Any, allowed: str) -> InvalidRequestError:
    return InvalidRequestError(name, _Shown(value), allowed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(fields: dict[str, Any], name: str, default: Any = None) -> Any:
    if name not in fields:
        return default
    value = fields[name]
    if not _is_int(value):
        raise _invalid(name, value, "must be an integer")
    return value


def _number(fields: dict[str, Any], name: str, default: float | None = None) -> float | None:
    return _float(name, fields[name]) if name in fields else default


def _float(name: str, value: Any) -> float:
    """A finite JSON number as a float (an integer such as 10**400 overflows: refused)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _invalid(name, value, "must be a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _invalid(name, value, "must be a finite number")
    return number


def _boolean(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise _invalid(name, value, "must be true or false")
    return value


def _text(name: str, value: Any) -> str:
    """A string that is valid Unicode (JSON may carry a lone surrogate such as "\\ud800")."""
    if not isinstance(value, str):
        raise _invalid(name, value, "must be a string")
    return check_text(name, value)


_PROMPT_TYPES = "must be a string, a list of strings, a list of token ids or a list of token-id lists"


def _prompts(value: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of prompts (each a string or token ids)."""
    if isinstance(value, str):
        return [_text("prompt", value)]
    if not isinstance(value, list) or not value:
        raise _invalid("prompt", value, _PROMPT_TYPES)
    if all(isinstance(p, str) for p in value):
        return [_text("prompt", p) for p in value]
    if all(_is_int(t) for t in value):
        return [value]
    if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in value):
        return list(value)
    raise _invalid("prompt", value, _PROMPT_TYPES)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [_text("stop", value)]
    if not isinstance(value, list):
        raise _invalid("stop", value, "must be a string or a list of strings")
    return [_text("stop", s) for s in value]


def _token_ids(name: str, value: Any) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise _invalid(name, value, "must be a list of token ids")
    return value


def _logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's `{"token id as a string": bias}` as `{token id: bias}` (ranges: the engine)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("logit_bias", value, 'must map token ids to biases, e.g. {"50256": -100}')
    bias = {}
    for key, b in value.items():
        digits = key[1:] if key.startswith("-") else key
        if not (digits.isascii() and digits.isdigit() and len(key) <= 12):
            raise _invalid("logit_bias", key, "every key must be a token id (a decimal integer)")
        bias[int(key)] = _float("logit_bias", b)
    return bias


def _choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice `j` of a seeded request samples with `seed + j` (vLLM's rule); an invalid seed is
    passed on unchanged, for the engine to name."""
    if seed is None or choice == 0 or not 0 <= seed < _SEED_RANGE:
        return seed
    return (seed + choice) % _SEED_RANGE


# ----------------------------------------------------------------------------
# Parsing a body into engine requests
# ----------------------------------------------------------------------------
@dataclass
class CompletionPlan:
    """A `/v1/completions` body as engine requests and response options.

    Attributes:
        id: the response id (`cmpl-...`).
        requests: one engine request per choice, in choice-index order
            (prompt-major: choice `i` is prompt `i // n`, sample `i % n`).
        n: choices per prompt.
        stream: answer with server-sent events.
        echo: prepend the prompt to each choice's text.
        logprobs: alternatives per token in `logprobs` (None = no logprobs).
        include_usage: streaming: a final chunk with the whole request's usage.
    """

    id: str
    requests: list[GenerationRequest]
    n: int = 1
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None
    include_usage: bool = False


def parse_completions(body: Any, model_name: str, client_id: str = "") -> CompletionPlan:
    """Convert a `/v1/completions` body into a `CompletionPlan`.

    Args:
        body: the parsed JSON body.
        model_name: the served model; `model` must name it (or be absent).
        client_id: the client identity when the body has no `user`.

    Raises:
        InvalidRequestError: a field has the wrong type or is not supported (named).
        ModelNotFoundError: `model` names another model.
    """
    if not isinstance(body, dict):
        raise _invalid("body", body, "must be a JSON object")
    fields = {k: v for k, v in body.items() if v is not None}  # null = absent
    unknown = sorted(set(fields) - _FIELDS)
    if unknown:
        raise _invalid(unknown[0], fields[unknown[0]], "is not a supported field")
    model = _text("model", fields.get("model", model_name))
    if model != model_name:
        raise ModelNotFoundError(f"The model {model!r} does not exist; this server serves {model_name!r}")
    if "prompt" not in fields:
        raise _invalid("prompt", None, "is required")
    prompts = _prompts(fields["prompt"])
    n = _integer(fields, "n", 1)
    if n < 1:
        raise _invalid("n", n, "must be an integer >= 1")
    if n * len(prompts) > MAX_CHOICES:
        raise _invalid("n", n, f"n x {len(prompts)} prompt(s) must be at most {MAX_CHOICES} choices")
    if _integer(fields, "best_of", n) != n:
        raise _invalid(
            "best_of", fields["best_of"], f"must equal n ({n}) or be null: best_of is not supported"
        )
    if fields.get("suffix", "") != "":
        raise _invalid("suffix", fields["suffix"], 'is not supported (only null or "")')
    stream, echo = _boolean(fields, "stream"), _boolean(fields, "echo")
    logprobs = _integer(fields, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise _invalid("logprobs", logprobs, f"must be an integer in [0, {MAX_LOGPROBS}]")
    if echo and logprobs is not None:
        raise _invalid("echo", True, "echo with logprobs (prompt log-probabilities) is not supported")
    include_usage = _stream_options(fields.get("stream_options"), stream)
    client = _text("user", fields["user"]) if "user" in fields else client_id
    d = SamplingParams()
    seed = _integer(fields, "seed")
    compute = dict(
        quality=_text("quality", fields["quality"]) if "quality" in fields else None,
        latency_budget_ms=_number(fields, "latency_budget_ms"),
        **{name: _integer(fields, name) for name in _COMPUTE_INTS},
    )

    sampling = SamplingParams(
        max_tokens=_integer(fields, "max_tokens", d.max_tokens),
        temperature=_number(fields, "temperature", d.temperature),
        top_p=_number(fields, "top_p", d.top_p),
        top_k=_top_k(fields),
        seed=seed,
        stop=_stop(fields.get("stop")),
        stop_token_ids=_token_ids("stop_token_ids", fields.get("stop_token_ids")),
        presence_penalty=_number(fields, "presence_penalty", d.presence_penalty),
        frequency_penalty=_number(fields, "frequency_penalty", d.frequency_penalty),
        logit_bias=_logit_bias(fields.get("logit_bias")),
        logprobs=logprobs,
    )

    priority = _integer(fields, "priority", 0)
    rid = f"cmpl-{uuid.uuid4().hex}"
    total = n * len(prompts)
    requests = [
        GenerationRequest(
            request_id=rid if total == 1 else f"{rid}-{i}",
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=None if isinstance(prompt, str) else list(prompt),
            sampling=replace(sampling, seed=_choice_seed(seed, i % n)),
            compute=ComputeParams(**compute),
            client_id=client,
            priority=priority,
        )
        for i, prompt in enumerate(p for p in prompts for _ in range(n))
    ]
    return CompletionPlan(rid, requests, n, stream, echo, logprobs, include_usage)


def _top_k(fields: dict[str, Any]) -> int:
    """`top_k`; vLLM's -1 (disabled) is this engine's 0."""
    top_k = _integer(fields, "top_k", 0)
    return 0 if top_k == -1 else top_k


def _stream_options(value: Any, stream: bool) -> bool:
    """`stream_options.include_usage` (only with `stream`, as OpenAI and vLLM require)."""
    if value is None:
        return False
    if not stream:
        raise _invalid("stream_options", value, "may only be set with stream=true")
    if not isinstance(value, dict):
        raise _invalid("stream_options", value, "must be an object")
    options = {k: v for k, v in value.items() if v is not None}
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise _invalid(f"stream_options.{unknown[0]}", options[unknown[0]], "is not a supported field")
    return _boolean(options, "include_usage")


def parse_completion(body: Any, model_name: str) -> tuple[GenerationRequest, bool]:
    """The single engine request of a one-choice body, and whether it streams.

    Raises:
        InvalidRequestError: as `parse_completions`, or the body asks for several choices.
        ModelNotFoundError: `model` names another model.
    """
    plan = parse_completions(body, model_name)
    if len(plan.requests) != 1:
        raise _invalid("n", len(plan.requests), "parse_completion takes one choice; see parse_completions")
    return plan.requests[0], plan.stream


# ----------------------------------------------------------------------------
# Running a plan on the engine
# ----------------------------------------------------------------------------
class CompletionEngine(Protocol):
    """What the completions route needs of `runtime.engine.Engine`."""

    tokenizer: Any

    async def submit_async(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...

    def cancel(self, request_id: str) -> bool: ...


async def submit_all(engine: CompletionEngine, plan: CompletionPlan) -> list[AsyncIterator[RequestOutput]]:
    """Submit every choice's request; if one is refused, cancel those already queued.

    Raises:
        Whatever `Engine.submit` raises (engine field names mapped to the OpenAI ones).
    """
    streams: list[AsyncIterator[RequestOutput]] = []
    try:
        for request in plan.requests:
            streams.append(await engine.submit_async(request))
    except BaseException as e:
        for request in plan.requests[: len(streams)]:
            engine.cancel(request.request_id)
        if isinstance(e, InvalidRequestError) and e.field in _OPENAI_NAMES:
            raise InvalidRequestError(_OPENAI_NAMES[e.field], e.value, e.allowed) from None
        raise
    return streams


async def _merged(
    engine: CompletionEngine, plan: CompletionPlan, streams: list[AsyncIterator[RequestOutput]]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """`(choice index, delta)` from all choices as they arrive; on exit (done, error or the
    consumer gone) every stream is closed and every request still live is cancelled."""
    tasks: list[asyncio.Task] = []
    try:
        if len(streams) == 1:  # the common case, without a task per token
            async for out in streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((index, out))
            except Exception as e:
                queue.put_nowait((index, e))
            queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        for request in plan.requests:
            engine.cancel(request.request_id)  # a no-op for finished requests


# ----------------------------------------------------------------------------
# Response shapes
# ----------------------------------------------------------------------------
def _leanserve(out: RequestOutput) -> dict[str, Any]:
    return {"steps": out.steps, "experts": out.experts, "policy_reason": out.policy_reason}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's vocabulary characters -> the bytes they stand for (GPT-2's scheme:
    printable Latin-1 bytes are themselves, the other 68 bytes are shifted to U+0100 onwards)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(0x100 + i): b for i, b in enumerate(shifted)})
    return table


_BYTE_LEVEL = _byte_level_alphabet()


class _Choices:
    """Per-choice response state: echo prefix, logprob token strings and text offsets.

    A token is shown as its own text (the id decoded alone, special tokens spelled
    out), except a token that is only part of a UTF-8 character, which is shown as
    OpenAI does, `bytes:\\xe2\\x80` (its bytes, from a byte-level vocabulary), so that
    distinct tokens never share a key in `top_logprobs`. `text_offset` is where the
    token's text starts in the choice's text (the tokens of one character share it).
    """

    def __init__(self, plan: CompletionPlan, tokenizer: Any) -> None:
        self.plan = plan
        self.tokenizer = tokenizer
        self.started = [False] * len(plan.requests)
        self.offsets = [0] * len(plan.requests)  # text length up to the last complete character
        self.pending: list[list[int]] = [[] for _ in plan.requests]  # ids of an incomplete character
        self._strings: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        """A token's string in `tokens` and `top_logprobs`."""
        text = self._strings.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            piece = self.tokenizer.id_to_token(token_id) if "\ufffd" in text else None
            if piece and all(ch in _BYTE_LEVEL for ch in piece):
                text = "bytes:" + "".join(f"\\x{_BYTE_LEVEL[ch]:02x}" for ch in piece)
            self._strings[token_id] = text
        return text

    def text(self, index: int, out: RequestOutput) -> str:
        """The delta's text, the prompt in front of a choice's first delta under `echo`."""
        if self.started[index] or not self.plan.echo:
            self.started[index] = True
            return out.text
        self.started[index] = True
        request = self.plan.requests[index]
        prompt = (
            request.prompt if request.prompt is not None else self.tokenizer.decode(request.prompt_token_ids)
        )
        self.offsets[index] = len(prompt)
        return prompt + out.text

    def _offset(self, index: int, token_id: int) -> int:
        """The token's `text_offset`; advances past its text once its character is complete."""
        offset, pending = self.offsets[index], self.pending[index]
        pending.append(token_id)
        text = self.tokenizer.decode(pending)
        if not text.endswith("\ufffd") or len(pending) >= 4:  # 4: the longest UTF-8 character
            self.offsets[index] += len(text)
            pending.clear()
        return offset

    def logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """OpenAI's completions `logprobs` object for a delta's tokens (None when not asked for)."""
        if self.plan.logprobs is None:
            return None
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for entry in entries or []:
            token = self.token_text(entry.token_id)
            top = {token: _finite(entry.logprob)}  # the sampled token is always listed
            for token_id, logprob in entry.top:
                top.setdefault(self.token_text(token_id), _finite(logprob))
            tokens.append(token)
            token_logprobs.append(top[token])
            top_logprobs.append(top)
            text_offset.append(self._offset(index, entry.token_id))
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }

    def choice(self, index: int, out: RequestOutput, entries: list[TokenLogprob] | None) -> dict[str, Any]:
        """One element of `choices` (the finish reason only once the choice finished)."""
        return {
            "index": index,
            "text": self.text(index, out),
            "logprobs": self.logprobs(index, entries),
            "finish_reason": out.finish_reason if out.finished else None,
        }


def _usage(plan: CompletionPlan, finals: list[RequestOutput]) -> dict[str, int]:
    """Usage over choices: each prompt's tokens once (its first choice), every choice's tokens."""
    prompt = sum(out.prompt_tokens for i, out in enumerate(finals) if i % plan.n == 0)
    completion = sum(out.completion_tokens for out in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _usage_of(out: RequestOutput) -> dict[str, int]:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    }


def _envelope(
    plan: CompletionPlan, model_name: str, created: int, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": plan.id,
        "object": "text_completion",
        "created": created,
        "model": model_name,
        "choices": choices,
    }


async def complete(
    engine: CompletionEngine,
    plan: CompletionPlan,
    streams: list[AsyncIterator[RequestOutput]],
    model_name: str,
    created: int | None = None,
) -> dict[str, Any]:
    """Run every choice to completion: the non-streaming `text_completion` object."""
    deltas: list[list[RequestOutput]] = [[] for _ in streams]
    async with contextlib.aclosing(_merged(engine, plan, streams)) as merged:
        async for index, out in merged:
            deltas[index].append(out)
    finals = [merge_outputs(d) for d in deltas]
    choices = _Choices(plan, engine.tokenizer)
    body = _envelope(
        plan,
        model_name,
        created or int(time.time()),
        [
            choices.choice(i, out, [e for o in deltas[i] for e in o.logprobs or []])
            for i, out in enumerate(finals)
        ],
    )
    body["usage"] = _usage(plan, finals)
    body["leanserve"] = _leanserve(finals[0])
    return body


async def sse_events(
    engine: CompletionEngine,
    plan: CompletionPlan,
    streams: list[AsyncIterator[RequestOutput]],
    model_name: str,
    created: int | None = None,
) -> AsyncIterator[str]:
    """The server-sent events of a streaming completion, ending with `SSE_DONE`.

    One chunk per delta of any choice (carrying its index). Without
    `include_usage` a choice's last chunk has that choice's usage (what
    leanserve always sent); with it every chunk has `"usage": null` and a final
    chunk with no choices has the usage of the whole request (OpenAI's rule).
    An error after the first event is reported in-band (the status is sent).
    """
    created = created or int(time.time())
    choices = _Choices(plan, engine.tokenizer)
    finals: list[RequestOutput | None] = [None] * len(streams)
    try:
        async with contextlib.aclosing(_merged(engine, plan, streams)) as merged:
            async for index, out in merged:
                chunk = _envelope(plan, model_name, created, [choices.choice(index, out, out.logprobs)])
                if plan.include_usage:
                    chunk["usage"] = None
                elif out.finished:
                    chunk["usage"] = _usage_of(out)
                chunk["leanserve"] = _leanserve(out)
                if out.finished:
                    finals[index] = out
                yield f"data: {dumps(chunk)}\n\n"
        if plan.include_usage:
            done = [out for out in finals if out is not None]
            final = _envelope(plan, model_name, created, [])
            final["usage"] = _usage(plan, done) if len(done) == len(finals) else None
            yield f"data: {dumps(final)}\n\n"
    except Exception as e:  # the status line is sent already: report in-band
        yield sse_error(e)
    yield SSE_DONE


def sse_error(error: BaseException) -> str:
    """An error that happens after the stream started (the status is already 200)."""
    return f"data: {dumps(error_body(error)[1])}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def models_list(model_name: str, created: int) -> dict[str, Any]:
    """The `/v1/models` body."""
    return {
        "object": "list",
        "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "leanserve"}],
    }
