"""Sampling from last-position logits, and the text side of stopping.

Batch invariance. Every request owns a `torch.Generator` seeded from its seed
(`make_generator`), and each row is filtered and drawn on its own with its own
generator, so a request's draws never depend on which other rows share the
batch: the same seed and settings give the same tokens alone or batched (as
long as the model's logits for the row agree, which the model's batch
invariance tests guarantee to ~1e-6). Greedy rows (temperature 0) take the
argmax and touch no generator.

Filtering order (as in HF and vLLM): logit bias and presence / frequency
penalties (`LogitAdjust`), then temperature, then top-k, then top-p on the
renormalised distribution, always keeping at least the most likely token.

No accepted input can make a draw fail. Validation (runtime/validation.py)
bounds every field; a temperature below `GREEDY_BELOW_TEMPERATURE` is
sampled as its limit, greedy (dividing float32 logits by 1e-45 gives inf and
NaN probabilities); top-p always keeps the most likely token, so a top_p that
rounds to 0 in float32 is top-1, not an empty distribution. A row whose
logits are not finite fails that row alone (`NonFiniteLogitsError`): the
other rows of the batch are drawn as usual.

Log-probabilities (`SamplingParams.logprobs`) are those of the adjusted
logits (after bias and penalties, before temperature and filtering), as
OpenAI reports the model's distribution rather than the sampler's.

Text. `TextStream` turns generated ids into text deltas with
`models.tokenizer.IncrementalDecoder` (never emits broken UTF-8) and applies
stop strings on the decoded text: the stop string and everything after it is
dropped, and text that could still be the beginning of a stop string is held
back until the next tokens disambiguate it (or the stream ends).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from models.tokenizer import IncrementalDecoder
from runtime.types import EngineError, SamplingParams, TokenLogprob

# Temperatures in (0, this) are sampled greedily, their limit: below it the
# distribution is the argmax for any logits whose gaps exceed ~1e-4 * 50, and
# float32 division by much smaller values overflows.
GREEDY_BELOW_TEMPERATURE = 1e-4


class NonFiniteLogitsError(EngineError):
    """The model produced NaN or infinite logits for a row (that request fails)."""


def is_greedy(p: SamplingParams) -> bool:
    """True when the row takes the argmax (temperature 0 or below `GREEDY_BELOW_TEMPERATURE`)."""
    return p.temperature < GREEDY_BELOW_TEMPERATURE


class LogitAdjust:
    """Logit bias and presence / frequency penalties of one request (OpenAI semantics).

    Built once per request (`for_params`), applied to the row's logits before
    every draw with the ids the request generated so far:
    `logits[t] += bias[t] - presence * (count[t] > 0) - frequency * count[t]`.
    """

    __slots__ = ("_bias_ids", "_bias_values", "_presence", "_frequency")

    def __init__(self, p: SamplingParams) -> None:
        items = sorted(p.logit_bias.items())
        self._bias_ids = torch.tensor([int(k) for k, _ in items], dtype=torch.long)
        self._bias_values = torch.tensor([float(v) for _, v in items], dtype=torch.float32)
        self._presence = float(p.presence_penalty)
        self._frequency = float(p.frequency_penalty)

    @classmethod
    def for_params(cls, p: SamplingParams) -> LogitAdjust | None:
        """The adjustment of `p`, or None when it changes nothing."""
        if not p.logit_bias and p.presence_penalty == 0 and p.frequency_penalty == 0:
            return None
        return cls(p)

    @property
    def uses_history(self) -> bool:
        """Whether `apply` reads the generated ids (penalties are set)."""
        return self._presence != 0 or self._frequency != 0

    def apply(self, logits: Tensor, generated: Sequence[int]) -> Tensor:
        """Adjusted copy of one row's logits.

        Args:
            logits: (V,) float32 logits.
            generated: ids generated so far by this request.

        Returns:
            (V,) float32 logits.
        """
        x = logits.clone()
        if len(self._bias_ids):
            x.index_add_(0, self._bias_ids, self._bias_values)
        if generated and self.uses_history:
            counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=x.shape[-1])
            counts = counts[: x.shape[-1]].to(x.dtype)
            x -= self._frequency * counts + self._presence * (counts > 0).to(x.dtype)
        return x


@dataclass
class Draw:
    """One row's sampled token and, when asked for, its log-probabilities."""

    token: int
    logprob: TokenLogprob | None = None


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
        (V,) float32 logits; at least one entry is finite when `logits` are.
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
        drop_sorted[0] = False  # even when top_p rounds to 0 in float32
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def _logprob(logits: Tensor, token: int, k: int) -> TokenLogprob:
    """Log-probability of `token` and the `k` most likely tokens under (V,) `logits`."""
    logp = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logp, k) if k else None
    pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
    return TokenLogprob(token_id=token, logprob=float(logp[token]), top=pairs)


def sample_rows(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    adjusts: Sequence[LogitAdjust | None] | None = None,
    generated: Sequence[Sequence[int]] | None = None,
) -> list[Draw | NonFiniteLogitsError]:
    """One draw per row; a row that cannot be drawn gets its error instead.

    Args:
        logits: (B, V) last-position logits.
        params: B sampling parameters, one per row.
        generators: B generators (None allowed for greedy rows).
        adjusts: B logit adjustments (None entries, or None for all: none).
        generated: B lists of ids generated so far (read by penalties only).

    Returns:
        B entries: a `Draw`, or the `NonFiniteLogitsError` of that row.
    """
    B = len(params)
    if logits.dim() != 2 or logits.shape[0] != B or B != len(generators):
        raise ValueError(
            f"logits {tuple(logits.shape)} must be (B, V) with B = len(params) = {B} "
            f"= len(generators) = {len(generators)}"
        )
    adjusts = adjusts or [None] * B
    logits = logits.detach().float().cpu()
    # (B,) batched reductions in NumPy on the tensor's own memory: its argmax (the first
    # maximal index, as torch's) takes ~5 us for 16 x 4096 on CPU where torch's
    # max(dim).indices takes ~33 and argmax ~95; its isfinite ~4 us against torch's ~35.
    array = logits.numpy()
    finite = np.isfinite(array).all(axis=-1).tolist()  # (B,)
    greedy = array.argmax(-1).tolist()
    out: list[Draw | NonFiniteLogitsError] = []
    for b, (p, gen, adjust) in enumerate(zip(params, generators, adjusts)):
        if not finite[b]:
            out.append(NonFiniteLogitsError("the model produced non-finite logits for this request"))
            continue
        row = logits[b]
        if adjust is not None:
            row = adjust.apply(row, generated[b] if generated is not None else ())
        if is_greedy(p):
            token = int(greedy[b]) if adjust is None else int(row.argmax())
        else:
            probs = torch.softmax(filter_logits(row, p.temperature, p.top_k, p.top_p), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        out.append(Draw(token, None if p.logprobs is None else _logprob(row, token, p.logprobs)))
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
