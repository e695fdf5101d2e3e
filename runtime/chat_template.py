"""Chat templates: a conversation (`messages`) as the prompt a model was trained to continue.

A model directory may carry a chat template as Hugging Face transformers
stores it: `chat_template.jinja` (preferred, as in recent transformers), or
the `chat_template` entry of `tokenizer_config.json` (a string, or a list of
`{"name", "template"}` of which "default" is used). It is rendered the way
transformers renders it: a sandboxed jinja2 environment (no attribute access
outside the sandbox, no mutation of the inputs), `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not
HTML-escape, `raise_exception(message)` and `strftime_now(format)` as
globals, and the variables `messages`, `add_generation_prompt` and the special
tokens of `tokenizer_config.json` (`bos_token`, `eos_token`, ...; a model
without that file gets `eos_token` = the tokenizer's end-of-text token).
`{% generation %}...{% endgeneration %}` blocks (transformers' assistant-mask
markers) render their body.

A model without a template gets `PLAIN_TEMPLATE`: each message as
`Role: content` followed by a blank line, then `Assistant:` when
`add_generation_prompt` is set. For example

    System: You are terse.

    User: Hi

    Assistant:

Messages are client input, so they are checked here before rendering
(`check_messages`): a non-empty list of at most `MAX_MESSAGES` objects with a
`role` in `ROLES`, a `content` that is a string or a list of at most
`MAX_CONTENT_PARTS` text parts (`{"type": "text", "text": ...}`, joined with
a newline, as vLLM does for text-only templates) and an optional `name`;
every error names the field (`messages[2].content[0].type`).

Special tokens. The text a template itself writes (`<|im_start|>`, the
`eos_token` between turns) is encoded as control tokens, but the same
characters inside a message's content stay plain text, so a user cannot
inject a turn boundary: before rendering, a special token's text in any
content is replaced by a random per-render marker, and after rendering only
the template's own special-token texts are looked up as ids
(`ChatTemplate.encode`). transformers encodes both the same way.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from jinja2 import nodes

from runtime.types import InvalidRequestError
from runtime.validation import check_text

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 512
MAX_CONTENT_PARTS = 64
MAX_NAME_CHARS = 256
MAX_TEMPLATE_CHARS = 1 << 20  # a template file larger than this is refused at load
_TEXT_PART_JOIN = "\n"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """A model directory's chat template cannot be loaded (the operator's error, at start)."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body (transformers marks the
    assistant's tokens with it for training masks; serving only needs the text)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
    sort_keys: bool = False,
) -> str:  # fmt: skip
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class ChatTemplate:
    """A compiled chat template and the special tokens it may use.

    Attributes:
        source: the jinja2 template text.
        origin: where it came from: "chat_template.jinja", "tokenizer_config.json" or "plain".
        special_tokens: `bos_token`, `eos_token`, ... -> their text (template variables).
    """

    source: str
    origin: str = "plain"
    special_tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template from {self.origin}: line {e.lineno}: {e.message}") from e

    @classmethod
    def plain(cls, eos_token: str | None = None) -> ChatTemplate:
        """The documented fallback template (`PLAIN_TEMPLATE`)."""
        return cls(PLAIN_TEMPLATE, "plain", {"eos_token": eos_token} if eos_token else {})

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, eos_token: str | None = None) -> ChatTemplate:
        """The model directory's template (`chat_template.jinja`, else `tokenizer_config.json`'s
        `chat_template`), or the plain one.

        Args:
            model_dir: the model directory.
            eos_token: `eos_token` when tokenizer_config.json names none (the end-of-text token).

        Raises:
            ChatTemplateError: a template file that does not parse, or a malformed config.
        """
        model_dir = Path(model_dir)
        config: dict[str, Any] = {}
        config_path = model_dir / TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ChatTemplateError(f"{config_path}: not valid JSON ({e})") from e
            if not isinstance(config, dict):
                raise ChatTemplateError(f"{config_path}: must hold a JSON object")
        specials = {k: t for k in _SPECIAL_KEYS if (t := _token_text(config.get(k))) is not None}
        if eos_token and "eos_token" not in specials:
            specials["eos_token"] = eos_token
        path = model_dir / TEMPLATE_FILE
        if path.is_file():
            source, origin = path.read_text(encoding="utf-8"), TEMPLATE_FILE
        else:
            source, origin = _config_template(config.get("chat_template"), config_path), TOKENIZER_CONFIG_FILE
        if source is None:
            return cls(PLAIN_TEMPLATE, "plain", specials)
        if len(source) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"{origin}: the chat template is over {MAX_TEMPLATE_CHARS} characters")
        return cls(source, origin, specials)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The template's text for checked messages (`check_messages`).

        Raises:
            InvalidRequestError: naming `messages`, when the template refuses them
                (`raise_exception`) or fails on them.
        """
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.TemplateError as e:
            raise InvalidRequestError(
                "messages", f"<{len(messages)} messages>", f"the model's chat template refused them: {e}"
            ) from None
        except Exception as e:  # a template that fails on some input must not fail the server
            raise InvalidRequestError(
                "messages",
                f"<{len(messages)} messages>",
                f"the model's chat template failed on them ({type(e).__name__}: {str(e)[:200]})",
            ) from None

    def encode(
        self, messages: list[dict[str, Any]], tokenizer: Any, add_generation_prompt: bool = True
    ) -> list[int]:
        """Render and tokenise: the template's special-token texts become their ids, the same
        texts inside message contents stay plain text (see the module docstring).

        Args:
            messages: checked messages (`check_messages`).
            tokenizer: a `tokenizers.Tokenizer` that encodes special tokens' text as plain text
                (`models.tokenizer.text_only`, what `Engine.tokenizer` is).
        """
        specials = _special_tokens(tokenizer)
        if not specials:
            return tokenizer.encode(self.render(messages, add_generation_prompt)).ids
        nonce = secrets.token_hex(8)
        marks = {text: f"\ue000{nonce}{i}\ue001" for i, text in enumerate(specials)}
        inject = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        unmark = {mark: text for text, mark in marks.items()}
        unmark_re = re.compile("|".join(re.escape(m) for m in unmark))
        masked = [  # every client string: the content and the name (the role is one of ROLES)
            {k: v if k == "role" else inject.sub(lambda x: marks[x.group(0)], v) for k, v in m.items()}
            for m in messages
        ]
        rendered = self.render(masked, add_generation_prompt)
        ids: list[int] = []
        start = 0
        for match in inject.finditer(rendered):
            ids += _encode_plain(tokenizer, unmark_re, unmark, rendered[start : match.start()])
            ids.append(specials[match.group(0)])
            start = match.end()
        ids += _encode_plain(tokenizer, unmark_re, unmark, rendered[start:])
        return ids


def _encode_plain(tokenizer: Any, unmark_re: re.Pattern[str], unmark: dict[str, str], text: str) -> list[int]:
    """Encode text between control tokens, markers put back as the plain text they hid."""
    if not text:
        return []
    return tokenizer.encode(unmark_re.sub(lambda x: unmark[x.group(0)], text)).ids


def _special_tokens(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's special added tokens: text -> id."""
    try:
        added = tokenizer.get_added_tokens_decoder()
    except AttributeError:
        return {}
    return {tok.content: i for i, tok in added.items() if tok.special and tok.content}


