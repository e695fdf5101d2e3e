"""Byte-level BPE tokenizer: training, persistence and streaming detokenisation.

The tokenizer is a GPT-2 style byte-level BPE built with HF `tokenizers`:

* Every UTF-8 byte maps to one of 256 printable base symbols
  (`pre_tokenizers.ByteLevel.alphabet()`), and all 256 are seeded into the
  vocabulary, so *any* string (emoji, CJK, control characters, NUL) encodes
  without an unknown token and `decode(encode(s)) == s` exactly.
* There is no normaliser and no prefix space, because both would break that
  round trip.
* One special token, `EOT_TOKEN` (`<|endoftext|>`), has id 0. Generation stops
  on it; `decode` skips it by default, like every special token.
* Text never becomes a control token: every tokenizer this module trains or
  loads encodes the literal text of a special token (`"<|endoftext|>"` typed
  by a user) as ordinary byte-level tokens (`text_only`), so a client cannot
  inject a document boundary or a chat role marker through a prompt, and
  its text survives `decode(encode(s)) == s`. Control ids are added by the
  server where a format needs them (by id, never by spelling them in text);
  a token-id prompt is the one deliberate way to send one.

Token layout: a sequence of ids is a flat `list[int]` (or a 1-D int64 tensor
in `models.data`); one id may carry a *partial* UTF-8 character, which is why
streaming output needs `IncrementalDecoder`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT_TOKEN = "<|endoftext|>"

# 256 byte symbols + the EOT special token, plus room for at least 63 merges:
# below this the "BPE" is a byte tokenizer with extra steps and the model's
# context window covers almost no text.
MIN_VOCAB_SIZE = 320

# Lines are fed to the trainer in groups of this many. Pre-tokenisation never
# merges across a line end anyway, and grouping keeps the per-item overhead of
# the Python iterator small on multi-megabyte corpora.
_TRAIN_LINES_PER_ITEM = 256


def train_tokenizer(text: str, vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `text`.

    Args:
        text: Training corpus. Must contain at least one non-whitespace char.
        vocab_size: Final vocabulary size, including the 256 byte symbols and
            `EOT_TOKEN`. Must be an int >= `MIN_VOCAB_SIZE`.

    Returns:
        A `tokenizers.Tokenizer` with `EOT_TOKEN` at id 0 that encodes its
        literal text as plain text (`text_only`). Training the same text with
        the same `vocab_size` gives the same tokenizer.

    Raises:
        ValueError: `vocab_size` is too small or not an int, or `text` is empty.
    """
    # bool is an int subclass; `vocab_size=True` is certainly a bug.
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be >= {MIN_VOCAB_SIZE} "
            f"(256 byte symbols + 1 special token + room for merges)"
        )
    if not text.strip():
        raise ValueError("cannot train a tokenizer on empty or whitespace-only text")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # Special tokens are added first, so EOT gets id 0.
        special_tokens=[EOT_TOKEN],
        # Seed all 256 byte symbols even if the corpus never uses them, so
        # nothing the model emits or the user sends is unrepresentable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)
    items = (
        "".join(lines[i : i + _TRAIN_LINES_PER_ITEM]) for i in range(0, len(lines), _TRAIN_LINES_PER_ITEM)
    )
    tok.train_from_iterator(items, trainer=trainer, length=-(-len(lines) // _TRAIN_LINES_PER_ITEM))
    # Fail here rather than at generation time if the invariant ever breaks.
    assert tok.token_to_id(EOT_TOKEN) == 0, "EOT token must have id 0"
    return text_only(tok)


def text_only(tok: Tokenizer) -> Tokenizer:
    """Make `tok` encode special tokens' literal text as plain text, and return it.

    Sets the `tokenizers` flag `encode_special_tokens` (not stored in the JSON
    file, so every loader sets it again). Applies to every special added token
    of the tokenizer (EOT here; chat-template markers of other tokenizers);
    non-special added tokens are ordinary vocabulary and still match.
    Decoding is unaffected: a generated special id is skipped by `decode`,
    user text that merely spells one round-trips unchanged.
    """
    tok.encode_special_tokens = True
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write `tok` as a single JSON file, creating parent folders.

    Args:
        tok: The tokenizer to save.
        path: Destination file (conventionally `tokenizer.json`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer written by `save_tokenizer`.

    Args:
        path: The tokenizer JSON file.

    Returns:
        The tokenizer, encoding special tokens' text as plain text (`text_only`).

    Raises:
        FileNotFoundError: `path` does not exist or is not a file.
        ValueError: the file is not valid JSON, not a tokenizer, or lacks `EOT_TOKEN`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    raw = path.read_bytes()
    # Parse with `json` first: the Rust loader's errors do not name the file
    # and read like internal serde failures.
    try:
        json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON: {e}") from e
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception on schema errors.
        raise ValueError(f"tokenizer file {path} is not a valid tokenizers JSON file: {e}") from e
    if tok.token_to_id(EOT_TOKEN) is None:
        raise ValueError(f"tokenizer file {path} has no {EOT_TOKEN} special token")
    return text_only(tok)


def eot_id(tok: Tokenizer) -> int:
    """Return the id of `EOT_TOKEN` in `tok`.

    Raises:
        ValueError: `tok` has no `EOT_TOKEN`.
    """
    token_id = tok.token_to_id(EOT_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOT_TOKEN} token")
    return token_id


class IncrementalDecoder:
    """Turn a stream of generated token ids into text deltas, one push at a time.

    A byte-level token can end in the middle of a UTF-8 character (an emoji is
    four bytes and often spans tokens), and decoding such a prefix yields a
    trailing U+FFFD. Sending that to a client would corrupt the stream, so the
    decoder holds text back until it completes.

    Two offsets into the retained ids (the scheme used by vLLM and TGI):

    * `prefix`: start of the decode window; the text of `ids[prefix:read]` has
      already been emitted and is decoded again only to be subtracted.
    * `read`: the ids from here on have not been emitted yet.

    On each push, `ids[prefix:]` is decoded; if it grew and does not end with
    U+FFFD, the new suffix is emitted and the window slides forward. Ids before
    `prefix` are dropped, so each push costs O(window), not O(generated).

    Example:
        >>> dec = IncrementalDecoder(tok, prompt_ids)
        >>> for token_id in generated:
        ...     send(dec.push(token_id))
        >>> send(dec.flush())
    """

    # Prompt ids kept as left context. Byte-level decoding needs none, but a
    # few ids keep the scheme correct for decoders that treat the first token
    # of a sequence specially (e.g. SentencePiece's leading-space strip).
    _PROMPT_CONTEXT = 5

    def __init__(self, tok: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        """Start a stream.

        Args:
            tok: The tokenizer that produced the ids.
            prompt_ids: Ids that precede the generated ones; they are context
                only and never emitted.
            skip_special_tokens: Passed to `tok.decode`; the default matches
                `tok.decode`'s, so EOT never appears in the text.
        """
        self._tok = tok
        self._skip = skip_special_tokens
        context = list(prompt_ids or [])[-self._PROMPT_CONTEXT :]
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)
        self._finished = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one generated id and return the newly completed text (maybe "").

        Raises:
            RuntimeError: called after `flush`.
        """
        if self._finished:
            raise RuntimeError("IncrementalDecoder.push called after flush")
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        # A trailing U+FFFD means the last character's bytes are incomplete (a
        # genuine U+FFFD in the output is only delayed until the next push or
        # flush). Not growing happens for ids that decode to "" (skipped EOT).
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            # Slide the window: what was just emitted becomes the new context.
            # Rebase offsets on the retained ids to keep memory O(window).
            del self._ids[: self._read]
            self._prefix, self._read = 0, len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Return whatever is still held back; the stream is finished afterwards.

        If the model generated invalid UTF-8 the result contains U+FFFD, exactly
        as `tok.decode` would render it.
        """
        if self._finished:
            return ""
        self._finished = True
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        return new_text[len(prefix_text) :]
