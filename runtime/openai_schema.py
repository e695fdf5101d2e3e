"""The compute dial made discoverable: `/v1/models` cards and the OpenAPI request schemas.

`compute_options(engine, ...)` is the one description of what a request may
choose, read by `/v1/models` (the `leanserve` object of each model card) and
by gRPC `GetModelInfo` (runtime/grpc_servicer.py `model_info`):

* `steps`: `{"min", "max", "default"}` (the default is the current one under
  an SLO controller);
* `quality_tiers`: `[{"name", "steps", "experts", "perplexity", "ms_per_token"}]`,
  perplexity and batch-1 milliseconds per token as measured for that setting
  in the model's `profile.json` (null when not measured), plus `measured_on`;
* `experts`: `ModelConfig.expert_setting` (`{"name", "min", "max", "default"}`,
  null for a dense FFN);
* `latency_budget_ms` (max, and whether a calibrated cost model maps it),
  `truncate_prompt_tokens` range, `context_length`, `backend`, `dtype`,
  `chat_template` (where the template came from: "chat_template.jinja",
  "tokenizer_config.json" or "plain").

`COMPLETIONS_OPENAPI` / `CHAT_OPENAPI` are FastAPI `openapi_extra` values for
the routes (their handlers read raw bodies, so FastAPI cannot infer them):
the request schema with OpenAI's fields and the extra fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.chat_template import ChatTemplate
from runtime.types import EXIT_MODES, MAX_DRAFT_TOKENS, MAX_LOGPROBS, QUALITY_TIERS
from runtime.validation import MAX_LATENCY_BUDGET_MS, has_exit_gate


def measured_latency(model_dir: str | Path | None) -> tuple[dict[tuple[int, int | None], float], dict]:
    """`ms_per_token` per `(steps, experts)` from the model's profile.json, and its `measured_on`.

    The runtime's profile (`runtime.policy.ModelProfile`) keeps perplexities, not these
    timings, so they are read from the same file here; rows without a number are skipped.
    """
    if model_dir is None:
        return {}, {}
    from models.checkpoint import PROFILE_FILE, read_json

    data = read_json(model_dir, PROFILE_FILE) or {}
    out: dict[tuple[int, int | None], float] = {}
    for row in data.get("settings") or []:
        try:
            experts = None if row.get("experts") is None else int(row["experts"])
            out[(int(row["steps"]), experts)] = float(row["ms_per_token"])
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    measured_on = data.get("measured_on")
    return out, measured_on if isinstance(measured_on, dict) else {}


@dataclass
class ModelExtras:
    """What the API reads from the model directory once, when a replica starts: the chat
    template and the profile's measured timings (`options()`: keyword arguments of
    `compute_options`, `models_list` and gRPC `model_info`).

    Attributes:
        chat_template: the model's template (`ChatTemplate.from_model_dir`).
        latency: `ms_per_token` per `(steps, experts)` (`measured_latency`).
        measured_on: the profile's `measured_on`.
    """

    chat_template: ChatTemplate
    latency: dict[tuple[int, int | None], float] = field(default_factory=dict)
    measured_on: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, model_dir: str | Path, tokenizer: Any = None) -> ModelExtras:
        """Read a model directory (the plain template's `eos_token` is the tokenizer's
        end-of-text token when it has one).

        Raises:
            ChatTemplateError: a template that does not parse.
            models.checkpoint.CheckpointError: a profile.json that is not JSON.
        """
        from models.tokenizer import EOT_TOKEN

        eos = EOT_TOKEN if tokenizer is not None and tokenizer.token_to_id(EOT_TOKEN) is not None else None
        latency, measured_on = measured_latency(model_dir)
        return cls(ChatTemplate.from_model_dir(model_dir, eos), latency, measured_on)

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `compute_options` (and so of `models_list`, `model_info`)."""
        return {
            "latency": self.latency,
            "measured_on": self.measured_on,
            "chat_template": self.chat_template.origin,
        }


