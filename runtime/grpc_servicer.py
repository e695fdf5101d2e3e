"""gRPC wire messages <-> engine types, and the ONE engine-error -> status-code mapping.

Nothing here imports Ray: the Ray Serve deployment (runtime/serve_app.py) calls
these functions, and unit tests call them with a fake context.

Deadlines. Ray Serve's gRPC proxy does not forward the client's gRPC deadline
to the replica (its `RayServegRPCContext` has no `time_remaining()`), so the
client states its remaining time in the metadata key `x-leanserve-timeout-ms`
(`runtime/client.py` does this whenever a timeout is given). The server then
(1) sets the engine deadline, so the request fails with DEADLINE_EXCEEDED
rather than running on after the client gave up, and (2) when the request sets
no compute field, passes the same time as `latency_budget_ms`, so the step
policy picks the most steps predicted to fit (reason "latency_budget"; with
no calibrated cost model the default applies, reason
"latency_budget:uncalibrated"). A client that sets only a gRPC deadline still
gets DEADLINE_EXCEEDED from its own gRPC library, and the proxy's cancellation
of the call cancels the engine request.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc

from runtime.openai_schema import compute_options
from runtime.prompts import encode_messages, pretokenize_truncated
from runtime.proto_build import load_stubs
from runtime.types import (
    ComputeParams,
    DeadlineExceededError,
    EngineError,
    EngineUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    OverloadedError,
    RequestCancelledError,
    RequestOutput,
    SamplingParams,
    UnauthenticatedError,
)

log = logging.getLogger(__name__)

TIMEOUT_METADATA_KEY = "x-leanserve-timeout-ms"
CLIENT_METADATA_KEY = "x-leanserve-client"  # who is calling: the fair-admission key

# Engine error class -> gRPC status code. Order matters: the first matching class wins, and
# EngineError last catches the engine's own failures of one request (RequestFailedError,
# non-finite logits), reported as INTERNAL with their message, not the generic one.
_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestCancelledError, grpc.StatusCode.CANCELLED),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (EngineError, grpc.StatusCode.INTERNAL),
)


class StatusContext(Protocol):
    """The part of a gRPC servicer context we use (grpc's or Ray's `RayServegRPCContext`)."""

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def invocation_metadata(self) -> Any: ...


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to `(status code, details)`: the single mapping of the server.

    Engine errors map to the code their class stands for; anything else is a
    server bug, reported as INTERNAL with a generic message (the traceback is
    logged, not sent to the client).
    """
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code, str(error)
    log.error("internal error while serving a request", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see the server log"


def set_error(context: StatusContext, error: BaseException) -> grpc.StatusCode:
    """Put the mapped status of `error` on a servicer context; returns the code."""
    code, details = status_for(error)
    context.set_code(code)
    context.set_details(details)
    return code


class AbortedRpcError(Exception):
    """Raised after the status is set: Ray returns the context's status only with an exception.

    A plain one-argument exception on purpose: Ray pickles it from the replica
    to the proxy, and the engine errors (several constructor arguments) do not
    unpickle; the status code and details travel on the context anyway.
    """


def abort(context: StatusContext, error: BaseException) -> NoReturn:
    """Set the mapped status of `error` on the context and end the RPC (raises `AbortedRpcError`)."""
    code = set_error(context, error)
    raise AbortedRpcError(f"{code.name}: {error}") from None


class ClientErrorLogFilter(logging.Filter):
    """Turn Ray's ERROR-with-traceback for a client error into one WARNING line.

    A handler ends a failed RPC by raising `AbortedRpcError` after setting the status (Ray
    returns the status, and counts the request as an error, only then); Ray's replica and its
    proxy log each such exception with a traceback. A client error (bad field, overload,
    deadline, missing key, ...) is not a server fault, so its record becomes one line; INTERNAL
    keeps its traceback. In the proxy the exception arrives wrapped in Ray's `gRPCStatusError`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        exc = getattr(exc, "original_exception", exc)
        if isinstance(exc, AbortedRpcError) and not str(exc).startswith("INTERNAL"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args, record.exc_info, record.exc_text = f"client error: {exc}", (), None, None
        return True


def install_client_error_log_filter() -> None:
    """Add `ClientErrorLogFilter` to Ray Serve's logger of this process (idempotent)."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, ClientErrorLogFilter) for f in serve_logger.filters):
        serve_logger.addFilter(ClientErrorLogFilter())


def _metadata_value(context: StatusContext | None, key: str) -> str | None:
    """The first value of metadata `key` (gRPC lower-cases keys), or None when absent."""
    if context is None:
        return None
    for k, value in context.invocation_metadata() or ():
        if k == key:
            return value if isinstance(value, str) else None
    return None


def timeout_ms_from_metadata(context: StatusContext | None) -> float | None:
    """The client's remaining time from `x-leanserve-timeout-ms`, or None (absent or invalid).

    Raises:
        InvalidRequestError: the value is not a positive number.
    """
    value = _metadata_value(context, TIMEOUT_METADATA_KEY)
    if value is None:
        return None
    try:
        ms = float(value)
    except ValueError:
        ms = float("nan")
    if not ms > 0 or ms == float("inf"):
        raise InvalidRequestError(TIMEOUT_METADATA_KEY, value, "must be a number of milliseconds > 0")
    return ms


def authorization_from_metadata(context: StatusContext | None) -> str | None:
    """The `authorization` metadata value, or None."""
    return _metadata_value(context, "authorization")


def client_from_metadata(context: StatusContext | None) -> str:
    """The caller's identity from `x-leanserve-client` ("" when absent; validated by the engine)."""
    return _metadata_value(context, CLIENT_METADATA_KEY) or ""


@dataclass(frozen=True)
class MalformedRequest:
    """What the proxy hands on for bytes that do not parse as the RPC's request message.

    gRPC's own answer to an unparseable request is an UNKNOWN/INTERNAL status
    raised inside the proxy; with `add_text_generation_servicer` the bytes
    reach the replica as this object instead, and the client gets
    INVALID_ARGUMENT naming what was wrong (`to_engine_request` raises it).
    Plain and picklable: Ray pickles requests from the proxy to the replica.
    """

    message_type: str
    error: str
    size: int


def _safe_parser(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as e:  # DecodeError: truncated or bad wire data, invalid UTF-8 in a string
            return MalformedRequest(
                message_class.DESCRIPTOR.full_name, f"{type(e).__name__}: {e}"[:200], len(data)
            )

    return parse


def add_text_generation_servicer(servicer: Any, server: Any) -> None:
    """Register `leanserve.v1.TextGeneration` on a gRPC server (what Ray's proxy calls).

    The generated `add_TextGenerationServicer_to_server`, except that requests
    are parsed with `_safe_parser`: malformed bytes become a `MalformedRequest`
    (INVALID_ARGUMENT at the replica) instead of an UNKNOWN error in the proxy. In Ray's
    proxy it also installs runtime/proxy_errors.py (a dead replica's requests end UNAVAILABLE).
    """
    if hasattr(server, "service_handler_factory"):  # Ray's gRPCGenericServer, in its proxy actor
        from runtime.proxy_errors import install, make_unavailable_retryable

        install()
        make_unavailable_retryable(server)
        install_client_error_log_filter()
    pb2, _ = load_stubs()
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_safe_parser(pb2.GenerateRequest),
            response_serializer=pb2.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream,
            request_deserializer=_safe_parser(pb2.GenerateRequest),
            response_serializer=pb2.GenerateResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=_safe_parser(pb2.GetModelInfoRequest),
            response_serializer=pb2.ModelInfo.SerializeToString,
        ),
    }
    service = pb2.DESCRIPTOR.services_by_name["TextGeneration"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service, handlers)


