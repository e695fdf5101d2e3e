"""Analytic cost model (FLOPs and bytes moved) and its wall-clock calibration.

"Time Matters" (Inbar & Sernau) observes that memory traffic, not FLOPs, is
what predicts a transformer's step time. For decoding small models this is
sharper still: one decode iteration reads every weight it touches once for
the whole batch, while its FLOPs grow with the batch, so the two proxies
diverge exactly where a serving runtime makes its choices (steps, experts,
batch). This module counts both analytically from a `ModelConfig` and fits

    seconds = a * bytes + b * flops + c          (a, b >= 0)

to measured decode iterations, so the runtime can turn a latency budget into
a step count (`CostModel.max_steps_within`; the serving runtime's load-aware
predictor, runtime/predictor.py, builds on `CostModel.predict_decode_seconds`).

Three modules: parameter counts (models/cost_params.py), the analytic FLOP
and byte counts and the evaluation of a calibrated `CostModel` (here), and
the calibration that fits one (models/cost_fit.py). Every public name of the
three is importable from here.

Conventions used throughout:

* FLOPs are 2 x multiply-accumulates (MACs). Elementwise work (norms,
  activations, softmax, residual adds, the shaped-attention centring term) is
  O(d) per token against O(d^2) for the matmuls and is not counted.
* Bytes are element counts times `dtype_bytes` (weights, KV cache and
  activations all share one dtype).
* Weights of a block are re-read at every step that runs it: a block is
  re-applied after all the other work of a step, so nothing guarantees it is
  still cached, and counting it per step is what makes the step count a dial.
* Shape legend: B rows in a decode batch, S tokens already cached (context),
  P prompt tokens, d = d_model, F = d_ff, V = vocab_size, E = n_experts,
  D = tree_depth, k = experts used per token, t = tree truncation depth,
  N = steps, H = n_heads.

Pure Python and numpy; never imports runtime, ray or grpc.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from models.config import ModelConfig
from models.cost_params import (
    _attention_params,
    _norm_params,
    _norms_per_block,
    _scalar_params,
    block_param_counts,
    param_counts,
)

# Activation traffic per row per step, in d-sized vectors read or written:
# attention norm in/out (2), q/k/v written (3), attention output (1), and the
# two residual updates read-modify-write (2). A heuristic: the calibration's
# coefficient absorbs its scale, the constant only has to rank costs sensibly.
ACT_D_VECTORS_PER_STEP = 8
# Per up/down matmul pair a token uses: the F-wide hidden is written by the up
# projection and read back by the down projection.
ACT_FF_VECTORS_PER_PAIR = 2
# Attention scores are written and read once more by the softmax (H per key).
ACT_SCORE_PASSES = 2


# ----------------------------------------------------------------------------
# Cost value
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """Work of one piece of computation.

    Attributes:
        flops: floating-point operations (2 x MACs).
        bytes: bytes moved between memory and the compute units.
    """

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, scale: float) -> Cost:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return NotImplemented
        return Cost(self.flops * scale, self.bytes * scale)

    __rmul__ = __mul__


ZERO = Cost(0.0, 0.0)


# ----------------------------------------------------------------------------
# Analytic costs
# ----------------------------------------------------------------------------
def resolve_experts(config: ModelConfig, experts: int | None) -> int | None:
    """Validate an expert setting: top-k for MoE, truncation depth for the tree.

    Args:
        config: the model configuration.
        experts: `None` for the config's maximum; ignored (returns None) for dense.

    Returns:
        The effective setting, or None for a dense FFN.
    """
    if config.ffn == "dense":
        return None
    low, high = (1, config.experts_top_k) if config.ffn == "moe" else (0, config.tree_depth)
    if experts is None:
        return high
    if isinstance(experts, bool) or not isinstance(experts, int) or not low <= experts <= high:
        name = "experts_top_k" if config.ffn == "moe" else "expert_depth"
        raise ValueError(f"invalid experts={experts!r} ({name}): must be an integer in [{low}, {high}]")
    return experts


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"invalid {name}={value!r}: must be an integer >= {low}")


def _pairs_per_token(config: ModelConfig, experts: int | None) -> int:
    """Up/down matmul pairs (each d x F) one token runs in one FFN."""
    if config.ffn == "dense":
        return 1
    if config.ffn == "moe":
        return int(experts)  # type: ignore[arg-type]
    return int(experts) + 1  # one node per level 0..t


def _ffn_weights_touched(config: ModelConfig, experts: int | None, tokens: int) -> float:
    """Expected FFN weight elements read when `tokens` tokens pass one FFN.

    Routing is assumed uniform and independent across tokens. MoE: each
    expert is missed by one token with probability (1 - k/E), so the
    expected number of distinct experts is E * (1 - (1 - k/E)**tokens).
    Tree: level l has 2**l nodes and a token picks one, so the expected
    distinct nodes at level l is 2**l * (1 - (1 - 2**-l)**tokens).
    """
    d, f = config.d_model, config.d_ff
    if config.ffn == "dense":
        return 2.0 * d * f
    if config.ffn == "moe":
        e, k = config.n_experts, int(experts)  # type: ignore[arg-type]
        distinct = e * (1.0 - (1.0 - k / e) ** tokens)
        return d * e + distinct * 2.0 * d * f
    # Tree: the full gating projection is one matmul whatever the truncation.
    depth = int(experts)  # type: ignore[arg-type]
    distinct = sum(2.0**level * (1.0 - (1.0 - 2.0**-level) ** tokens) for level in range(depth + 1))
    return d * config.tree_depth + distinct * 2.0 * d * f


def _ffn_flops_per_token(config: ModelConfig, experts: int | None) -> float:
    d, f = config.d_model, config.d_ff
    pairs = _pairs_per_token(config, experts)
    gate = {"dense": 0, "moe": d * config.n_experts, "tree": d * config.tree_depth}[config.ffn]
    return 2.0 * (gate + pairs * 2 * d * f)


def _steps_on_first_block(config: ModelConfig, steps: int) -> int:
    # Step i of N runs block floor(i * n_blocks / N); block 0 runs i < N / n_blocks.
    return -(-steps // config.n_blocks) if steps else 0


def _trunk_cost(
    config: ModelConfig,
    steps: int,
    experts: int | None,
    dtype_bytes: int,
    tokens: int,
    key_sum: float,
    kv_read_tokens: float,
) -> Cost:
    """Cost of `steps` block applications over `tokens` tokens sharing one weight read.

    Args:
        tokens: tokens processed together (decode rows, or prompt tokens).
        key_sum: keys attended summed over the tokens (attention is linear in it).
        kv_read_tokens: cached tokens whose K and V are read, summed over rows.
    """
    d = config.d_model
    first_steps = _steps_on_first_block(config, steps)
    # Weights read per step; only SAS block 0 differs (its extra value matrix).
    attn_first, attn_rest = _attention_params(config, 0), _attention_params(config, 1)
    per_step_other = (
        _norms_per_block(config) * _norm_params(config.norm, d)
        + _scalar_params(config)
        + _ffn_weights_touched(config, experts, tokens)
    )
    weight_elems = first_steps * attn_first + (steps - first_steps) * attn_rest + steps * per_step_other
    # Projections are matmuls per token; block 0 of SAS has its value matmul too.
    proj_macs = first_steps * attn_first + (steps - first_steps) * attn_rest
    flops = (
        tokens * 2.0 * proj_macs
        + steps * 4.0 * d * key_sum  # QK^T and AV: d MACs per key each
        + steps * tokens * _ffn_flops_per_token(config, experts)
    )
    pairs = _pairs_per_token(config, experts)
    act_elems = steps * (
        tokens * (ACT_D_VECTORS_PER_STEP * d + ACT_FF_VECTORS_PER_PAIR * pairs * config.d_ff)
        + ACT_SCORE_PASSES * config.n_heads * key_sum
    )
    # K and V (for SAS the "V" is the normalised input, the same size): read
    # the cache, write one entry per new token, every step.
    kv_elems = steps * (2.0 * d * kv_read_tokens + 2.0 * d * tokens)
    return Cost(flops=flops, bytes=dtype_bytes * (weight_elems + act_elems + kv_elems))


def _edge_cost(config: ModelConfig, dtype_bytes: int, gathered: int, logit_rows: int) -> Cost:
    """Embedding gather, final norm and output head.

    The head matrix (V x d) is read once per forward whether tied or not; the
    gather reads a token and a position row (2d) per gathered token.
    """
    d, v = config.d_model, config.vocab_size
    final_norm = _norm_params(config.norm if config.norm != "none" else "rmsnorm", d)
    elems = v * d + final_norm + gathered * 2 * d + logit_rows * v  # logits written
    return Cost(flops=2.0 * v * d * logit_rows, bytes=float(dtype_bytes * elems))


def _decode_cost(
    config: ModelConfig, steps: int, batch: int, context: float, experts: int | None, dtype_bytes: int
) -> Cost:
    # Each row's new token attends to its S cached keys and to itself.
    trunk = _trunk_cost(
        config,
        steps,
        experts,
        dtype_bytes,
        tokens=batch,
        key_sum=batch * (context + 1),
        kv_read_tokens=batch * context,
    )
    return trunk + _edge_cost(config, dtype_bytes, gathered=batch, logit_rows=batch)


def decode_cost(
    config: ModelConfig,
    steps: int,
    batch: int,
    context: int,
    experts: int | None = None,
    dtype_bytes: int = 4,
) -> Cost:
    """Cost of ONE decode iteration: `batch` rows each generate one token.

    All rows run `steps` steps at the same context length. Weights are read
    once per step for the whole batch (MoE / tree: only the expected distinct
    experts / nodes touched by the batch, see `_ffn_weights_touched`); per
    row and step the KV cache is read (2 * S * d) and extended (2 * d), and
    `ACT_*` activations are moved. The head (V x d) is read once and costs
    2 * V * d FLOPs per row; the gather moves 2 * d per row.

    Args:
        config: the model configuration.
        steps: trunk steps N (0 = embedding and head only, useful to isolate
            the per-step part; not validated against the config's step range).
        batch: rows B >= 1.
        context: tokens S already cached per row; the new token sits at
            position S, so S < context_length.
        experts: top-k (MoE) or truncation depth (tree); None = the maximum.
        dtype_bytes: bytes per element.

    Returns:
        FLOPs and bytes of the iteration.
    """
    _check_int("steps", steps, 0)
    _check_int("batch", batch, 1)
    _check_int("context", context, 0)
    if context >= config.context_length:
        raise ValueError(f"invalid context={context}: must be < context_length={config.context_length}")
    return _decode_cost(config, steps, batch, context, resolve_experts(config, experts), dtype_bytes)


def prefill_cost(
    config: ModelConfig,
    steps: int,
    prompt_tokens: int,
    experts: int | None = None,
    dtype_bytes: int = 4,
    past: int = 0,
) -> Cost:
    """Cost of prefilling one request's prompt in one forward.

    Causal attention: prompt token j attends to `past + j + 1` keys. Weights
    are read once per step for all prompt tokens; the attention kernel reads
    the K and V of past and prompt tokens once (flash-style streaming) and
    writes the prompt's. Logits are computed for the last position only,
    since serving needs just the next token.

    Args:
        config: the model configuration.
        steps: trunk steps N (>= 0).
        prompt_tokens: P >= 1 tokens to prefill.
        experts: top-k (MoE) or truncation depth (tree); None = the maximum.
        dtype_bytes: bytes per element.
        past: tokens already cached before this chunk (chunked prefill).

    Returns:
        FLOPs and bytes of the prefill forward.
    """
    _check_int("steps", steps, 0)
    _check_int("prompt_tokens", prompt_tokens, 1)
    _check_int("past", past, 0)
    if past + prompt_tokens > config.context_length:
        raise ValueError(
            f"invalid prompt_tokens={prompt_tokens}: past + prompt_tokens must be <= "
            f"context_length={config.context_length} (past={past})"
        )
    experts = resolve_experts(config, experts)
    p = prompt_tokens
    key_sum = p * past + p * (p + 1) / 2
    trunk = _trunk_cost(
        config, steps, experts, dtype_bytes, tokens=p, key_sum=key_sum, kv_read_tokens=past + p
    )
    return trunk + _edge_cost(config, dtype_bytes, gathered=p, logit_rows=1)


def _decode_run_cost(
    config: ModelConfig,
    steps: int,
    batch: int,
    first_context: int,
    iterations: int,
    experts: int | None,
    dtype_bytes: int,
) -> Cost:
    """Sum of `iterations` decode iterations at contexts first_context, first_context + 1, ...

    Every term of a decode iteration is affine in the context, so the sum is
    `iterations` times the cost at the mean context (exact, no loop).
    """
    if iterations <= 0:
        return ZERO
    last = first_context + iterations - 1
    if last >= config.context_length:
        raise ValueError(
            f"generation reaches context {last + 1}, beyond context_length={config.context_length}"
        )
    mean_context = first_context + (iterations - 1) / 2
    return _decode_cost(config, steps, batch, mean_context, experts, dtype_bytes) * iterations


def remaining_cost(
    config: ModelConfig,
    steps: int,
    context: int,
    prompt_tokens: int,
    new_tokens: int,
    batch: int = 1,
    experts: int | None = None,
    dtype_bytes: int = 4,
) -> Cost:
    """Cost of the rest of a request's work, as the request's latency sees it.

    With `prompt_tokens > 0`: prefill them on top of `context` cached tokens
    (which yields the first new token), then `new_tokens - 1` decode
    iterations. With `prompt_tokens == 0`: `new_tokens` decode iterations
    starting at `context` cached tokens. Each decode iteration is the whole
    `batch`-row iteration the request shares (it waits for all of it).

    Args:
        config: the model configuration.
        steps: trunk steps N.
        context: tokens already in the request's KV cache.
        prompt_tokens: tokens still to prefill (0 = none).
        new_tokens: tokens still to generate (>= 0).
        batch: rows in each decode iteration.
        experts: top-k (MoE) or truncation depth (tree); None = the maximum.
        dtype_bytes: bytes per element.

    Returns:
        Summed FLOPs and bytes.
    """
    _check_int("steps", steps, 0)
    _check_int("context", context, 0)
    _check_int("prompt_tokens", prompt_tokens, 0)
    _check_int("new_tokens", new_tokens, 0)
    _check_int("batch", batch, 1)
    experts = resolve_experts(config, experts)
    total = ZERO
    decodes, start = new_tokens, context
    if prompt_tokens:
        total = prefill_cost(config, steps, prompt_tokens, experts, dtype_bytes, past=context)
        decodes, start = max(new_tokens - 1, 0), context + prompt_tokens
    return total + _decode_run_cost(config, steps, batch, start, decodes, experts, dtype_bytes)


def request_cost(
    config: ModelConfig,
    steps: int,
    prompt_tokens: int,
    new_tokens: int,
    batch: int = 1,
    experts: int | None = None,
    dtype_bytes: int = 4,
) -> Cost:
    """Cost of a whole request: prefill, then decode iterations over growing context.

    The prefill produces the first new token; the remaining `new_tokens - 1`
    tokens each take one decode iteration of `batch` rows at contexts
    P, P + 1, ..., P + new_tokens - 2. This is the work on the request's
    critical path (its latency), not its share of the batch.

    Args:
        config: the model configuration.
        steps: trunk steps N.
        prompt_tokens: P >= 1.
        new_tokens: tokens to generate (>= 0).
        batch: rows in each decode iteration.
        experts: top-k (MoE) or truncation depth (tree); None = the maximum.
        dtype_bytes: bytes per element.

    Returns:
        Summed FLOPs and bytes.
    """
    _check_int("prompt_tokens", prompt_tokens, 1)
    return remaining_cost(config, steps, 0, prompt_tokens, new_tokens, batch, experts, dtype_bytes)


# ----------------------------------------------------------------------------
# Evaluation of the calibrated model
# ----------------------------------------------------------------------------
@dataclass
class CostModel:
    """Fitted decode time model: seconds = a_bytes * bytes + b_flops * flops + c.

    Attributes:
        a_bytes: seconds per byte moved (>= 0).
        b_flops: seconds per FLOP (>= 0).
        c: fixed seconds per decode iteration (launch and framework overhead).
        r2_bytes: R^2 of the bytes-only fit (a * bytes + c).
        r2_flops: R^2 of the FLOPs-only fit (b * flops + c).
        r2_both: R^2 of the fit actually used (both features).
        n_samples: samples fitted.
        config_name: `ModelConfig.name` the samples were measured on.
        dtype_bytes: element size the costs were computed with.
    """

    a_bytes: float
    b_flops: float
    c: float
    r2_bytes: float
    r2_flops: float
    r2_both: float
    n_samples: int
    config_name: str
    dtype_bytes: int = 4

    def seconds(self, cost: Cost) -> float:
        """Predicted seconds for an analytic cost (never negative)."""
        return max(0.0, self.a_bytes * cost.bytes + self.b_flops * cost.flops + self.c)

    def predict_decode_seconds(
        self, config: ModelConfig, steps: int, batch: int, context: int, experts: int | None = None
    ) -> float:
        """Predicted seconds of one decode iteration (see `decode_cost`)."""
        return self.seconds(decode_cost(config, steps, batch, context, experts, self.dtype_bytes))

    def predict_remaining_seconds(
        self,
        config: ModelConfig,
        steps: int,
        context: int,
        prompt_tokens: int,
        new_tokens: int,
        batch: int = 1,
        experts: int | None = None,
    ) -> float:
        """Predicted seconds of a request's remaining work (see `remaining_cost`).

        The intercept `c` is paid once per forward (the prefill and each
        decode iteration), so it is added per forward, not once.
        """
        cost = remaining_cost(
            config, steps, context, prompt_tokens, new_tokens, batch, experts, self.dtype_bytes
        )
        forwards = (1 if prompt_tokens else 0) + (max(new_tokens - 1, 0) if prompt_tokens else new_tokens)
        return max(0.0, self.a_bytes * cost.bytes + self.b_flops * cost.flops + self.c * forwards)

    def predict_request_seconds(
        self,
        config: ModelConfig,
        steps: int,
        prompt_tokens: int,
        new_tokens: int,
        batch: int = 1,
        experts: int | None = None,
    ) -> float:
        """Predicted latency of a whole request (see `request_cost`), in seconds.

        Prefill is extrapolated from decode calibration (same per-byte and
        per-FLOP rates), which is an approximation: prefill is more
        compute-bound than anything the decode grid measures.
        """
        _check_int("prompt_tokens", prompt_tokens, 1)
        return self.predict_remaining_seconds(config, steps, 0, prompt_tokens, new_tokens, batch, experts)

    def max_steps_within(
        self,
        config: ModelConfig,
        budget_s: float,
        batch: int,
        context: int,
        new_tokens: int,
        prompt_tokens: int,
        experts: int | None = None,
        step_range: tuple[int, int] | None = None,
    ) -> int | None:
        """Largest step count whose predicted remaining time fits `budget_s`.

        The work is `remaining_cost(config, N, context, prompt_tokens,
        new_tokens, batch, experts)`: for a fresh request pass context=0 and
        the prompt length; for a running one pass its cached length and 0.
        Predicted time is non-decreasing in N (a, b >= 0), so the answer is
        non-decreasing in the budget.

        Args:
            config: the model configuration.
            budget_s: latency budget in seconds.
            batch: rows per decode iteration.
            context: tokens already cached for the request.
            new_tokens: tokens still to generate.
            prompt_tokens: tokens still to prefill.
            experts: top-k / truncation depth; None = the maximum.
            step_range: inclusive (min, max) steps; default `config.step_range`.

        Returns:
            The largest fitting N, or None if even the minimum does not fit.
        """
        low, high = step_range if step_range is not None else config.step_range
        if not 0 <= low <= high:
            raise ValueError(f"invalid step_range={step_range!r}: need 0 <= min <= max")
        for steps in range(high, low - 1, -1):
            t = self.predict_remaining_seconds(
                config, steps, context, prompt_tokens, new_tokens, batch, experts
            )
            if t <= budget_s:
                return steps
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (floats, ints, str)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        """Inverse of `to_dict`; raises ValueError naming missing or unknown keys."""
        if not isinstance(data, dict):
            raise ValueError(f"cost model must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown cost model key {unknown[0]!r}; known: {', '.join(fields)}")
        missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"cost model is missing key {missing[0]!r}")
        return cls(**data)


# The calibration (fitting) lives in models/cost_fit.py, which imports this module; its names
# are still importable from here (`from models.cost import fit_cost_model`), resolved on first use.
_FIT_NAMES = frozenset({"CostSample", "design_grid", "fit_cost_model"})


def __getattr__(name: str) -> Any:
    if name in _FIT_NAMES:
        from models import cost_fit

        return getattr(cost_fit, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACT_D_VECTORS_PER_STEP",
    "ACT_FF_VECTORS_PER_PAIR",
    "ACT_SCORE_PASSES",
    "Cost",
    "CostModel",
    "block_param_counts",
    "decode_cost",
    "param_counts",
    "prefill_cost",
    "remaining_cost",
    "request_cost",
    "resolve_experts",
]