def _config_template(value: Any, where: Path) -> str | None:
    """tokenizer_config.json's `chat_template`: a string or a list of named templates."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        if isinstance(chosen, str):
            return chosen
        raise ChatTemplateError(f"{where}: chat_template lists {sorted(map(str, named))} but no 'default'")
    raise ChatTemplateError(f"{where}: chat_template must be a string or a list of named templates")


# ----------------------------------------------------------------------------
# Messages as hostile input
# ----------------------------------------------------------------------------
_MESSAGE_KEYS = frozenset({"role", "content", "name"})
_ROLE_HINT = {
    "tool": "tool messages are not supported (this server has no tool calling)",
    "function": "function messages are not supported (this server has no tool calling)",
}


def _bad(name: str, value: Any, allowed: str) -> InvalidRequestError:
    """A 400 naming the field (the message shows the value shortened: `short_repr`)."""
    return InvalidRequestError(name, value, allowed)


def _content(where: str, value: Any) -> str:
    if isinstance(value, str):
        return check_text(where, value)
    if not isinstance(value, list) or not value:
        raise _bad(where, value, "must be a string or a non-empty list of text parts")
    if len(value) > MAX_CONTENT_PARTS:
        raise _bad(where, value, f"must hold at most {MAX_CONTENT_PARTS} parts")
    texts = []
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _bad(at, part, 'must be an object {"type": "text", "text": "..."}')
        kind = part.get("type")
        if kind != "text":
            what = "must be 'text'" if not isinstance(kind, str) else f"{kind!r} is not supported"
            raise _bad(f"{at}.type", kind, f"{what}: this model reads text parts only")
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise _bad(f"{at}.{extra[0]}", part[extra[0]], "is not a field of a text part")
        if "text" not in part:
            raise _bad(f"{at}.text", None, "is required")
        texts.append(check_text(f"{at}.text", part["text"]))
    return _TEXT_PART_JOIN.join(texts)


def check_messages(value: Any, max_chars: int) -> list[dict[str, str]]:
    """Validate OpenAI `messages` and normalise them for a template.

    Args:
        value: the body's `messages`.
        max_chars: most characters of all contents and names together.

    Returns:
        `[{"role", "content"[, "name"]}]` with contents as strings (text parts joined).

    Raises:
        InvalidRequestError: naming the first bad field (`messages[i].role`, ...).
    """
    if not isinstance(value, list) or not value:
        raise _bad("messages", value, "must be a non-empty list of {role, content} objects")
    if len(value) > MAX_MESSAGES:
        raise _bad("messages", value, f"must hold at most {MAX_MESSAGES} messages")
    out, total = [], 0
    for i, message in enumerate(value):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(at, message, "must be an object with role and content")
        message = {k: v for k, v in message.items() if v is not None}  # null = absent
        extra = sorted(set(message) - _MESSAGE_KEYS)
        if extra:
            hint = "tool calling is not supported" if extra[0].startswith(("tool", "function")) else ""
            allowed = "is not a supported message field" + (f" ({hint})" if hint else "")
            raise _bad(f"{at}.{extra[0]}", message[extra[0]], f"{allowed}; allowed: role, content, name")
        role = message.get("role")
        if role not in ROLES:
            allowed = _ROLE_HINT.get(role) if isinstance(role, str) else None
            raise _bad(f"{at}.role", role, allowed or f"must be one of {', '.join(ROLES)}")
        if "content" not in message:
            raise _bad(f"{at}.content", None, "is required")
        item = {"role": role, "content": _content(f"{at}.content", message["content"])}
        total += len(item["content"])
        if "name" in message:
            item["name"] = check_text(f"{at}.name", message["name"], MAX_NAME_CHARS)
            total += len(item["name"])
        if total > max_chars:
            raise _bad(
                "messages",
                value,
                f"must hold at most {max_chars} characters in all "
                "(truncate_prompt_tokens keeps the last N tokens of a longer conversation)",
            )
        out.append(item)
    return out
