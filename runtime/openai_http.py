"""OpenAI-compatible `/v1/completions`: body parsing, response shapes (errors, bodies: openai_common).

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
  `steps`, `quality`, `latency_budget_ms`, `experts_top_k`, `expert_depth`;
  `truncate_prompt_tokens` keeps the last N prompt tokens (vLLM's field).
  Responses carry an extra `leanserve` object with the compute used.
  `/v1/models` and the OpenAPI schema describe them (runtime/openai_schema.py).


Bodies are bounded before they are parsed (`MAX_BODY_BYTES`, HTTP 413, and
`MAX_JSON_DEPTH` levels of nesting, 400), and every field is type-checked
(runtime/openai_common.py), so a wrong JSON type is a 400 naming the field
rather than a 500; the ranges are checked by the engine
(`runtime.validation.validate_request`). The chat route is runtime/openai_chat.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from runtime.openai_common import (  # noqa: F401 (re-exported: serve_app and tests use these names)
    LOGPROB_FLOOR,
    MAX_BODY_BYTES,
    MAX_CHOICES,
    MAX_JSON_DEPTH,
    MAX_MESSAGE_CHARS,
    SHARED_FIELDS,
    SSE_DONE,
    BodyTooLargeError,
    CompletionEngine,
    CompletionPlan,
    ModelNotFoundError,
    TokenStrings,
    answer,
    bool_field,
    check_model,
    choices_per_prompt,
    client_field,
    compute_fields,
    dumps,
    envelope,
    error_body,
    error_payload,
    finite_logprob,
    http_error_body,
    integer_field,
    invalid,
    is_int,
    json_depth_exceeds,
    leanserve_block,
    logprobs_count,
    merged,
    object_fields,
    parse_json_body,
    plan_requests,
    run_to_completion,
    sampling_fields,
    sse_error,
    sse_event,
    sse_stream,
    stream_options_field,
    submit_all,
    text_field,
    usage_of,
    usage_of_plan,
)
from runtime.openai_schema import models_list  # noqa: F401 (re-exported)
from runtime.types import GenerationRequest, RequestOutput, TokenLogprob

_FIELDS = SHARED_FIELDS | {"prompt", "suffix", "logprobs", "echo", "best_of"}
_PROMPT_TYPES = "must be a string, a list of strings, a list of token ids or a list of token-id lists"


def _prompts(value: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of prompts (each a string or token ids)."""
    if isinstance(value, str):
        return [text_field("prompt", value)]
    if not isinstance(value, list) or not value:
        raise invalid("prompt", value, _PROMPT_TYPES)
    if all(isinstance(p, str) for p in value):
        return [text_field("prompt", p) for p in value]
    if all(is_int(t) for t in value):
        return [value]
    if all(isinstance(p, list) and all(is_int(t) for t in p) for p in value):
        return list(value)
    raise invalid("prompt", value, _PROMPT_TYPES)


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
    fields = object_fields(body, _FIELDS)
    check_model(fields, model_name)
    if "prompt" not in fields:
        raise invalid("prompt", None, "is required")
    prompts = _prompts(fields["prompt"])
    n = choices_per_prompt(fields, len(prompts))
    if integer_field(fields, "best_of", n) != n:
        raise invalid("best_of", fields["best_of"], f"must equal n ({n}) or be null: best_of is unsupported")
    if fields.get("suffix", "") != "":
        raise invalid("suffix", fields["suffix"], 'is not supported (only null or "")')
    stream, echo = bool_field(fields, "stream"), bool_field(fields, "echo")
    logprobs = logprobs_count(integer_field(fields, "logprobs"))
    if echo and logprobs is not None:
        raise invalid("echo", True, "echo with logprobs (prompt log-probabilities) is not supported")
    include_usage = stream_options_field(fields.get("stream_options"), stream)
    sampling = sampling_fields(fields, integer_field(fields, "max_tokens"), logprobs)
    client = client_field(fields, client_id)
    rid = f"cmpl-{uuid.uuid4().hex}"
    requests = plan_requests(
        rid, prompts, n, sampling, compute_fields(fields), client, integer_field(fields, "priority", 0)
    )
    return CompletionPlan(rid, requests, n, stream, echo, logprobs, include_usage)


def parse_completion(body: Any, model_name: str) -> tuple[GenerationRequest, bool]:
    """The single engine request of a one-choice body, and whether it streams.

    Raises:
        InvalidRequestError: as `parse_completions`, or the body asks for several choices.
        ModelNotFoundError: `model` names another model.
    """
    plan = parse_completions(body, model_name)
    if len(plan.requests) != 1:
        raise invalid("n", len(plan.requests), "parse_completion takes one choice; see parse_completions")
    return plan.requests[0], plan.stream


# ----------------------------------------------------------------------------
# Response shapes
# ----------------------------------------------------------------------------
class _Choices:
    """Per-choice response state: echo prefix, logprob token strings and text offsets.

    Token strings are `TokenStrings`'; `text_offset` is where the token's text starts
    in the choice's text (the tokens of one character share it).
    """

    def __init__(self, plan: CompletionPlan, tokenizer: Any) -> None:
        self.plan = plan
        self.tokenizer = tokenizer
        self.strings = TokenStrings(tokenizer)
        self.started = [False] * len(plan.requests)
        self.offsets = [0] * len(plan.requests)  # text length up to the last complete character
        self.pending: list[list[int]] = [[] for _ in plan.requests]  # ids of an incomplete character

    def token_text(self, token_id: int) -> str:
        """A token's string in `tokens` and `top_logprobs`."""
        return self.strings.text(token_id)

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
            top = {token: finite_logprob(entry.logprob)}  # the sampled token is always listed
            for token_id, logprob in entry.top:
                top.setdefault(self.token_text(token_id), finite_logprob(logprob))
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


async def complete(
    engine: CompletionEngine,
    plan: CompletionPlan,
    streams: list[AsyncIterator[RequestOutput]],
    model_name: str,
    created: int | None = None,
) -> dict[str, Any]:
    """Run every choice to completion: the non-streaming `text_completion` object."""
    deltas, finals = await run_to_completion(engine, plan, streams)
    state = _Choices(plan, engine.tokenizer)
    choices = [
        state.choice(i, out, [e for o in deltas[i] for e in o.logprobs or []]) for i, out in enumerate(finals)
    ]
    return answer(plan, model_name, created, "text_completion", choices, finals)


def sse_events(
    engine: CompletionEngine,
    plan: CompletionPlan,
    streams: list[AsyncIterator[RequestOutput]],
    model_name: str,
    created: int | None = None,
) -> AsyncIterator[str]:
    """The server-sent events of a streaming completion, ending with `SSE_DONE` (see
    `openai_common.sse_stream`: one `text_completion` chunk per delta of any choice)."""
    choices = _Choices(plan, engine.tokenizer)
    return sse_stream(
        engine,
        plan,
        streams,
        model_name,
        "text_completion",
        lambda index, out: choices.choice(index, out, out.logprobs),
        created,
    )
