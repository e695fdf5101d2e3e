"""SP, muP and CompleteP: initialisation, optimizer groups and multipliers.

CompleteP (Dey et al. 2025, Table 1, alpha = 1) against SP and muP, with
m_N = d_model / base_width and m_L = depth / base_depth:

    quantity                      SP        muP              CompleteP
    embedding / unembedding init  s^2       s^2              s^2
    embedding / unembedding LR    eta       eta              eta
    hidden weight init variance   s^2       s^2 / m_N        s^2 / m_N
    hidden weight LR (AdamW)      eta       eta / m_N        eta / m_N
    hidden weight decay           lam       lam * m_N        lam * m_N
    norm gains, scalar gains LR   eta       eta              eta       (no decay)
    residual branch multiplier    1         1                1 / m_L   (= the Euler step h)
    attention scale               1/sqrt(hs) 1/hs            1/hs
    output logits                 x W^T     x W^T / m_N      x W^T / m_N  (train and inference)
    AdamW eps                     eps       eps / m_N        eps / (m_N m_L)

The residual multiplier and the logit and attention scales live in the model
(`ModelConfig.horizon`, `.logit_mult`, `.attn_scale`); this module holds what
an optimizer or an initialiser needs. "Hidden" weights are every matrix inside
the trunk (attention, MLP, experts, tree nodes, router and gates).

For the ODE trunk m_L uses the nominal depth `max_steps`: the trunk is trained
at sampled step counts, and `h = base_depth / N` applies the depth rule at
whatever N a batch uses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig


def hidden_init_std(config: ModelConfig) -> float:
    """Std of hidden matrices: sigma under SP, sigma / sqrt(m_N) otherwise."""
    return config.init_std / math.sqrt(config.width_mult)


def _is_hidden(name: str, param: torch.Tensor) -> bool:
    return name.startswith("blocks.") and param.dim() >= 2


def init_weights(model: nn.Module) -> None:
    """Initialise a LeanLM in place according to its parameterisation.

    Zero inits that the architecture requires win over the table: SAS's W_Q
    (so attention starts uniform and the block as alpha*I) and the first
    block's value delta dW. Tree node matrices are scaled by 1/sqrt(D+1) so
    that the path sum has the variance of a single hidden matrix.
    """
    config: ModelConfig = model.config
    std_hidden = hidden_init_std(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_hidden(name, p):
                std = std_hidden
                if ".ffn.w_" in name and config.ffn == "tree":
                    std = std_hidden / math.sqrt(config.tree_depth + 1)
                nn.init.normal_(p, 0.0, std)
            elif p.dim() >= 2:  # embeddings, positions, untied head
                nn.init.normal_(p, 0.0, config.init_std)
        for block in model.blocks:
            attn = block.attn
            if attn.shaped:
                attn.qk.weight[: config.d_model].zero_()  # W_Q = 0
                if attn.v_delta is not None:
                    attn.v_delta.weight.zero_()


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups with the parameterisation's LR and decay rules.

    Each group carries `lr_scale` (its LR relative to `lr`) so that a schedule
    can set `group["lr"] = schedule(t) * group["lr_scale"]`.

    Returns:
        Groups named "embedding", "hidden" and "gains" (empty ones dropped).
    """
    config: ModelConfig = model.config
    m_n = config.width_mult  # 1 under SP
    groups: dict[str, list[torch.nn.Parameter]] = {"embedding": [], "hidden": [], "gains": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _is_hidden(name, p):
            groups["hidden"].append(p)
        elif p.dim() >= 2:
            groups["embedding"].append(p)
        else:
            groups["gains"].append(p)  # norm weights/biases, shaped-attention scalars
    spec = {
        "embedding": (1.0, weight_decay),
        "hidden": (1.0 / m_n, weight_decay * m_n),
        "gains": (1.0, 0.0),
    }
    out = []
    for name, params in groups.items():
        if params:
            scale, wd = spec[name]
            out.append(
                {"name": name, "params": params, "lr": lr * scale, "lr_scale": scale, "weight_decay": wd}
            )
    return out


def adamw_eps(config: ModelConfig, eps: float) -> float:
    """AdamW epsilon: eps, eps/m_N (muP) or eps/(m_N m_L) (CompleteP)."""
    return eps / (config.width_mult * config.depth_mult)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    eps: float = 1e-8,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the parameterisation's epsilon."""
    return torch.optim.AdamW(
        param_groups(model, lr, weight_decay), lr=lr, betas=betas, eps=adamw_eps(model.config, eps)
    )
