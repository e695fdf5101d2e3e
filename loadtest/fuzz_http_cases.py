"""Hostile HTTP `/v1/completions` bodies and requests.

`http_mutation` overwrites one to three fields of a valid body with hostile JSON values
(`json_edges`, `prompt_edges`: wrong types, nulls, 10**400, lone surrogates, NaN / Infinity,
OpenAI's list and token-id prompts), written with `dumps_with_raw` where `json.dumps` cannot
produce the text (`Raw`); `http_bodies` are the fixed cases (non-JSON, nested 100,000 deep,
huge bodies, other routes and methods).
"""

from __future__ import annotations

import json
import random
from typing import Any

from loadtest.fuzz_case import HUGE_TEXT_BYTES, MB, short


class Raw:
    """A JSON fragment inserted verbatim (what `json.dumps` cannot produce)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({short(self.text)})"


def dumps_with_raw(obj: Any) -> str:
    """`json.dumps`, with every `Raw` value written as its text."""
    raws: list[str] = []

    def default(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"\x00RAW{len(raws) - 1}\x00"
        raise TypeError(type(o).__name__)

    text = json.dumps(obj, default=default)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00"), raw)
    return text


HTTP_FIELDS = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
    "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "user",
    "suffix", "seed", "steps", "quality", "latency_budget_ms", "experts_top_k", "expert_depth", "priority",
    "draft_steps", "draft_tokens", "exit_threshold", "exit_mode", "truncate_prompt_tokens", "stop_token_ids",
)  # fmt: skip


def json_edges(rng: random.Random) -> list[Any]:
    """Hostile JSON values of every type (some as raw text)."""
    return [
        None, True, False, 0, -1, 1, 2, 5, 20, 21, 1.5, -0.0, 1e-45, 1e-300, 1e308, 2**53 + 1, 2**63, 2**64,
        Raw(str(10**400)), Raw("-" + str(10**400)), Raw("1e999"), Raw("-1e999"), Raw("NaN"), Raw("Infinity"),
        Raw("1e-400"), Raw("0.0000000000000000000000000000000000000000000001"),
        "", "x", "fast", "1", "\x00", Raw('"\\ud800"'), Raw('"a\\udfffb"'), Raw('"\\ud83d"'),
        "🙂" * 10, "y" * 100_000, [], [1, 2], ["a", "b"], [[1]], [None], {}, {"a": 1}, {"0": 1},
        {"1": 100}, {"1": "x"}, {"-1": 1}, {"9999999999": 1}, [rng.random() for _ in range(3)],
    ]  # fmt: skip


def prompt_edges() -> list[Any]:
    """Prompt values: OpenAI's string / list / token-id forms, and broken versions of them."""
    return [
        "God said", "", ["God said", "Let there be"], [""], [], [1, 2, 3], [[1, 2], [3]], [0], [10**9],
        [-1], [1.5], ["a", 1], [[]], [[-5]], [Raw(str(10**400))], Raw('"\\ud800"'),
        Raw('["ok", "\\udc00"]'), "God said " * (HUGE_TEXT_BYTES // 9), list(range(100)) * 100,
    ]  # fmt: skip


def deep_json(depth: int, kind: str = "list") -> str:
    """`[[[...]]]` or `{"a":{"a":...}}` nested `depth` deep, as text."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def http_bodies(rng: random.Random) -> list[tuple[bytes, str, dict[str, str], str, str]]:
    """Fixed hostile HTTP requests: (body, label, headers, method, path)."""
    js = {"Content-Type": "application/json"}
    base = b'{"prompt": "God said", "max_tokens": 4}'
    return [
        (b"", "empty body", js, "POST", "/v1/completions"),
        (b"not json", "non-JSON body", js, "POST", "/v1/completions"),
        (b"{", "truncated JSON", js, "POST", "/v1/completions"),
        (b"\xff\xfe\x00{", "invalid UTF-8 body", js, "POST", "/v1/completions"),
        (b"[]", "JSON list body", js, "POST", "/v1/completions"),
        (b'"prompt"', "JSON string body", js, "POST", "/v1/completions"),
        (b"123", "JSON number body", js, "POST", "/v1/completions"),
        (b"null", "JSON null body", js, "POST", "/v1/completions"),
        (b"\xef\xbb\xbf" + base, "UTF-8 BOM before JSON", js, "POST", "/v1/completions"),
        (base, "text/plain content type", {"Content-Type": "text/plain"}, "POST", "/v1/completions"),
        (deep_json(100_000).encode(), "list nested 100,000 deep (body)", js, "POST", "/v1/completions"),
        (('{"prompt": ' + deep_json(100_000) + "}").encode(), "prompt nested 100,000 deep", js, "POST",
         "/v1/completions"),
        (deep_json(100_000, "dict").encode(), "object nested 100,000 deep", js, "POST", "/v1/completions"),
        (b'{"prompt": "God said", "max_tokens": 4, "prompt": 5}', "duplicate key", js, "POST",
         "/v1/completions"),
        (json.dumps({"prompt": "x" * (8 * MB)}).encode(), "8 MB prompt", js, "POST", "/v1/completions"),
        (b" " * (2 * MB) + base, "2 MB of whitespace then JSON", js, "POST", "/v1/completions"),
        (base, "GET on /v1/completions", js, "GET", "/v1/completions"),
        (base, "unknown route", js, "POST", "/v1/nothing"),
        (b"", "GET /v1/models", {}, "GET", "/v1/models"),
        (b"", "GET /stats", {}, "GET", "/stats"),
        (b"", "DELETE /healthz", {}, "DELETE", "/healthz"),
        (base, "Content-Length lies (short)", {**js, "Content-Length": "5"}, "POST", "/v1/completions"),
    ]  # fmt: skip


def http_mutation(rng: random.Random) -> tuple[bytes, str]:
    """A valid completions body with one to three fields overwritten by hostile values."""
    body: dict[str, Any] = {"prompt": "God said", "max_tokens": 4}
    if rng.random() < 0.3:
        body["stream"] = True
    labels = []
    for name in rng.sample(HTTP_FIELDS, rng.randint(1, 3)):
        value = rng.choice(prompt_edges() if name == "prompt" else json_edges(rng))
        body[name] = value
        labels.append(f"{name}={short(value)}")
    if rng.random() < 0.1:
        body[f"unknown_{rng.randint(0, 99)}"] = rng.choice(json_edges(rng))
        labels.append("an unknown field")
    return dumps_with_raw(body).encode("utf-8"), "; ".join(labels)