def check_parsed(message: Any) -> None:
    """Raise `InvalidRequestError` for a `MalformedRequest`; anything else passes."""
    if isinstance(message, MalformedRequest):
        raise InvalidRequestError(
            "request", f"<{message.size} bytes>", f"must be a valid {message.message_type} ({message.error})"
        )


def to_engine_request(
    message: Any,
    timeout_ms: float | None = None,
    client_id: str = "",
    prompt_token_ids: list[int] | None = None,
) -> GenerationRequest:
    """Convert a `leanserve.v1.GenerateRequest` into the engine's `GenerationRequest`.

    Field checks (ranges, the prompt) are the engine's job (`validate_request`),
    so this only converts: unset optional fields keep the engine defaults.

    Args:
        message: the protobuf request.
        timeout_ms: the client's remaining time (see the module docstring).
        client_id: the caller (`client_from_metadata`).
        prompt_token_ids: the encoded conversation of a request with `messages`
            (`submit_generate` renders it with the model's chat template).

    Raises:
        InvalidRequestError: a malformed message; both `prompt` and `messages`;
            `messages` without their encoding.
    """
    check_parsed(message)
    if message.messages:
        if message.prompt:
            raise InvalidRequestError("messages", f"<{len(message.messages)} messages>", _ONE_PROMPT)
        if prompt_token_ids is None:
            raise InvalidRequestError(
                "messages", f"<{len(message.messages)} messages>", "are not accepted here: send prompt"
            )
    s, c = message.sampling, message.compute
    defaults = SamplingParams()
    sampling = SamplingParams(
        max_tokens=s.max_tokens if s.HasField("max_tokens") else defaults.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else defaults.temperature,
        top_p=s.top_p if s.HasField("top_p") else defaults.top_p,
        top_k=s.top_k if s.HasField("top_k") else defaults.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else defaults.presence_penalty,
        frequency_penalty=s.frequency_penalty
        if s.HasField("frequency_penalty")
        else defaults.frequency_penalty,
        logit_bias=dict(s.logit_bias),
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        truncate_prompt_tokens=s.truncate_prompt_tokens if s.HasField("truncate_prompt_tokens") else None,
    )
    compute = ComputeParams(
        steps=c.steps if c.HasField("steps") else None,
        quality=c.quality if c.HasField("quality") else None,
        latency_budget_ms=c.latency_budget_ms if c.HasField("latency_budget_ms") else None,
        experts_top_k=c.experts_top_k if c.HasField("experts_top_k") else None,
        expert_depth=c.expert_depth if c.HasField("expert_depth") else None,
        draft_steps=c.draft_steps if c.HasField("draft_steps") else None,
        draft_tokens=c.draft_tokens if c.HasField("draft_tokens") else None,
        exit_threshold=c.exit_threshold if c.HasField("exit_threshold") else None,
        exit_mode=c.exit_mode if c.HasField("exit_mode") else None,
    )
    now = time.monotonic()
    deadline = None
    if timeout_ms is not None:
        deadline = now + timeout_ms / 1000.0
        if compute.steps is None and compute.quality is None and compute.latency_budget_ms is None:
            compute.latency_budget_ms = timeout_ms
    request_id = message.request_id if message.HasField("request_id") else uuid.uuid4().hex
    # An empty prompt is passed on as "" so that the engine names the field.
    return GenerationRequest(
        request_id=request_id,
        prompt=None if prompt_token_ids is not None else message.prompt,
        prompt_token_ids=prompt_token_ids,
        sampling=sampling,
        compute=compute,
        arrival_time=now,
        deadline=deadline,
        client_id=client_id,
        priority=message.priority if message.HasField("priority") else 0,
    )


