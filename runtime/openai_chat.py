"""OpenAI-compatible `POST /v1/chat/completions`, streaming (SSE) and not.

The conversation is rendered with the model directory's chat template
(runtime/chat_template.py: `chat_template.jinja` or `tokenizer_config.json`
as transformers reads them, else the documented plain template) and
tokenised here, so the engine receives token ids; the rest is the
completions route's machinery (runtime/openai_common.py): the same sampling
fields, the same compute fields as extra body fields (`steps`, `quality`,
`latency_budget_ms`, `experts_top_k`, `expert_depth`, `truncate_prompt_tokens`),
the same `leanserve` block in every answer, `n` choices, `stream_options`.

Chat-specific fields: `messages` (validated as hostile input, see
`chat_template.check_messages`), `max_completion_tokens` (OpenAI's newer name
of `max_tokens`; both may be given only if equal), `logprobs` (a boolean) with
`top_logprobs` (0..20), `add_generation_prompt` (vLLM's extension, default
true). `response_format` is accepted only as `{"type": "text"}`, `tools` only
empty and `tool_choice` only "none" (there is no tool calling); any other
field is refused by name. Engine errors about the prompt name `messages`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from runtime.chat_template import ChatTemplate
from runtime.openai_common import (
    SHARED_FIELDS,
    CompletionEngine,
    CompletionPlan,
    TokenStrings,
    answer,
    bool_field,
    check_model,
    choices_per_prompt,
    client_field,
    compute_fields,
    finite_logprob,
    integer_field,
    invalid,
    logprobs_count,
    object_fields,
    plan_requests,
    run_to_completion,
    sampling_fields,
    sse_stream,
    stream_options_field,
    submit_all,
)
from runtime.prompts import encode_messages
from runtime.types import ComputeParams, RequestOutput, SamplingParams, TokenLogprob

_FIELDS = SHARED_FIELDS | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools",
    "tool_choice", "parallel_tool_calls", "add_generation_prompt",
}  # fmt: skip
# Engine field names -> this body's names: the prompt is the rendered conversation.
CHAT_NAMES = {"prompt_token_ids": "messages", "prompt": "messages", "client_id": "user"}


@dataclass
class ChatBody:
    """A parsed chat body before its conversation is encoded (`build_plan` finishes it)."""

    messages: Any
    add_generation_prompt: bool
    plan: CompletionPlan
    sampling: SamplingParams
    compute: ComputeParams
    client_id: str
    priority: int


def _max_tokens(fields: dict[str, Any]) -> int | None:
    old, new = integer_field(fields, "max_tokens"), integer_field(fields, "max_completion_tokens")
    if old is not None and new is not None and old != new:
        raise invalid("max_completion_tokens", new, f"must equal max_tokens ({old}) when both are given")
    return new if new is not None else old


def _logprobs(fields: dict[str, Any]) -> int | None:
    wanted = bool_field(fields, "logprobs")
    top = logprobs_count(integer_field(fields, "top_logprobs"), "top_logprobs")
    if top is not None and not wanted:
        raise invalid("top_logprobs", top, "needs logprobs=true")
    return (top or 0) if wanted else None


def _refuse_unsupported(fields: dict[str, Any]) -> None:
    fmt = fields.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise invalid("response_format", fmt, 'only {"type": "text"} is supported')
    if fields.get("tools", []) != []:
        raise invalid("tools", fields["tools"], "tool calling is not supported (only [] or null)")
    if fields.get("tool_choice", "none") != "none":
        raise invalid("tool_choice", fields["tool_choice"], 'tool calling is not supported (only "none")')
    bool_field(fields, "parallel_tool_calls")


def parse_chat(body: Any, model_name: str, client_id: str = "") -> ChatBody:
    """Check a `/v1/chat/completions` body (all but the messages' contents, checked on encoding).

    Raises:
        InvalidRequestError: a field has the wrong type or is not supported (named).
        ModelNotFoundError: `model` names another model.
    """
    fields = object_fields(body, _FIELDS)
    check_model(fields, model_name)
    if "messages" not in fields:
        raise invalid("messages", None, "is required")
    _refuse_unsupported(fields)
    n = choices_per_prompt(fields)
    stream = bool_field(fields, "stream")
    include_usage = stream_options_field(fields.get("stream_options"), stream)
    logprobs = _logprobs(fields)
    add_generation_prompt = bool_field({"add_generation_prompt": True, **fields}, "add_generation_prompt")
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    names = dict(CHAT_NAMES)
    if "max_completion_tokens" in fields:  # the engine's max_tokens errors name what the client sent
        names["max_tokens"] = "max_completion_tokens"
    plan = CompletionPlan(rid, [], n, stream, False, logprobs, include_usage, names)
    return ChatBody(
        fields["messages"],
        add_generation_prompt,
        plan,
        sampling_fields(fields, _max_tokens(fields), logprobs),
        compute_fields(fields),
        client_field(fields, client_id),
        integer_field(fields, "priority", 0),
    )


def build_plan(chat: ChatBody, prompt_ids: list[int]) -> CompletionPlan:
    """The engine requests of a parsed chat body, given its encoded conversation."""
    plan = chat.plan
    plan.requests = plan_requests(
        plan.id, [prompt_ids], plan.n, chat.sampling, chat.compute, chat.client_id, chat.priority
    )
    return plan


async def start_chat(
    engine: CompletionEngine, template: ChatTemplate, body: Any, model_name: str, client_id: str = ""
) -> dict[str, Any] | AsyncIterator[str]:
    """Run a chat body: the `chat.completion` object, or (with `stream`) its SSE events.

    Everything that can fail before the first token fails here (so the route answers with
    its status): parsing, the template, validation and admission by the engine.
    """
    chat = parse_chat(body, model_name, client_id)
    truncating = chat.sampling.truncate_prompt_tokens is not None
    ids = await encode_messages(engine, template, chat.messages, chat.add_generation_prompt, truncating)
    plan = build_plan(chat, ids)
    streams = await submit_all(engine, plan)
    if plan.stream:
        return chat_sse_events(engine, plan, streams, model_name)
    return await complete_chat(engine, plan, streams, model_name)


# ----------------------------------------------------------------------------
# Response shapes
# ----------------------------------------------------------------------------
def _logprobs_content(strings: TokenStrings, entries: list[TokenLogprob] | None) -> list[dict[str, Any]]:
    """OpenAI's chat `logprobs.content` entries."""
    out = []
    for entry in entries or []:
        out.append(
            {
                "token": strings.text(entry.token_id),
                "logprob": finite_logprob(entry.logprob),
                "bytes": strings.token_bytes(entry.token_id),
                "top_logprobs": [
                    {"token": strings.text(t), "logprob": finite_logprob(lp), "bytes": strings.token_bytes(t)}
                    for t, lp in entry.top
                ],
            }
        )
    return out


def _choice_logprobs(plan: CompletionPlan, strings: TokenStrings, out: RequestOutput) -> dict | None:
    """A choice's `logprobs` (None when not asked for)."""
    return None if plan.logprobs is None else {"content": _logprobs_content(strings, out.logprobs)}


async def complete_chat(
    engine: CompletionEngine,
    plan: CompletionPlan,
    streams: list[AsyncIterator[RequestOutput]],
    model_name: str,
    created: int | None = None,
) -> dict[str, Any]:
    """Run every choice to completion: the non-streaming `chat.completion` object."""
    _, finals = await run_to_completion(engine, plan, streams)
    strings = TokenStrings(engine.tokenizer)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": _choice_logprobs(plan, strings, out),
            "finish_reason": out.finish_reason,
        }
        for i, out in enumerate(finals)
    ]
    return answer(plan, model_name, created, "chat.completion", choices, finals)


def chat_sse_events(
    engine: CompletionEngine,
    plan: CompletionPlan,
    streams: list[AsyncIterator[RequestOutput]],
    model_name: str,
    created: int | None = None,
) -> AsyncIterator[str]:
    """The server-sent events of a streaming chat completion, ending with `SSE_DONE`:
    one `chat.completion.chunk` per delta of any choice, whose first delta carries
    `role: "assistant"` (usage and errors: `openai_common.sse_stream`)."""
    strings = TokenStrings(engine.tokenizer)
    started = [False] * len(streams)

    def choice(index: int, out: RequestOutput) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": out.text}
        if not started[index]:
            delta = {"role": "assistant", **delta}
            started[index] = True
        return {
            "index": index,
            "delta": delta,
            "logprobs": _choice_logprobs(plan, strings, out),
            "finish_reason": out.finish_reason if out.finished else None,
        }

    return sse_stream(engine, plan, streams, model_name, "chat.completion.chunk", choice, created)