def backend_dtype(backend: Any) -> str | None:
    """The compute dtype of a backend: its `dtype` attribute (the ONNX backend has one), else
    its torch model's parameter dtype; None when it cannot be told."""
    dtype = getattr(backend, "dtype", None)
    if dtype is None:
        model = getattr(backend, "model", None)
        try:
            dtype = next(model.parameters()).dtype if model is not None else None
        except (AttributeError, StopIteration, TypeError):
            return None
    return None if dtype is None else str(dtype).removeprefix("torch.")


def compute_options(
    engine: Any,
    latency: dict[tuple[int, int | None], float] | None = None,
    measured_on: dict | None = None,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """The compute dial of a running engine (see the module docstring).

    Args:
        engine: the engine (`model_config`, `policy`, `stats()`, `backend`).
        latency: `measured_latency(model_dir)[0]`.
        measured_on: `measured_latency(model_dir)[1]`.
        chat_template: `ChatTemplate.origin`.
    """
    mc = engine.model_config
    lo, hi = mc.step_range
    setting = mc.expert_setting
    top = mc.max_expert_setting
    profile = engine.policy.profile
    latency = latency or {}
    tiers = []
    order = {name: i for i, name in enumerate(QUALITY_TIERS)}
    for name, tier in sorted(engine.policy.tiers.items(), key=lambda kv: (order.get(kv[0], 99), kv[0])):
        experts = tier.experts if tier.experts is not None else top
        key = (tier.steps, experts)
        tiers.append(
            {
                "name": name,
                "steps": tier.steps,
                "experts": experts,
                "perplexity": profile.perplexity.get(key),
                "ms_per_token": latency.get(key),
            }
        )
    stats = engine.stats()
    return {
        "context_length": mc.context_length,
        "steps": {"min": lo, "max": hi, "default": stats.default_steps},
        "quality_tiers": tiers,
        "measured_on": measured_on or None,
        "experts": None
        if setting is None
        else {"name": setting.name, "min": setting.lo, "max": setting.hi, "default": setting.default},
        "ffn": mc.ffn,
        "latency_budget_ms": {
            "min_exclusive": 0,
            "max": MAX_LATENCY_BUDGET_MS,
            "calibrated": profile.cost_model is not None,
        },
        "truncate_prompt_tokens": {"min": 1, "max": mc.context_length},
        "exit_threshold": (
            {"min_exclusive": 0, "max": 1, "modes": list(EXIT_MODES)} if has_exit_gate(mc) else None
        ),
        "speculation": {
            "draft_steps": {"min": lo, "max": hi - 1, "off": 0, "default": _draft_default(engine)},
            "draft_tokens": {
                "min": 1,
                "max": MAX_DRAFT_TOKENS,
                "default": _setting(engine, "draft_tokens", 4),
            },
        },
        "backend": engine.backend.name,
        "dtype": backend_dtype(engine.backend),
        "chat_template": chat_template,
    }


def _setting(engine: Any, name: str, default: Any) -> Any:
    return getattr(getattr(engine, "config", None), name, default)


def _draft_default(engine: Any) -> int | str:
    """The server's default draft_steps as the dial reports it: 0 (off), a count or "auto"."""
    value = _setting(engine, "draft_steps", None)
    return value if value == "auto" else int(value or 0)


def models_list(model_name: str, created: int, engine: Any = None, **options: Any) -> dict[str, Any]:
    """The `/v1/models` body; with the engine each card carries `max_model_len` (vLLM's name)
    and the compute dial under `leanserve` (`compute_options`, `options` passed on)."""
    card: dict[str, Any] = {"id": model_name, "object": "model", "created": created, "owned_by": "leanserve"}
    if engine is not None:
        card["max_model_len"] = engine.model_config.context_length
        card["leanserve"] = compute_options(engine, **options)
    return {"object": "list", "data": [card]}


# ----------------------------------------------------------------------------
# OpenAPI request schemas
# ----------------------------------------------------------------------------
def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_INT, _NUM, _STR, _BOOL = {"type": "integer"}, {"type": "number"}, {"type": "string"}, {"type": "boolean"}
_STRINGS = {"type": "array", "items": _STR}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}