_ONE_PROMPT = "give either prompt or messages, not both"
# Engine field names -> the GenerateRequest's: a prompt the front end tokenised (truncation) is
# the client's `prompt`, an encoded conversation its `messages`.
_PROMPT_NAMES = {"prompt_token_ids": "prompt"}
_CHAT_NAMES = {"prompt_token_ids": "messages", "prompt": "messages"}


def _chat_messages(message: Any) -> list[dict[str, str]]:
    """The request's `ChatMessage`s as the dicts `chat_template.check_messages` checks."""
    return [
        {"role": m.role, "content": m.content, **({"name": m.name} if m.HasField("name") else {})}
        for m in message.messages
    ]


async def submit_generate(
    engine: Any, message: Any, context: StatusContext | None, chat_template: Any = None
) -> AsyncIterator[RequestOutput]:
    """Convert and submit a `GenerateRequest` (what the servicer's Generate and GenerateStream call).

    A request with `messages` is rendered with `chat_template` (runtime/prompts.py
    `encode_messages`: checked as hostile input, tokenised off the loop when long); a
    prompt with `truncate_prompt_tokens` is tokenised and cut here. Engine errors about
    the prompt name the field the client set (`prompt` or `messages`).

    Args:
        engine: the engine (`submit_async`, `tokenizer`, `model_config`).
        message: the protobuf request.
        context: the servicer context (metadata: timeout, client).
        chat_template: the model's `runtime.chat_template.ChatTemplate`; None = no chat.

    Raises:
        InvalidRequestError, and whatever `Engine.submit_async` raises.
    """
    check_parsed(message)
    timeout_ms, client_id = timeout_ms_from_metadata(context), client_from_metadata(context)
    names, ids = _PROMPT_NAMES, None
    if message.messages and not message.prompt:
        if chat_template is None:
            raise InvalidRequestError("messages", f"<{len(message.messages)} messages>", "no chat template")
        s = message.sampling
        truncating = s.HasField("truncate_prompt_tokens")
        agp = message.add_generation_prompt if message.HasField("add_generation_prompt") else True
        ids = await encode_messages(engine, chat_template, _chat_messages(message), agp, truncating)
        names = _CHAT_NAMES
    request = to_engine_request(message, timeout_ms, client_id, ids)
    try:
        await pretokenize_truncated(engine, request)
        return await engine.submit_async(request)
    except InvalidRequestError as e:
        if e.field in names:
            raise InvalidRequestError(names[e.field], e.value, e.allowed) from None
        raise


