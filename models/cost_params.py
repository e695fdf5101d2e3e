"""Exact analytic parameter counts of a `ModelConfig`, by component.

Split out of models/cost.py (which re-exports `param_counts` and
`block_param_counts`): the analytic FLOP and byte counts there read the same
per-component weight counts defined here. Pure Python; never imports
runtime, ray or grpc.
"""

from __future__ import annotations

from models.config import ModelConfig


def _norm_params(kind: str, d: int) -> int:
    """Weights of one norm layer: layernorm weight+bias, rmsnorm weight, none nothing."""
    return {"layernorm": 2 * d, "rmsnorm": d, "none": 0}[kind]


def _attention_params(config: ModelConfig, index: int) -> int:
    d = config.d_model
    if config.block in ("prenorm", "parallel"):
        return 4 * d * d  # W_Q, W_K, W_V, W_O
    # SAS / SAS-P: values and projection are identity; only the first block
    # keeps a trainable value matrix (He & Hofmann, App. C).
    return 2 * d * d + (d * d if index == 0 else 0)


def _norms_per_block(config: ModelConfig) -> int:
    # Sequential blocks normalise the attention and the FFN inputs separately;
    # parallel blocks feed one normalised input to both branches.
    return 2 if config.block in ("prenorm", "sas") else 1


def _scalar_params(config: ModelConfig) -> int:
    if config.block in ("sas", "sasp"):
        # Per-head shaped-attention alpha, beta, gamma, plus the block gains beta_SA, beta_FF.
        return 3 * config.n_heads + 2
    return 0


def _ffn_params(config: ModelConfig) -> int:
    d, f = config.d_model, config.d_ff
    if config.ffn == "dense":
        return 2 * d * f
    if config.ffn == "moe":
        return d * config.n_experts + config.n_experts * 2 * d * f
    depth = config.tree_depth
    return d * depth + (2 ** (depth + 1) - 1) * 2 * d * f


def block_param_counts(config: ModelConfig, index: int) -> dict[str, int]:
    """Parameter counts of distinct block `index` (0-based), by component.

    See `param_counts` for the assumptions.

    Args:
        config: the model configuration.
        index: block index in `[0, config.n_blocks)`.

    Returns:
        `{"attention", "ffn", "norm", "scalars", "total"}` (parameter counts).
    """
    if not 0 <= index < config.n_blocks:
        raise ValueError(f"block index={index} must lie in [0, n_blocks={config.n_blocks})")
    counts = {
        "attention": _attention_params(config, index),
        "ffn": _ffn_params(config),
        "norm": _norms_per_block(config) * _norm_params(config.norm, config.d_model),
        "scalars": _scalar_params(config),
    }
    counts["total"] = sum(counts.values())
    return counts


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Exact analytic parameter counts, per component.

    Assumptions the model must match (d = d_model, F = d_ff, V = vocab_size):

    * No linear layer anywhere has a bias (projections, FFN, MoE router,
      tree gating, output head).
    * Norms: "layernorm" = weight + bias (2d), "rmsnorm" = weight (d),
      "none" = no weights. "prenorm" and "sas" blocks have two norms
      (attention input, FFN input); "parallel" and "sasp" blocks have one,
      shared by both branches.
    * Attention: "prenorm"/"parallel" have Q, K, V, O (4d^2). "sas"/"sasp"
      have Q, K (2d^2); block 0 also has a value matrix (+d^2, the delta
      weight; any fixed identity part is a buffer, not a parameter).
    * Scalars: "sas"/"sasp" blocks have per-head alpha, beta, gamma
      (3 * n_heads) plus the gains beta_SA and beta_FF (2); other blocks none.
    * FFN: "dense" up d x F and down F x d (2dF); "moe" router d x E plus E
      experts of 2dF; "tree" gating d x D plus 2**(D+1)-1 nodes of 2dF.
    * Embedding V x d; learned positions context_length x d; a separate
      head V x d only when `tie_embeddings` is false (else 0).
    * Final norm always exists: the block norm kind, or rmsnorm (d) when
      `norm == "none"`.

    Args:
        config: the model configuration.

    Returns:
        Counts (parameters, not bytes) under the keys "embedding",
        "positions", "head", "final_norm", "attention", "ffn", "norm",
        "scalars" (these four summed over the `n_blocks` distinct blocks),
        "block_first" (block 0), "block_rest" (each other block; 0 if there
        is only one), "trunk" (all blocks) and "total".
    """
    d = config.d_model
    blocks = [block_param_counts(config, i) for i in range(config.n_blocks)]
    counts = {
        "embedding": config.vocab_size * d,
        "positions": config.context_length * d,
        "head": 0 if config.tie_embeddings else config.vocab_size * d,
        "final_norm": _norm_params(config.norm if config.norm != "none" else "rmsnorm", d),
    }
    for key in ("attention", "ffn", "norm", "scalars"):
        counts[key] = sum(b[key] for b in blocks)
    counts["block_first"] = blocks[0]["total"]
    counts["block_rest"] = blocks[1]["total"] if len(blocks) > 1 else 0
    counts["trunk"] = sum(b["total"] for b in blocks)
    counts["total"] = (
        counts["embedding"] + counts["positions"] + counts["head"] + counts["final_norm"] + counts["trunk"]
    )
    return counts
