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
b, which the runtime guarantees (prefill: the prompt; decode: T = 1).

Shape legend:
    B | rows           T | new tokens per row     d | model width
    V | vocabulary     N | steps per row          R | rows active in a step
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig
from models.kv_cache import KVBatch, KVCacheError
from models.layers import Block, BlockOut, KVWrite, attention_mask, build_norm, window_mask
from models.parameterisation import init_weights


@dataclass
class ModelOutput:
    """Result of one forward call.

    Attributes:
        logits: (B, T, V), or (B, 1, V) with `last_only=True`; already scaled
            by the output multiplier 1/m_N (training and inference alike).
        aux_loss: scalar load-balancing loss summed over steps (MoE, training),
            else None.
        expert_counts: (n_expert_slots,) tokens routed to each expert or tree
            node, summed over steps and blocks; None for a dense FFN.
    """

    logits: Tensor
    aux_loss: Tensor | None = None
    expert_counts: Tensor | None = None


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
        steps: Tensor | int | None = None,
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
        c = self.config
        positions, steps = prepare_inputs(c, tokens, positions, steps, experts, kv)
        x = self.embed(tokens, positions)  # (B, T, d)
        x, aux_total, counts_total = run_trunk(
            c, x, positions, steps, kv, experts, lambda k, *args: self.blocks[k](*args), writes_kv=True
        )
        if last_only:
            x = select_last(x, last_index)  # (B, 1, d)
        logits = self.logits(x)
        if aux_total is not None:
            aux_total = aux_total / int(steps.max())
        return ModelOutput(logits, aux_total, counts_total)

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
        from models.kv_cache import PagedKVCache

        c = self.config
        if not prompt:
            raise ValueError("prompt: must contain at least one token")
        total = len(prompt) + max_new_tokens
        if total > c.context_length:
            raise ValueError(
                f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) = {total}: "
                f"must be <= context_length={c.context_length}"
            )
        n = steps if steps is not None else int(c.default_steps)
        device = self.wte.weight.device
        cache = PagedKVCache(c, num_pages=n * (-(-total // 16)), page_size=16, device=device)
        cache.reserve(0, n, total)
        kv = cache.batch([0])
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        setting = None if experts is None else torch.tensor([experts], device=device)
        ids = torch.tensor([prompt], device=device)
        pos = torch.arange(len(prompt), device=device)[None]
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = self(ids, pos, n, kv=kv, experts=setting, last_only=True).logits[0, -1]
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            out.append(nxt)
            ids = torch.tensor([[nxt]], device=device)
            pos = pos[:, -1:] + 1
        return out


# --- shared by every executor of the trunk (LeanLM here, the ONNX backend in runtime/) ---------------


def _bounds(t: Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor, in one reduction."""
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


def check_inputs(
    config: ModelConfig, tokens: Tensor, positions: Tensor, steps: Tensor, setting: Tensor | None
) -> None:
    """Raise ValueError naming the argument that is out of the model's range."""
    c = config
    lo, hi = c.step_range
    if steps.numel():
        s_min, s_max = _bounds(steps)
        if s_min < lo or s_max > hi:
            bad = s_min if s_min < lo else s_max
            raise ValueError(f"steps={bad}: must lie in [{lo}, {hi}] for this model")
    if positions.numel():
        p_min, p_max = _bounds(positions)
        if p_min < 0 or p_max >= c.context_length:
            raise ValueError(
                f"positions up to {p_max}: must lie in [0, {c.context_length - 1}] "
                f"(context_length={c.context_length})"
            )
    t_min, t_max = _bounds(tokens)
    if t_min < 0 or t_max >= c.vocab_size:
        raise ValueError(f"tokens: ids must lie in [0, {c.vocab_size - 1}]")
    if setting is not None:
        if c.ffn == "dense":
            raise ValueError("experts: this model has a dense FFN and takes no expert setting")
        name, lo_e, hi_e = (
            ("experts_top_k", 1, c.experts_top_k) if c.ffn == "moe" else ("expert_depth", 0, c.tree_depth)
        )
        e_min, e_max = _bounds(setting)
        if e_min < lo_e or e_max > hi_e:
            raise ValueError(f"{name}: must lie in [{lo_e}, {hi_e}] for this model")


def check_cache(kv: KVBatch, positions: Tensor, steps: Tensor) -> None:
    """Raise KVCacheError on a row mismatch, a changed step count or an overflow.

    Runs every forward, so the common (valid) case costs two tensor ops; the
    rest is Python over the rows.
    """
    if kv.block_tables.shape[0] != positions.shape[0]:
        raise KVCacheError(f"cache has {kv.block_tables.shape[0]} rows, the batch has {positions.shape[0]}")
    if not torch.equal(kv.cached_steps, steps):
        b = int((kv.cached_steps != steps).nonzero()[0, 0])
        raise KVCacheError(
            f"row {b}: its cache was built with {int(kv.cached_steps[b])} steps, "
            f"this call asks for {int(steps[b])}; a sequence keeps its step count"
        )
    # Every new position must fall inside the row's reserved pages.
    page_size = kv.pool.page_size
    capacity = kv.capacity
    if capacity is None:
        capacity = ((kv.block_tables[:, 0, :] >= 0).sum(1) * page_size).tolist()
    width = kv.block_tables.shape[2] * page_size  # tokens the table can address
    for b, (last, cap) in enumerate(zip(positions[:, -1].tolist(), capacity)):
        if last >= min(cap, width):
            raise KVCacheError(
                f"row {b}: position {last} overflows its reservation of {min(cap, width)} tokens"
            )


def prepare_inputs(
    config: ModelConfig,
    tokens: Tensor,
    positions: Tensor | None,
    steps: Tensor | int | None,
    experts: Tensor | None,
    kv: KVBatch | None,
) -> tuple[Tensor, Tensor]:
    """Default and validate positions (B, T) and steps (B,); check the cache view."""
    B, T = tokens.shape
    if positions is None:
        positions = torch.arange(T, device=tokens.device).expand(B, T)
    if steps is None:
        steps = config.default_steps
    if isinstance(steps, int):
        steps = torch.full((B,), steps, dtype=torch.long, device=tokens.device)
    check_inputs(config, tokens, positions, steps, experts)
    if kv is not None:
        check_cache(kv, positions, steps)
    return positions, steps


def select_last(x: Tensor, last_index: Tensor | None) -> Tensor:
    """(B, T, d) -> (B, 1, d): position `last_index[b]` of each row, or the last one."""
    if last_index is None:
        return x[:, -1:]
    B, T, d = x.shape
    if last_index.shape != (B,) or int(last_index.min()) < 0 or int(last_index.max()) >= T:
        raise ValueError(f"last_index: must be (B,) = ({B},) indices in [0, {T - 1}]")
    return x.gather(1, last_index.view(B, 1, 1).expand(B, 1, d))


BlockFn = Callable[..., BlockOut]
"""`block_fn(k, x, h, past_k, past_v, mask, setting[, kv_write]) -> BlockOut`."""


def run_trunk(
    config: ModelConfig,
    x: Tensor,
    positions: Tensor,
    steps: Tensor,
    kv: KVBatch | None,
    experts: Tensor | None,
    block_fn: BlockFn,
    writes_kv: bool = False,
    reads_pool: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Integrate the trunk: N_b Euler steps per row, paged KV in and out.

    Iteration i runs only the rows whose step count exceeds i, grouped by the
    block they use at that step (partial sharing), each with its own h. The
    executor of one block application is `block_fn(k, x, h, past_k, past_v,
    mask, setting) -> BlockOut`: a torch module here, an ONNX Runtime session
    in runtime/backends/onnx_backend.py, so both run the same loop.

    Three ways through the cache:
      * dense past (ONNX graphs): gather the cached prefix, the block
        concatenates its new keys and values and returns them, the loop
        scatters them into the pages;
      * `writes_kv=True` (eager torch): `block_fn` also takes a `KVWrite`
        hook that scatters the new keys and values first and gathers the
        window holding past and new tokens once, so the past is copied once
        per block instead of twice (gather + concatenate);
      * `reads_pool=True` (compiled decode, runtime/backends/aot_decode.py):
        `block_fn(k, x, h, window, positions, setting)` gets the row's past
        pages `window` (R, P) and its positions (R, T) instead of a dense
        past and a mask, reads the pool itself (page lookups, mask and block
        fused in one compiled graph) and returns the new keys and values,
        which the loop scatters into the pages.

    Args:
        x: (B, T, d) embedded tokens; positions: (B, T); steps: (B,).
        kv: paged cache view or None; experts: (B,) setting per row or None.
        writes_kv: `block_fn` accepts the `kv_write` hook (see above).
        reads_pool: `block_fn` reads the pool itself (see above); needs `kv`.

    Returns:
        x (B, T, d) after the trunk, the summed aux loss and expert counts.
    """
    c = config
    B, T = positions.shape
    device = x.device
    # Loop bounds and grouping come from one host copy of the step counts
    # (one sync instead of one per reduction).
    step_list = steps.tolist()
    n_iter = max(step_list)
    uniform_steps = min(step_list) == n_iter
    h_all = _step_sizes(c.horizon, steps, n_iter if uniform_steps else None, x.dtype)  # (B, 1, 1)
    if reads_pool and kv is None:
        raise ValueError("reads_pool: needs a KV cache view")
    fused = kv is not None and writes_kv and not reads_pool
    page_size = kv.pool.page_size if kv is not None else 0
    if kv is not None:
        tables = kv.block_tables  # (B, N_max, P_max)
        # Flat slots of the new tokens at every step, in one gather: (N_max, B, T).
        # Entries for steps a row does not run (page -1) are never read.
        pages = tables.gather(2, (positions // page_size)[:, None, :].expand(B, tables.shape[1], T))
        slots_all = (pages * page_size + (positions % page_size)[:, None, :]).transpose(0, 1)
    if fused:
        # The window: pages covering the furthest new token of any row.
        P = -(-(int(positions[:, -1].max()) + 1) // page_size)
        mask_all = window_mask(positions, P * page_size)  # (B, 1, T, S')
        no_past = x.new_empty(0)
    else:
        past_len = positions[:, 0] if kv is not None else torch.zeros(B, dtype=torch.long, device=device)
        P = -(-int(past_len.max()) // page_size) if kv is not None else 0  # pages covering the longest past
        # The pool-reading executor builds its mask from the positions itself.
        mask_all = None if reads_pool else attention_mask(past_len, P * page_size, T)  # (B, 1, T, S+T)
    if kv is not None:
        windows = tables[:, :, :P].transpose(0, 1).contiguous()  # (N_max, B, P) pages each step reads
    pending: list[tuple[Tensor, Tensor, Tensor]] = []  # reads_pool: (slots, k, v) scattered at the end

    aux_total: Tensor | None = None
    counts_total: Tensor | None = None
    for i in range(n_iter):
        if uniform_steps:
            # Every row runs this step with the same block: no indexing, no host sync.
            groups: list[int] = [(i * c.n_blocks) // n_iter]
        else:
            blk_idx = (i * c.n_blocks) // steps  # (B,) block of step i per row
            groups = blk_idx.unique().tolist() if c.n_blocks > 1 else [0]
        for k in groups:
            rows = None
            if not uniform_steps:
                sel = (steps > i) & (blk_idx == k)
                if not bool(sel.any()):
                    continue
                rows = None if bool(sel.all()) else sel.nonzero().squeeze(1)  # (R,)
            xr = x if rows is None else x[rows]
            hr = h_all if rows is None else h_all[rows]
            mr = mask_all if (mask_all is None or rows is None) else mask_all[rows]
            sr = experts if (experts is None or rows is None) else experts[rows]
            if kv is None:
                empty = xr.new_zeros(xr.shape[0], c.n_heads, 0, c.head_dim)
                out = block_fn(k, xr, hr, empty, empty, mr, sr)
            else:
                slots = slots_all[i] if rows is None else slots_all[i, rows]  # (R, T) flat slots
                window = windows[i] if rows is None else windows[i, rows]  # (R, P) pages the block reads
                if fused:
                    out = block_fn(k, xr, hr, no_past, no_past, mr, sr, _kv_hook(kv, window, slots))
                elif reads_pool:
                    pr = positions if rows is None else positions[rows]
                    out = block_fn(k, xr, hr, window, pr, sr)
                    # Step i reads only its own pages, which hold the past: every
                    # step's new keys and values can go into the pool in one write.
                    pending.append((slots, out.k, out.v))
                else:
                    past_k, past_v = kv.pool.gather(window)  # (R, nh, S', hs)
                    out = block_fn(k, xr, hr, past_k, past_v, mr, sr)
                    kv.pool.scatter(slots, out.k, out.v)
            x = out.x if rows is None else x.index_copy(0, rows, out.x)
            if out.aux_loss is not None:
                aux_total = out.aux_loss if aux_total is None else aux_total + out.aux_loss
            if out.counts is not None:
                counts_total = out.counts if counts_total is None else counts_total + out.counts
    if pending:
        assert kv is not None
        if len(pending) == 1:
            kv.pool.scatter(*pending[0])
        else:
            kv.pool.scatter(*(torch.cat(parts) for parts in zip(*pending)))
    return x, aux_total, counts_total


@functools.lru_cache(maxsize=256)
def _uniform_step_sizes(horizon: float, n: int, B: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(B, 1, 1) contiguous Euler steps `horizon / n`, computed as for a (B,) steps tensor.

    A constant shared by every call with this shape, so it is made outside
    inference mode (usable under autograd too) and never written to.
    Contiguous because compiled executors read it with dense strides.
    """
    with torch.inference_mode(False), torch.no_grad():
        return horizon / torch.full((B,), n, device=device).to(dtype).view(B, 1, 1)


def _step_sizes(horizon: float, steps: Tensor, uniform: int | None, dtype: torch.dtype) -> Tensor:
    """(B, 1, 1) Euler step per row; `uniform` = the step count when every row shares it.

    Both branches compute `horizon / N` the same way (bit-identical h), so a
    row's result does not depend on whether its batch is uniform.
    """
    B = steps.shape[0]
    if uniform is not None:
        return _uniform_step_sizes(horizon, uniform, B, dtype, steps.device)
    return (horizon / steps.to(dtype)).view(B, 1, 1)


def _kv_hook(kv: KVBatch, window_pages: Tensor, slots: Tensor) -> KVWrite:
    """A `KVWrite` that stores new keys/values at `slots` (R, T) and gathers `window_pages` (R, P)."""

    def write(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        kv.pool.scatter(slots, k, v)
        return kv.pool.gather(window_pages)

    return write