_FINISH = {"stop": 1, "length": 2, "cancelled": 3}


def to_response(pb2: Any, out: RequestOutput) -> Any:
    """Build a `leanserve.v1.GenerateResponse` from an engine output (whole or delta)."""
    compute = pb2.ComputeUsed(steps=out.steps, policy_reason=out.policy_reason)
    if out.experts is not None:
        compute.experts = out.experts
    if out.mean_loops is not None:
        compute.mean_loops = out.mean_loops
    r = out.speculation
    if r is not None:
        compute.speculation.CopyFrom(
            pb2.SpeculationReport(
                ran=r.ran,
                draft_steps=r.draft_steps,
                draft_tokens=r.draft_tokens,
                drafted_tokens=r.drafted_tokens,
                accepted_tokens=r.accepted_tokens,
                rounds=r.rounds,
                mode=r.mode,
            )
        )
    logprobs = [
        pb2.GeneratedLogprob(
            token=pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob),
            top=[pb2.TokenLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in out.logprobs or ()
    ]
    return pb2.GenerateResponse(
        request_id=out.request_id,
        text=out.text,
        token_ids=out.token_ids,
        finish_reason=_FINISH.get(out.finish_reason or "", 0),
        usage=pb2.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens),
        compute=compute,
        timings=pb2.Timings(
            queue_s=out.queue_s or 0.0, first_token_s=out.first_token_s or 0.0, total_s=out.total_s or 0.0
        ),
        logprobs=logprobs,
    )


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Concatenate stream deltas into one output (the last one's counters and timings)."""
    last = outputs[-1]
    return RequestOutput(
        request_id=last.request_id,
        text="".join(o.text for o in outputs),
        token_ids=[t for o in outputs for t in o.token_ids],
        finished=last.finished,
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        steps=last.steps,
        experts=last.experts,
        policy_reason=last.policy_reason,
        queue_s=last.queue_s,
        first_token_s=last.first_token_s,
        total_s=last.total_s,
        logprobs=None if last.logprobs is None else [lp for o in outputs for lp in o.logprobs or ()],
        speculation=last.speculation,
        mean_loops=last.mean_loops,
    )


async def coalesce(stream: AsyncIterator[RequestOutput], interval: int) -> AsyncIterator[RequestOutput]:
    """Merge stream deltas: the first at once (time to first token), then one per
    `interval` tokens, and always the final one (which carries the finish reason)."""
    pending: list[RequestOutput] = []
    sent_first = False
    async for out in stream:
        pending.append(out)
        if out.finished or not sent_first or sum(len(o.token_ids) for o in pending) >= interval:
            yield merge_outputs(pending)
            pending, sent_first = [], True
    if pending:  # a stream that ended without a finished delta
        yield merge_outputs(pending)


def model_info(pb2: Any, engine: Any, **extras: Any) -> Any:
    """Build a `leanserve.v1.ModelInfo` from a running engine: the compute dial as `/v1/models`
    describes it (`runtime.openai_schema.compute_options`; `extras` are its `latency`,
    `measured_on` and `chat_template`, see `openai_schema.ModelExtras.options`)."""
    mc = engine.model_config
    dial = compute_options(engine, **extras)
    tiers = [
        pb2.QualityTier(
            name=t["name"],
            steps=t["steps"],
            **{k: t[k] for k in ("experts", "perplexity", "ms_per_token") if t[k] is not None},
        )
        for t in dial["quality_tiers"]
    ]
    opts = mc.expert_options
    e = dial["experts"]
    setting = (
        None
        if e is None
        else pb2.ExpertSetting(name=e["name"], min=e["min"], max=e["max"], default=e["default"])
    )
    return pb2.ModelInfo(
        name=mc.name,
        context_length=mc.context_length,
        min_steps=dial["steps"]["min"],
        max_steps=dial["steps"]["max"],
        default_steps=dial["steps"]["default"],
        ffn=mc.ffn,
        experts_top_k_options=opts.get("experts_top_k", []),
        expert_depth_options=opts.get("expert_depth", []),
        quality_tiers=tiers,
        backend=dial["backend"],
        expert_setting=setting,
        dtype=dial["dtype"] or "",
        chat_template=dial["chat_template"] or "",
        latency_calibrated=dial["latency_budget_ms"]["calibrated"],
        measured_on={str(k): str(v) for k, v in (dial["measured_on"] or {}).items()},
        exit_threshold_supported=dial["exit_threshold"] is not None,
    )
