"""Sampling from last-position logits, and the text side of stopping.

Batch invariance. Every request owns a `torch.Generator` seeded from its seed
(`make_generator`), and each row is filtered and drawn on its own with its own
generator, so a request's draws never depend on which other rows share the
batch: the same seed and settings give the same tokens alone or batched (as
long as the model's logits for the row agree, which the model's batch
invariance tests guarantee to ~1e-6). Greedy rows (temperature 0) take the
argmax and touch no generator.

Filtering order (as in HF and vLLM): temperature, then top-k, then top-p on
the renormalised distribution, always keeping at least the most likely token.

Text. `TextStream` turns generated ids into text deltas with
`models.tokenizer.IncrementalDecoder` (never emits broken UTF-8) and applies
stop strings on the decoded text: the stop string and everything after it is
dropped, and text that could still be the beginning of a stop string is held
back until the next tokens disambiguate it (or the stream ends).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from torch import Tensor

from models.tokenizer import IncrementalDecoder
from runtime.types import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded from `seed` (a random seed when None)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    return gen


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature-scaled logits with the top-k / top-p tail set to -inf.

    Args:
        logits: (V,) float logits of one row.
        temperature: > 0.
        top_k: keep the k most likely tokens; 0 = all.
        top_p: keep the smallest set whose probability reaches top_p; 1 = all.

    Returns:
        (V,) float32 logits; at least one entry is finite.
    """
    x = logits.float() / temperature
    V = x.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the mass *before* it already reaches top_p; this
        # always keeps the first (most likely) token.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """One token per row.

    Args:
        logits: (B, V) last-position logits.
        params: B sampling parameters, one per row.
        generators: B generators (None allowed for greedy rows).

    Returns:
        B sampled token ids.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(
            f"logits {tuple(logits.shape)} must be (B, V) with B = len(params) = {len(params)} "
            f"= len(generators) = {len(generators)}"
        )
    logits = logits.detach().float().cpu()
    # (B,) one batched reduction for all greedy rows: NumPy's argmax (the first
    # maximal index, as torch's) takes ~5 us for 16 x 4096 on CPU where
    # torch's max(dim).indices takes ~33 and argmax ~95.
    greedy = logits.numpy().argmax(-1).tolist()
    out: list[int] = []
    for b, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature == 0:
            out.append(int(greedy[b]))
            continue
        probs = torch.softmax(filter_logits(logits[b], p.temperature, p.top_k, p.top_p), dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out


class TextStream:
    """Incremental detokenisation plus stop-string handling for one request."""

    def __init__(self, tok: Tokenizer, prompt_ids: list[int], stop: Sequence[str] = ()) -> None:
        """Start a stream.

        Args:
            tok: the tokenizer.
            prompt_ids: prompt ids (left context for the decoder, never emitted).
            stop: stop strings (empty strings are ignored).
        """
        self._decoder = IncrementalDecoder(tok, prompt_ids)
        self._stop = [s for s in stop if s]
        self._pending = ""  # decoded but not yet emitted (could start a stop string)
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is safe to emit now.

        After a stop string matched, `stopped` is True and later calls emit
        nothing.
        """
        if self.stopped:
            return ""
        self._pending += self._decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """End the stream (max_tokens, stop token): emit whatever is left."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._pending
        # Earliest full stop-string match wins; everything from it on is dropped.
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        if final:
            self._pending = ""
            return text
        # Hold back the longest suffix that is a proper prefix of a stop string.
        hold = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]
