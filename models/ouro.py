"""Ouro (ByteDance LoopLM) in the project's model family: a looped decoder stack, one loop per step.

    tokens -> embedding -> loop 1 .. N over the same L decoder layers -> lm_head
                           (each loop: layers 0..L-1, then the final RMSNorm)

`N`, the loop count, is the request's `steps` (1..total_ut_steps), chosen per
row like the Euler steps of a LeanLM: a trunk step of models/trunk.py is one
loop, so the step schedule, the runner's batching of rows with different
step counts, the KV reservation (`steps x pages`) and the metrics work
unchanged. The trunk has one "block" (the loop, `n_shared_blocks = 1`); the
Euler step size `h` the schedule hands it is ignored, as Ouro's residual
stream is not an ODE.

One decoder layer (four RMSNorms: before and after attention, before and
after the MLP, the "sandwich" form of the checkpoint):

    x = x + N_attn_out(Attn(N_attn_in(x)))      input_layernorm, input_layernorm_2
    x = x + N_mlp_out(MLP(N_mlp_in(x)))         post_attention_layernorm, post_attention_layernorm_2

with rotary position embeddings on queries and keys (rotate-half form),
grouped-query attention (`n_kv_heads` key/value heads shared by
`n_heads / n_kv_heads` query heads each), softmax scale 1/sqrt(head_dim),
and a SwiGLU MLP `down(silu(gate(x)) * up(x))`. After the L layers of a loop
the final norm is applied and its output is what the next loop reads (and
what the head reads after the last loop): logits with N loops are
`lm_head(norm(stack^N ...))`, which equals the reference's `exit_at_step=N-1`.

KV: every (loop, layer) attends with its own keys and values. A loop's page
holds all L layers: the storage's head axis has `L x n_kv_heads` heads
(`OuroConfig.kv_heads_per_step`), layer l owning heads [l * kv, (l + 1) * kv),
so a request's KV is loops x layers x tokens, reserved by the allocator
as `steps x pages` like any other model.

The exit gate: a linear map d -> 1 of each loop's normed state, lambda_i =
sigmoid(gate_i); the exit distribution over loops is p_i = lambda_i *
prod_{j<i} (1 - lambda_j), the last loop taking what is left
(`exit_distribution`). The reference's threshold mode computes every loop
and gives each token the state of the first loop whose cumulative exit
probability reaches the threshold (`OuroLM.threshold_logits`). Serving runs
the loop count of `steps`; the threshold mode is a model-level API here.

Shape legend (as in models/trunk.py):
    B | rows      T | new tokens per row    d | hidden size     V | vocabulary
    R | rows in a step     L | layers per loop    nh, kv | query / key-value heads
    hs | head size         S | cached positions in the gathered window
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ConfigError, ModelConfig
from models.exits import exit_distribution
from models.kv_cache import KVBatch
from models.layers import BlockOut
from models.trunk import ModelOutput, StepView, describe, generate_sequence, run_forward


@dataclass
class OuroConfig(ModelConfig):
    """A `ModelConfig` for Ouro: an ODE-shaped trunk of one shared block (the loop).

    The inherited fields carry what the runtime reads (vocabulary, context,
    step range = loops, width, heads); the fields below are Ouro's own.
    Built from a Hugging Face `config.json` by `models.hf_ouro.config_from_hf`.

    Attributes:
        loop_layers: decoder layers per loop (HF `num_hidden_layers`).
        n_kv_heads: key/value heads (HF `num_key_value_heads`).
        attn_head_dim: head size (HF `head_dim`, default hidden / heads).
        rope_theta: rotary base.
    """

    loop_layers: int = 1
    n_kv_heads: int = 1
    attn_head_dim: int = 0
    rope_theta: float = 10000.0

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.loop_layers, int) or self.loop_layers < 1:
            raise ConfigError("loop_layers", self.loop_layers, "must be an integer >= 1")
        if not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            allowed = f"must be >= 1 and divide n_heads={self.n_heads}"
            raise ConfigError("n_kv_heads", self.n_kv_heads, allowed)
        if not isinstance(self.attn_head_dim, int) or self.attn_head_dim < 0 or self.attn_head_dim % 2:
            allowed = "must be an even integer >= 0 (0 = d_model / n_heads)"
            raise ConfigError("attn_head_dim", self.attn_head_dim, allowed)
        if self.head_dim % 2:
            raise ConfigError("attn_head_dim", self.head_dim, "rotary embeddings need an even head size")
        if not self.rope_theta > 0:
            raise ConfigError("rope_theta", self.rope_theta, "must be a number > 0")

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def kv_heads_per_step(self) -> int:
        """Every layer of a loop caches its kv heads in that loop's pages: L x n_kv_heads."""
        return self.loop_layers * self.n_kv_heads

    @property
    def total_loops(self) -> int:
        return int(self.max_steps)  # type: ignore[arg-type]


