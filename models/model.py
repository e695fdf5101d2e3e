"""LeanLM: the elastic-compute decoder, one file top to bottom.

    tokens -> embedding + learned positions -> trunk -> final norm -> logits / m_N

The trunk integrates `dx/dt = f_k(x)` over `[0, T]` with forward Euler:
`N` steps of size `h = T / N`, step `i` running block `k = floor(i * n_blocks
/ N)` (see models/config.py). `N` is chosen per row: a (B,) tensor `steps`.
Rows with different `N` share one call. Iteration `i` runs only the rows whose
`N` exceeds `i`, each with its own `h`, so a 4-step row costs 4 block
applications even when it shares the batch with a 12-step row; nothing is
padded to the longest row.

Token layout: dense rows, `tokens` (B, T) with `positions` (B, T) giving each
token's absolute position. Without a cache the T tokens of a row are the whole
sequence (training, scoring). With a `KVBatch` they are appended to the row's
cached prefix: positions[b, 0] must equal the number of tokens cached for row
b (a prompt, a chunk of one, one decode token or several draft tokens).

`forward` describes the call (`models.trunk.describe`, which checks every
argument) and runs it with the model's own modules (`EagerExecutor`) through
`models.trunk.run_forward`, the loop every backend shares (models/trunk.py).

Shape legend:
    B | rows           T | new tokens per row     d | model width
    V | vocabulary     N | steps per row          R | rows active in a step
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig
from models.executors import EagerExecutor
from models.kv_cache import KVBatch
from models.layers import Block, build_norm
from models.parameterisation import init_weights
from models.trunk import ModelOutput, describe, generate_sequence, run_forward

__all__ = ["LeanLM", "ModelOutput"]


class LeanLM(nn.Module):
    """Decoder-only LM with a stacked or weight-shared Euler trunk."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.context_length, d)
        self.blocks = nn.ModuleList(Block(config, first=(i == 0)) for i in range(config.n_blocks))
        # With norms removed from the blocks a final RMSNorm still bounds the logits.
        self.norm_f = build_norm(config, "rmsnorm" if config.norm == "none" else None)
        self.head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        init_weights(self)

    # ------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        steps: Tensor | int | list[int] | None = None,
        kv: KVBatch | None = None,
        experts: Tensor | None = None,
        last_only: bool = False,
        last_index: Tensor | None = None,
    ) -> ModelOutput:
        """Run the model.

        Args:
            tokens: (B, T) int64 token ids.
            positions: (B, T) int64 absolute positions; default 0..T-1.
            steps: (B,) int64 step count per row (or an int for all rows);
                default `config.default_steps`.
            kv: paged cache view; new keys/values are written to it and the
                row's cached prefix is attended to. None = no cache.
            experts: (B,) int64 experts top-k (MoE) or truncation depth (tree)
                per row; None = the trained maximum.
            last_only: compute logits for the last position only (decode).
            last_index: (B,) int64 index in [0, T) of each row's last real
                token, for right-padded rows of different lengths; with
                `last_only`, default T - 1.

        Returns:
            ModelOutput with logits (B, T, V) or (B, 1, V).
        """
        fwd = describe(self.config, tokens, positions, steps, kv, experts, last_only, last_index)
        return run_forward(EagerExecutor(self), self.config, fwd)

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens, positions (B, T) -> x (B, T, d): token plus learned position embedding."""
        return F.embedding(tokens, self.wte.weight) + F.embedding(positions, self.wpe.weight)

    def logits(self, x: Tensor, head_t: Tensor | None = None) -> Tensor:
        """x (B, T, d) after the trunk -> logits (B, T, V): final norm, head, 1/m_N.

        `head_t` is the output matrix as a (d, V) tensor when the caller keeps
        a copy laid out for the matmul (the compiled decode path does); by
        default the model's own (V, d) matrix, transposed as a view.
        """
        if head_t is None:
            head_t = (self.wte.weight if self.head is None else self.head.weight).t()
        out = self.norm_f(x) @ head_t
        mult = self.config.logit_mult  # CompleteP/muP output multiplier
        return out if mult == 1.0 else out * mult

    # ------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        steps: int | None = None,
        experts: int | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[int]:
        """Simple single-sequence generation with the paged cache.

        The serving engine (runtime/) batches many sequences; this is the
        reference path for tests, evaluation and `leanserve generate --local`.
        """
        return generate_sequence(self, self.config, prompt, max_new_tokens, steps, experts, temperature, seed)
