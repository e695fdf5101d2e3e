"""Prompt preparation the HTTP and gRPC front ends share, before a request reaches the engine.

* A conversation (`messages`) is checked as hostile input, rendered with the
  model's chat template and tokenised (`encode_messages`; a long one in a
  thread), so the engine receives token ids.
* A prompt with `truncate_prompt_tokens` is cut to its last N tokens here
  (`pretokenize_truncated`; a text is tokenised first), so that a text
  longer than the engine's character limit can still be truncated (it is
  bounded by `MAX_TRUNCATED_PROMPT_CHARS` instead) and an echo shows what ran.

The engine's errors about the prompt then name `prompt_token_ids`; the front
ends map that back to the field the client sent (`prompt` or `messages`).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from runtime.chat_template import ChatTemplate, check_messages
from runtime.types import GenerationRequest
from runtime.validation import MAX_TRUNCATED_PROMPT_CHARS, check_text, is_int, max_prompt_chars

# Texts longer than this are tokenised in a thread, so that a large body does not hold the
# event loop (the engine's own threshold for text prompts is EngineConfig.tokenize_inline_chars).
TOKENIZE_INLINE_CHARS = 4096

_PROMPT_LIMITS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def prompt_char_limit(engine: Any, truncating: bool) -> int:
    """Most characters of a conversation: what a text prompt may hold (`max_prompt_chars`,
    computed once per engine), or `MAX_TRUNCATED_PROMPT_CHARS` under truncation."""
    if truncating:
        return MAX_TRUNCATED_PROMPT_CHARS
    limit = _PROMPT_LIMITS.get(engine)
    if limit is None:
        limit = _PROMPT_LIMITS[engine] = max_prompt_chars(engine.model_config, engine.tokenizer)
    return limit


async def encode_messages(
    engine: Any, template: ChatTemplate, messages: Any, add_generation_prompt: bool, truncating: bool
) -> list[int]:
    """Check `messages`, render and tokenise them with `engine.tokenizer` (in a thread when long).

    Raises:
        InvalidRequestError: naming the bad field (`messages[i]...`).
    """
    checked = check_messages(messages, prompt_char_limit(engine, truncating))
    if sum(len(m["content"]) for m in checked) <= TOKENIZE_INLINE_CHARS:
        return template.encode(checked, engine.tokenizer, add_generation_prompt)
    return await asyncio.to_thread(template.encode, checked, engine.tokenizer, add_generation_prompt)


async def pretokenize_truncated(engine: Any, request: GenerationRequest) -> None:
    """Truncate the prompt of a request that sets `truncate_prompt_tokens` to its last N token ids
    (a text prompt tokenised with `engine.tokenizer`, in a thread when long), so that what the
    engine runs is what an echo shows; other requests (and an invalid N, which the engine
    names) are left alone.

    Raises:
        InvalidRequestError: naming `prompt`, a text over `MAX_TRUNCATED_PROMPT_CHARS` or not
            valid Unicode.
    """
    keep, text = request.sampling.truncate_prompt_tokens, request.prompt
    if not is_int(keep) or keep < 1:
        return
    if isinstance(request.prompt_token_ids, list) and text is None:
        request.prompt_token_ids = request.prompt_token_ids[-keep:]
        return
    if not isinstance(text, str) or not text:
        return  # the engine names an empty or missing prompt
    check_text("prompt", text, MAX_TRUNCATED_PROMPT_CHARS)
    if len(text) > TOKENIZE_INLINE_CHARS:
        ids = await asyncio.to_thread(lambda: engine.tokenizer.encode(text).ids)
    else:
        ids = engine.tokenizer.encode(text).ids
    if ids:
        request.prompt, request.prompt_token_ids = None, ids[-keep:]
