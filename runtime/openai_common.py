"""What the OpenAI-compatible routes share: errors, bounded bodies, typed fields, fan-out.

`runtime/openai_http.py` (`/v1/completions`) and `runtime/openai_chat.py`
(`/v1/chat/completions`) both parse their bodies with the converters here, so
a wrong JSON type is a 400 naming the field in either route, and both run
their choices through `submit_all` / `merged`. Nothing here imports Ray or
FastAPI.

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import grpc

from runtime.grpc_servicer import merge_outputs, status_for
from runtime.prompts import pretokenize_truncated
from runtime.types import (
    MAX_LOGPROBS,
    ComputeParams,
    GenerationRequest,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
)
from runtime.validation import check_text, is_int

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
COMPUTE_INTS = ("steps", "experts_top_k", "expert_depth", "draft_steps", "draft_tokens")

# Engine field names that have another name in the OpenAI body.
OPENAI_NAMES = {"prompt_token_ids": "prompt", "client_id": "user"}


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


def invalid(name: str, value: Any, allowed: str) -> InvalidRequestError:
    """The 400 for field `name` (its value shortened in the message)."""
    return InvalidRequestError(name, _Shown(value), allowed)


def integer_field(fields: dict[str, Any], name: str, default: Any = None) -> Any:
    """`fields[name]` as an integer (a bool is not one), `default` when absent."""
    if name not in fields:
        return default
    value = fields[name]
    if not is_int(value):
        raise invalid(name, value, "must be an integer")
    return value


def number_field(fields: dict[str, Any], name: str, default: float | None = None) -> float | None:
    """`fields[name]` as a finite float, `default` when absent."""
    return finite_float(name, fields[name]) if name in fields else default


def finite_float(name: str, value: Any) -> float:
    """A finite JSON number as a float (an integer such as 10**400 overflows: refused)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise invalid(name, value, "must be a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise invalid(name, value, "must be a finite number")
    return number


def bool_field(fields: dict[str, Any], name: str) -> bool:
    """`fields[name]` as a JSON boolean (absent = false)."""
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise invalid(name, value, "must be true or false")
    return value


def text_field(name: str, value: Any) -> str:
    """A string that is valid Unicode (JSON may carry a lone surrogate such as "\\ud800")."""
    if not isinstance(value, str):
        raise invalid(name, value, "must be a string")
    return check_text(name, value)


def stop_field(value: Any) -> list[str]:
    """OpenAI's `stop`: a string or a list of strings (the engine bounds count and length)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [text_field("stop", value)]
    if not isinstance(value, list):
        raise invalid("stop", value, "must be a string or a list of strings")
    return [text_field("stop", s) for s in value]


def token_ids_field(name: str, value: Any) -> list[int]:
    """A list of integers (ranges: the engine)."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(is_int(t) for t in value):
        raise invalid(name, value, "must be a list of token ids")
    return value


def logit_bias_field(value: Any) -> dict[int, float]:
    """OpenAI's `{"token id as a string": bias}` as `{token id: bias}` (ranges: the engine)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("logit_bias", value, 'must map token ids to biases, e.g. {"50256": -100}')
    bias = {}
    for key, b in value.items():
        digits = key[1:] if key.startswith("-") else key
        if not (digits.isascii() and digits.isdigit() and len(key) <= 12):
            raise invalid("logit_bias", key, "every key must be a token id (a decimal integer)")
        bias[int(key)] = finite_float("logit_bias", b)
    return bias


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice `j` of a seeded request samples with `seed + j` (vLLM's rule); an invalid seed is
    passed on unchanged, for the engine to name."""
    if seed is None or choice == 0 or not 0 <= seed < _SEED_RANGE:
        return seed
    return (seed + choice) % _SEED_RANGE


def top_k_field(fields: dict[str, Any]) -> int:
    """`top_k`; vLLM's -1 (disabled) is this engine's 0."""
    top_k = integer_field(fields, "top_k", 0)
    return 0 if top_k == -1 else top_k


def stream_options_field(value: Any, stream: bool) -> bool:
    """`stream_options.include_usage` (only with `stream`, as OpenAI and vLLM require)."""
    if value is None:
        return False
    if not stream:
        raise invalid("stream_options", value, "may only be set with stream=true")
    if not isinstance(value, dict):
        raise invalid("stream_options", value, "must be an object")
    options = {k: v for k, v in value.items() if v is not None}
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise invalid(f"stream_options.{unknown[0]}", options[unknown[0]], "is not a supported field")
    return bool_field(options, "include_usage")


# ----------------------------------------------------------------------------
# The fields both routes share
# ----------------------------------------------------------------------------
# Fields of both OpenAI bodies, and the extensions (vLLM's names where vLLM has them).
SHARED_FIELDS = frozenset(
    {
        "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
        "presence_penalty", "frequency_penalty", "logit_bias", "user", "seed",
        "top_k", "stop_token_ids", "priority", "truncate_prompt_tokens",
        *COMPUTE_INTS, "quality", "latency_budget_ms", "exit_threshold", "exit_mode",
    }
)  # fmt: skip


def object_fields(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    """A body's fields with nulls dropped (null = absent), any unknown field refused by name."""
    if not isinstance(body, dict):
        raise invalid("body", body, "must be a JSON object")
    fields = {k: v for k, v in body.items() if v is not None}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise invalid(unknown[0], fields[unknown[0]], "is not a supported field")
    return fields


def check_model(fields: dict[str, Any], model_name: str) -> None:
    """`model` must name the served model (or be absent).

    Raises:
        ModelNotFoundError: it names another model.
    """
    model = text_field("model", fields.get("model", model_name))
    if model != model_name:
        raise ModelNotFoundError(f"The model {model!r} does not exist; this server serves {model_name!r}")


def choices_per_prompt(fields: dict[str, Any], prompts: int = 1) -> int:
    """`n`, bounded so that `n x prompts <= MAX_CHOICES`."""
    n = integer_field(fields, "n", 1)
    if n < 1:
        raise invalid("n", n, "must be an integer >= 1")
    if n * prompts > MAX_CHOICES:
        raise invalid("n", n, f"n x {prompts} prompt(s) must be at most {MAX_CHOICES} choices")
    return n


def compute_fields(fields: dict[str, Any]) -> ComputeParams:
    """The compute dial's extra fields (ranges: `runtime.validation.validate_request`)."""
    return ComputeParams(
        quality=text_field("quality", fields["quality"]) if "quality" in fields else None,
        latency_budget_ms=number_field(fields, "latency_budget_ms"),
        exit_threshold=number_field(fields, "exit_threshold"),
        exit_mode=text_field("exit_mode", fields["exit_mode"]) if "exit_mode" in fields else None,
        **{name: integer_field(fields, name) for name in COMPUTE_INTS},
    )


def sampling_fields(fields: dict[str, Any], max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """The shared sampling fields (`max_tokens` and `logprobs` are spelled differently per route)."""
    d = SamplingParams()
    return SamplingParams(
        max_tokens=d.max_tokens if max_tokens is None else max_tokens,
        temperature=number_field(fields, "temperature", d.temperature),
        top_p=number_field(fields, "top_p", d.top_p),
        top_k=top_k_field(fields),
        seed=integer_field(fields, "seed"),
        stop=stop_field(fields.get("stop")),
        stop_token_ids=token_ids_field("stop_token_ids", fields.get("stop_token_ids")),
        presence_penalty=number_field(fields, "presence_penalty", d.presence_penalty),
        frequency_penalty=number_field(fields, "frequency_penalty", d.frequency_penalty),
        logit_bias=logit_bias_field(fields.get("logit_bias")),
        logprobs=logprobs,
        truncate_prompt_tokens=integer_field(fields, "truncate_prompt_tokens"),
    )


def client_field(fields: dict[str, Any], client_id: str) -> str:
    """The fair-admission identity: `user`, else the caller's address."""
    return text_field("user", fields["user"]) if "user" in fields else client_id


def logprobs_count(value: Any, name: str = "logprobs") -> int | None:
    """A number of alternatives in [0, MAX_LOGPROBS] (None stays None)."""
    if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
        raise invalid(name, value, f"must be an integer in [0, {MAX_LOGPROBS}]")
    return value


# ----------------------------------------------------------------------------
# Running a plan on the engine
# ----------------------------------------------------------------------------
@dataclass
class CompletionPlan:
    """A completions or chat body as engine requests and response options.

    Attributes:
        id: the response id (`cmpl-...`, `chatcmpl-...`).
        requests: one engine request per choice, in choice-index order
            (prompt-major: choice `i` is prompt `i // n`, sample `i % n`).
        n: choices per prompt.
        stream: answer with server-sent events.
        echo: prepend the prompt to each choice's text (completions only).
        logprobs: alternatives per token (None = no logprobs).
        include_usage: streaming: a final chunk with the whole request's usage.
        names: engine field name -> the body's name, for the engine's errors.
    """

    id: str
    requests: list[GenerationRequest]
    n: int = 1
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None
    include_usage: bool = False
    names: dict[str, str] = field(default_factory=lambda: dict(OPENAI_NAMES))


def plan_requests(
    rid: str,
    prompts: list[str | list[int]],
    n: int,
    sampling: SamplingParams,
    compute: ComputeParams,
    client_id: str,
    priority: int,
) -> list[GenerationRequest]:
    """One engine request per choice, prompt-major; choice `j` of a seeded prompt uses `seed + j`."""
    total = n * len(prompts)
    return [
        GenerationRequest(
            request_id=rid if total == 1 else f"{rid}-{i}",
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=None if isinstance(prompt, str) else list(prompt),
            sampling=replace(sampling, seed=choice_seed(sampling.seed, i % n)),
            compute=replace(compute),
            client_id=client_id,
            priority=priority,
        )
        for i, prompt in enumerate(p for p in prompts for _ in range(n))
    ]


class CompletionEngine(Protocol):
    """What the OpenAI routes need of `runtime.engine.Engine`."""

    tokenizer: Any

    async def submit_async(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...

    def cancel(self, request_id: str) -> bool: ...


async def submit_all(engine: CompletionEngine, plan: CompletionPlan) -> list[AsyncIterator[RequestOutput]]:
    """Submit every choice's request; if one is refused, cancel those already queued.

    Raises:
        Whatever `Engine.submit` raises (engine field names mapped to the body's, `plan.names`).
    """
    streams: list[AsyncIterator[RequestOutput]] = []
    try:
        encoded: dict[str, list[int]] = {}  # n choices of one truncated prompt: tokenised once
        for request in plan.requests:
            text = request.prompt
            if isinstance(text, str) and text in encoded:
                request.prompt, request.prompt_token_ids = None, list(encoded[text])
            else:
                await pretokenize_truncated(engine, request)
                if isinstance(text, str) and request.prompt_token_ids is not None:
                    encoded[text] = request.prompt_token_ids
            streams.append(await engine.submit_async(request))
    except BaseException as e:
        for request in plan.requests[: len(streams)]:
            engine.cancel(request.request_id)
        if isinstance(e, InvalidRequestError) and e.field in plan.names:
            raise InvalidRequestError(plan.names[e.field], e.value, e.allowed) from None
        raise
    return streams


async def merged(
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
# Response parts both routes share
# ----------------------------------------------------------------------------
def leanserve_block(out: RequestOutput) -> dict[str, Any]:
    """The extra `leanserve` object of a response: the compute the request used (with a
    `speculation` object when the request could speculate: runtime/speculation.py)."""
    block: dict[str, Any] = {"steps": out.steps, "experts": out.experts, "policy_reason": out.policy_reason}
    if out.mean_loops is not None:
        block["mean_loops"] = out.mean_loops
    r = out.speculation
    if r is not None:
        block["speculation"] = {
            "ran": r.ran,
            "draft_steps": r.draft_steps,
            "draft_tokens": r.draft_tokens,
            "drafted_tokens": r.drafted_tokens,
            "accepted_tokens": r.accepted_tokens,
            "rounds": r.rounds,
            "mode": r.mode,
        }
    return block


def finite_logprob(logprob: float) -> float:
    """A log-probability JSON can carry (-inf and NaN become `LOGPROB_FLOOR`)."""
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


class TokenStrings:
    """A token's string in logprobs: its own text (the id decoded alone, special tokens spelled
    out), except a token that is only part of a UTF-8 character, shown as OpenAI does,
    `bytes:\\xe2\\x80` (its bytes, from a byte-level vocabulary), so that distinct tokens
    never share a key in `top_logprobs`. `token_bytes` gives the token's UTF-8 bytes (the
    chat format's `bytes` field)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._strings: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        """The token's string in `tokens` / `top_logprobs`."""
        text = self._strings.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            piece = self.tokenizer.id_to_token(token_id) if "\ufffd" in text else None
            if piece and all(ch in _BYTE_LEVEL for ch in piece):
                text = "bytes:" + "".join(f"\\x{_BYTE_LEVEL[ch]:02x}" for ch in piece)
            self._strings[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's bytes (from a byte-level vocabulary, else its text's UTF-8)."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece and all(ch in _BYTE_LEVEL for ch in piece):
            return [_BYTE_LEVEL[ch] for ch in piece]
        return list(self.text(token_id).encode("utf-8", "replace"))


def usage_of_plan(plan: CompletionPlan, finals: list[RequestOutput]) -> dict[str, int]:
    """Usage over choices: each prompt's tokens once (its first choice), every choice's tokens."""
    prompt = sum(out.prompt_tokens for i, out in enumerate(finals) if i % plan.n == 0)
    completion = sum(out.completion_tokens for out in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def usage_of(out: RequestOutput) -> dict[str, int]:
    """One choice's usage."""
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    }


def sse_event(payload: Any) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {dumps(payload)}\n\n"


def sse_error(error: BaseException) -> str:
    """An error that happens after the stream started (the status is already 200)."""
    return sse_event(error_body(error)[1])


SSE_DONE = "data: [DONE]\n\n"


def envelope(plan: CompletionPlan, model: str, created: int, kind: str, choices: list) -> dict[str, Any]:
    """The fields around `choices` of every answer and chunk."""
    return {"id": plan.id, "object": kind, "created": created, "model": model, "choices": choices}


async def run_to_completion(
    engine: CompletionEngine, plan: CompletionPlan, streams: list[AsyncIterator[RequestOutput]]
) -> tuple[list[list[RequestOutput]], list[RequestOutput]]:
    """Every choice run to the end: its deltas and its merged output."""
    deltas: list[list[RequestOutput]] = [[] for _ in streams]
    async with contextlib.aclosing(merged(engine, plan, streams)) as outputs:
        async for index, out in outputs:
            deltas[index].append(out)
    return deltas, [merge_outputs(d) for d in deltas]


async def sse_stream(
    engine: CompletionEngine,
    plan: CompletionPlan,
    streams: list[AsyncIterator[RequestOutput]],
    model_name: str,
    kind: str,
    choice: Callable[[int, RequestOutput], dict[str, Any]],
    created: int | None = None,
) -> AsyncIterator[str]:
    """The server-sent events of a streaming answer, ending with `SSE_DONE`.

    One chunk per delta of any choice (`choice(index, delta)` its element of `choices`).
    Without `include_usage` a choice's last chunk has that choice's usage (what leanserve
    always sent); with it every chunk has `"usage": null` and a final chunk with no choices
    has the usage of the whole request (OpenAI's rule). An error after the first event is
    reported in-band (the status is sent).
    """
    created = created or int(time.time())
    finals: list[RequestOutput | None] = [None] * len(streams)
    try:
        async with contextlib.aclosing(merged(engine, plan, streams)) as outputs:
            async for index, out in outputs:
                chunk = envelope(plan, model_name, created, kind, [choice(index, out)])
                if plan.include_usage:
                    chunk["usage"] = None
                elif out.finished:
                    chunk["usage"] = usage_of(out)
                chunk["leanserve"] = leanserve_block(out)
                if out.finished:
                    finals[index] = out
                yield sse_event(chunk)
        if plan.include_usage:
            done = [out for out in finals if out is not None]
            final = envelope(plan, model_name, created, kind, [])
            final["usage"] = usage_of_plan(plan, done) if len(done) == len(finals) else None
            yield sse_event(final)
    except Exception as e:  # the status line is sent already: report in-band
        yield sse_error(e)
    yield SSE_DONE


def answer(
    plan: CompletionPlan,
    model: str,
    created: int | None,
    kind: str,
    choices: list[dict[str, Any]],
    finals: list[RequestOutput],
) -> dict[str, Any]:
    """A non-streaming answer: the choices, the usage of all of them, the compute used."""
    body = envelope(plan, model, created or int(time.time()), kind, choices)
    body["usage"] = usage_of_plan(plan, finals)
    body["leanserve"] = leanserve_block(finals[0])
    return body