COMPUTE_SCHEMA: dict[str, Any] = {
    "steps": {
        "type": "integer",
        "description": "leanserve: Euler steps per token, within the model's step range (GET /v1/models "
        "-> data[].leanserve.steps). Wins over quality and latency_budget_ms.",
    },
    "quality": {
        "type": "string",
        "description": "leanserve: a named quality tier (data[].leanserve.quality_tiers), e.g. "
        + ", ".join(QUALITY_TIERS),
    },
    "latency_budget_ms": {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": MAX_LATENCY_BUDGET_MS,
        "description": "leanserve: whole-request budget, mapped through the calibrated cost model to the "
        "most steps predicted to fit",
    },
    "experts_top_k": {"type": "integer", "description": "leanserve: experts per token (MoE models)"},
    "expert_depth": {"type": "integer", "description": "leanserve: tree-FFN depth (tree models)"},
    "draft_steps": {
        "type": "integer",
        "minimum": 0,
        "description": "leanserve: self-speculative decoding, lossless: draft with this many Euler steps "
        "and verify with the request's steps; in [min_steps, steps - 1], 0 = off, unset = the server's "
        "default (the response's leanserve.speculation reports drafted and accepted tokens)",
    },
    "draft_tokens": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_DRAFT_TOKENS,
        "description": "leanserve: tokens drafted per speculative round; unset = the server's default",
    },
    "exit_threshold": {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
        "description": "leanserve, models with an exit gate (Ouro): every loop runs and each token is "
        "read from the first loop whose cumulative exit probability reaches this threshold (the "
        "reference's threshold exit); data[].leanserve.exit_threshold says whether a model takes it",
    },
    "exit_mode": {
        "type": "string",
        "enum": list(EXIT_MODES),
        "description": "leanserve, with exit_threshold: all_loops (the reference, default) or "
        "stop_early (experimental: a generated token that exits stops looping; the loops it skips "
        "get its exit loop's keys and values)",
    },
    "truncate_prompt_tokens": {
        "type": "integer",
        "minimum": 1,
        "description": "keep only the last N prompt tokens (vLLM's field); without it a prompt that "
        "does not fit is refused naming prompt (messages in chat)",
    },
    "top_k": {"type": "integer", "description": "most likely tokens kept; 0 or -1 = disabled"},
    "stop_token_ids": _IDS,
    "priority": {
        "type": "integer",
        "minimum": -100,
        "maximum": 100,
        "description": "order among this client's own waiting requests, lower first",
    },
}

_SHARED = {
    "model": _STR,
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 16},
    "stream": _BOOL,
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": _BOOL},
        "additionalProperties": False,
    },
    "stop": {"anyOf": [_STR, _STRINGS]},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "logit_bias": {
        "type": "object",
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    },
    "user": _STR,
    "seed": {"type": "integer", "minimum": 0},
    **COMPUTE_SCHEMA,
}


def _body(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    """An `openapi_extra` with a JSON request body (null is accepted for every optional field)."""
    props = {k: (v if k in required else _nullable(v)) for k, v in properties.items()}
    schema = {"type": "object", "required": required, "properties": props, "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


COMPLETIONS_OPENAPI = _body(
    ["prompt"],
    {
        "prompt": {"anyOf": [_STR, _STRINGS, _IDS, {"type": "array", "items": _IDS}]},
        "suffix": {"type": "string", "maxLength": 0},
        "echo": _BOOL,
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
        "best_of": _INT,
        **_SHARED,
    },
)

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": _STR},
    "additionalProperties": False,
}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [_STR, {"type": "array", "items": _TEXT_PART, "minItems": 1}]},
        "name": _STR,
    },
    "additionalProperties": False,
}

CHAT_OPENAPI = _body(
    ["messages"],
    {
        "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": _BOOL,
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
        "response_format": {"type": "object", "properties": {"type": {"const": "text"}}},
        "tools": {"type": "array", "maxItems": 0},
        "tool_choice": {"const": "none"},
        "parallel_tool_calls": _BOOL,
        "add_generation_prompt": {"type": "boolean", "description": "vLLM's field; default true"},
        **_SHARED,
    },
)