def ouro_config(**fields: object) -> OuroConfig:
    """An `OuroConfig` with the trunk fields every Ouro model shares (one shared loop, loops 1..max)."""
    base: dict[str, object] = {
        "trunk": "ode",
        "n_shared_blocks": 1,
        "min_steps": 1,
        "block": "prenorm",
        "norm": "rmsnorm",
        "activation": "silu",
        "ffn": "dense",
        "parameterisation": "sp",
    }
    base.update(fields)
    known = {f.name for f in dataclasses.fields(OuroConfig)}
    unknown = sorted(set(base) - known)
    if unknown:
        raise ConfigError(unknown[0], base[unknown[0]], "unknown OuroConfig field")
    return OuroConfig(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm with the statistics in float32, scaled in the input dtype (x (..., d), weight (d,))."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin for rotate-half RoPE: positions (R, T) -> each (R, 1, T, hs), computed in float32."""
    even = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv = 1.0 / (theta ** (even / head_dim))  # (hs/2,)
    freqs = positions.to(torch.float32)[..., None] * inv  # (R, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (R, 1, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """t (R, heads, T, hs) rotated by position: t cos + rotate_half(t) sin."""
    half = t.shape[-1] // 2
    rotated = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return t * cos + rotated * sin


def threshold_exit(pdf: Tensor, threshold: float) -> Tensor:
    """(..., N) exit distribution -> (...,) int64 exit loop index (0-based): the first loop whose
    cumulative probability reaches `threshold`, else the last."""
    reached = torch.cumsum(pdf, dim=-1) >= threshold
    first = reached.to(torch.int64).argmax(dim=-1)
    return torch.where(reached.any(dim=-1), first, torch.full_like(first, pdf.shape[-1] - 1))


class OuroLayer(nn.Module):
    """One decoder layer: sandwich-normed GQA attention with RoPE, then a sandwich-normed SwiGLU MLP.

    Projections are fused for fewer matmuls: `qkv` = [q_proj; k_proj; v_proj]
    and `gate_up` = [gate_proj; up_proj] (models/hf_ouro.py concatenates the
    checkpoint's matrices into them).
    """

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        d, hs = config.d_model, config.head_dim
        self.nh, self.kv, self.hs = config.n_heads, config.n_kv_heads, hs
        self.d_ff, self.eps = config.d_ff, config.norm_eps
        self.qkv = nn.Linear(d, (self.nh + 2 * self.kv) * hs, bias=False)
        self.o = nn.Linear(self.nh * hs, d, bias=False)
        self.gate_up = nn.Linear(d, 2 * config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, d, bias=False)
        self.attn_in = nn.Parameter(torch.ones(d))  # input_layernorm
        self.attn_out = nn.Parameter(torch.ones(d))  # input_layernorm_2
        self.mlp_in = nn.Parameter(torch.ones(d))  # post_attention_layernorm
        self.mlp_out = nn.Parameter(torch.ones(d))  # post_attention_layernorm_2

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One layer over T new tokens per row.

        Args:
            x: (R, T, d) residual stream.
            cos, sin: (R, 1, T, hs) rotary tables of the new positions.
            past_k, past_v: (R, kv, S, hs) this layer's cached keys and values (S may be 0).
            mask: (R, 1, T, S + T) bool over [past, new] keys.

        Returns:
            x (R, T, d), and the new k, v, each (R, kv, T, hs), to cache.
        """
        R, T, _ = x.shape
        nh, kv, hs = self.nh, self.kv, self.hs
        qkv = self.qkv(rms_norm(x, self.attn_in, self.eps)).view(R, T, nh + 2 * kv, hs).transpose(1, 2)
        q, k, v = qkv.split((nh, kv, kv), dim=1)  # (R, nh | kv | kv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all = torch.cat([past_k, k], dim=2) if past_k.shape[2] else k  # (R, kv, S + T, hs)
        v_all = torch.cat([past_v, v], dim=2) if past_v.shape[2] else v
        a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=kv != nh)
        a = self.o(a.transpose(1, 2).reshape(R, T, nh * hs))
        x = x + rms_norm(a, self.attn_out, self.eps)
        gate, up = self.gate_up(rms_norm(x, self.mlp_in, self.eps)).split(self.d_ff, dim=-1)
        m = self.down(F.silu(gate) * up)
        return x + rms_norm(m, self.mlp_out, self.eps), k, v


class OuroLM(nn.Module):
    """Ouro's causal LM: embedding, L shared decoder layers looped N times, final norm per loop, head.

    `forward` mirrors `LeanLM.forward` (the same batch description,
    models.trunk.describe, and loop, models.trunk.run_forward) with
    `OuroExecutor`; `steps` is the loop count per row.
    """

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(OuroLayer(config) for _ in range(config.loop_layers))
        self.norm = nn.Parameter(torch.ones(d))
        self.exit_gate = nn.Linear(d, 1)
        self.lm_head = None if config.tie_embeddings else nn.Linear(d, config.vocab_size, bias=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def executor(self, record: list[Tensor] | None = None) -> OuroExecutor:
        """This model's executor of the trunk loop (what the torch backend runs)."""
        return OuroExecutor(self, record)

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
        """Run the model (arguments and shapes as `LeanLM.forward`; `steps` = loops per row).

        Returns:
            ModelOutput with logits (B, T, V), or (B, 1, V) with `last_only`.
        """
        fwd = describe(self.config, tokens, positions, steps, kv, experts, last_only, last_index)
        return run_forward(OuroExecutor(self), self.config, fwd)

    def head(self, x: Tensor) -> Tensor:
        """x (B, T, d), already normed by the last loop -> logits (B, T, V)."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return x @ w.t()

    @torch.no_grad()
    def loop_states(self, tokens: Tensor, loops: int | None = None) -> tuple[Tensor, Tensor]:
        """Every loop's normed state and exit-gate logit, without a cache.

        Args:
            tokens: (B, T) whole sequences.
            loops: loops to run (default all, `total_ut_steps`).

        Returns:
            states (N, B, T, d) and gate logits (B, T, N).
        """
        n = self.config.total_loops if loops is None else loops
        record: list[Tensor] = []
        fwd = describe(self.config, tokens, None, n)
        run_forward(OuroExecutor(self, record), self.config, fwd)
        states = torch.stack(record)  # (N, B, T, d)
        gates = self.exit_gate(states).squeeze(-1).permute(1, 2, 0)  # (B, T, N)
        return states, gates

    @torch.no_grad()
    def threshold_logits(self, tokens: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        """The reference's threshold exit: all loops run, each token reads the state of its exit loop.

        Args:
            tokens: (B, T) whole sequences.
            threshold: cumulative exit probability at which a token exits.

        Returns:
            logits (B, T, V) and the 0-based exit loop of each token (B, T) int64.
        """
        states, gates = self.loop_states(tokens)
        exit_at = threshold_exit(exit_distribution(gates), threshold)  # (B, T)
        N, B, T, d = states.shape
        chosen = states.permute(1, 2, 0, 3).gather(2, exit_at[..., None, None].expand(B, T, 1, d))
        return self.head(chosen.squeeze(2)), exit_at

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
        """Single-sequence generation with the paged cache (`LeanLM.generate`'s arguments; the
        reference path for tests and `leanserve generate --local`). `steps` = loops."""
        if experts is not None:
            raise ValueError("experts: this model has a dense MLP and takes no expert setting")
        return generate_sequence(self, self.config, prompt, max_new_tokens, steps, None, temperature, seed)


class OuroExecutor:
    """Runs `OuroLM` in the trunk loop (models/trunk.py): `block` is one loop over the L layers.

    With a cache, a loop gathers its pages once (every layer's past:
    (R, L*kv, S, hs)), each layer attends over [its past heads, its new keys]
    under the forward's `past_mask`, and the loop returns the new keys and
    values of all layers, (R, L*kv, T, hs), which the trunk loop writes in one
    scatter after the last loop (valid: a loop reads only its own pages).

    Args:
        model: the model.
        record: if given, each loop's output state (after the final norm) is
            appended to it (uniform step counts only; `OuroLM.loop_states`).
    """

    stores_kv = False

    def __init__(self, model: OuroLM, record: list[Tensor] | None = None) -> None:
        self.model, self.record = model, record
        self.exit_gate = model.exit_gate  # states (..., d) -> (..., 1) logits (`models.trunk.exit_states`)
        c = model.config
        self.kv, self.hs, self.theta, self.eps = c.n_kv_heads, c.head_dim, c.rope_theta, c.norm_eps

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens (B, T) -> x (B, T, d); positions enter through RoPE in each layer."""
        return F.embedding(tokens, self.model.embed_tokens.weight)

    def head(self, x: Tensor) -> Tensor:
        return self.model.head(x)

    def block(self, k: int, x: Tensor, h: Tensor, view: StepView, setting: Tensor | None) -> BlockOut:
        """One loop: x (R, T, d) -> BlockOut(x after the loop's layers and final norm, new k and v,
        each (R, L*kv, T, hs)); `k`, `h` and `setting` are unused (one loop, no Euler step, dense)."""
        m = self.model
        cos, sin = rope_tables(view.positions, self.hs, self.theta, x.dtype)
        if view.storage is None or view.window is None:
            past_k = past_v = x.new_zeros(x.shape[0], self.kv * len(m.layers), 0, self.hs)
        else:
            past_k, past_v = view.storage.gather(view.window)  # (R, L*kv, S, hs)
        mask = view.past_mask()  # (R, 1, T, S + T)
        ks: list[Tensor] = []
        vs: list[Tensor] = []
        for i, layer in enumerate(m.layers):
            heads = slice(i * self.kv, (i + 1) * self.kv)
            x, k_new, v_new = layer(x, cos, sin, past_k[:, heads], past_v[:, heads], mask)
            ks.append(k_new)
            vs.append(v_new)
        x = rms_norm(x, m.norm, self.eps)
        if self.record is not None:
            self.record.append(x)
        return BlockOut(x, torch.cat(ks, dim=1), torch.cat(vs, dim=1), None, None)
