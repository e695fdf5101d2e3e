"""OpenAI-compatible `/v1/completions` and `/v1/models`: request parsing and response shapes.

Pure functions over plain dicts, so they are testable without Ray or FastAPI;
runtime/serve_app.py wires them to FastAPI routes on the Serve deployment.

Compute fields are accepted as extra body fields (the `openai` client sends
them with `extra_body={...}`): `steps`, `quality`, `latency_budget_ms`,
`experts_top_k`, `expert_depth`. Responses carry an extra `leanserve` object
with the compute used (steps, experts, policy reason).

Errors use OpenAI's format `{"error": {"message", "type", "param", "code"}}`.
The HTTP status is derived from the same single error mapping as gRPC
(`runtime.grpc_servicer.status_for`): INVALID_ARGUMENT -> 400,
RESOURCE_EXHAUSTED -> 429, UNAVAILABLE -> 503, DEADLINE_EXCEEDED -> 504,
CANCELLED -> 499, anything else -> 500.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import grpc

from runtime.grpc_servicer import status_for
from runtime.types import (
    ComputeParams,
    GenerationRequest,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
_COMPUTE_FIELDS = ("steps", "quality", "latency_budget_ms", "experts_top_k", "expert_depth")
# Accepted OpenAI fields this server ignores on purpose (they do not change the output here).
_IGNORED = {"user", "presence_penalty", "frequency_penalty", "logit_bias", "stream_options", "echo", "suffix"}
_SAMPLING = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids"}


class ModelNotFoundError(LookupError):
    """The request names a model this server does not serve (HTTP 404)."""


def error_body(error: BaseException) -> tuple[int, dict[str, Any]]:
    """`(HTTP status, OpenAI error JSON)` for an exception."""
    if isinstance(error, ModelNotFoundError):
        code, message = grpc.StatusCode.NOT_FOUND, str(error)
    else:
        code, message = status_for(error)
    status, kind = _HTTP_STATUS.get(code, (500, "internal_error"))
    param = getattr(error, "field", None)
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code.name.lower()}}


def parse_completion(body: Any, model_name: str) -> tuple[GenerationRequest, bool]:
    """Convert a `/v1/completions` body into `(GenerationRequest, stream)`.

    Raises:
        InvalidRequestError: a field has the wrong type or is not supported.
        ModelNotFoundError: `model` names another model.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("body", type(body).__name__, "must be a JSON object")
    model = body.get("model", model_name)
    if model != model_name:
        raise ModelNotFoundError(f"The model '{model}' does not exist; this server serves '{model_name}'")
    unknown = set(body) - _SAMPLING - set(_COMPUTE_FIELDS) - _IGNORED - {"model", "prompt", "stream", "n"}
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidRequestError(name, body[name], "is not a supported field")
    if body.get("n", 1) != 1:
        raise InvalidRequestError("n", body.get("n"), "must be 1")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the openai client may send a one-element list
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt", prompt, "must be a string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError("stream", stream, "must be true or false")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    d = SamplingParams()
    sampling = SamplingParams(
        max_tokens=body.get("max_tokens", d.max_tokens)
        if body.get("max_tokens") is not None
        else d.max_tokens,
        temperature=d.temperature if body.get("temperature") is None else body["temperature"],
        top_p=d.top_p if body.get("top_p") is None else body["top_p"],
        top_k=d.top_k if body.get("top_k") is None else body["top_k"],
        seed=body.get("seed"),
        stop=stop,
        stop_token_ids=body.get("stop_token_ids") or [],
    )
    compute = ComputeParams(**{k: body.get(k) for k in _COMPUTE_FIELDS})
    # Types and ranges of every field are checked by the engine's validate_request.
    request = GenerationRequest(
        request_id=f"cmpl-{uuid.uuid4().hex}", prompt=prompt, sampling=sampling, compute=compute
    )
    return request, stream


def _leanserve(out: RequestOutput) -> dict[str, Any]:
    return {"steps": out.steps, "experts": out.experts, "policy_reason": out.policy_reason}


def completion(out: RequestOutput, model_name: str, created: int | None = None) -> dict[str, Any]:
    """A non-streaming `text_completion` object from an aggregated output."""
    return {
        "id": out.request_id,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}],
        "usage": {
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
        },
        "leanserve": _leanserve(out),
    }


def sse_chunk(out: RequestOutput, model_name: str, created: int) -> str:
    """One server-sent event carrying a streamed delta."""
    chunk = completion(out, model_name, created)
    if not out.finished:
        chunk.pop("usage")
        chunk["choices"][0]["finish_reason"] = None
    return f"data: {json.dumps(chunk)}\n\n"


def sse_error(error: BaseException) -> str:
    """An error that happens after the stream started (the status is already 200)."""
    return f"data: {json.dumps(error_body(error)[1])}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def models_list(model_name: str, created: int) -> dict[str, Any]:
    """The `/v1/models` body."""
    return {
        "object": "list",
        "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "leanserve"}],
    }
