"""One validated, JSON-serialisable configuration for the whole model family.

A `ModelConfig` selects the trunk (a stack of distinct blocks, or a weight-shared
ODE trunk whose step count is chosen per row at inference), the
parameterisation (SP, muP, CompleteP), the block kind (pre-norm, parallel,
simplified SAS / SAS-P) and the feed-forward kind (dense, top-k mixture of
experts, Cho & Bengio tree). Every invalid value raises `ConfigError`, whose
message names the field, the value and what is allowed.

Both trunks are the same machine underneath: a list of `n_blocks` distinct
blocks applied as `N` Euler steps `x <- x + h * f_k(x)` with `h = T / N`.

* `trunk="stack"`: `n_blocks = n_layers` and `N = n_layers` always (step `i`
  runs block `i`), so it is an ordinary deep transformer.
* `trunk="ode"`: `n_blocks = n_shared_blocks` (1 for a fully shared trunk) and
  `N` is chosen per row in `[min_steps, max_steps]`; step `i` of `N` runs block
  `floor(i * n_blocks / N)`, i.e. each block owns an equal slice of the time
  interval `[0, T]`, which is what partial sharing means for an ODE.

The horizon `T` is `base_depth` under CompleteP (its residual factor
`L_base / L` *is* the Euler step) and the nominal depth otherwise (`h = 1` at
full depth, the classic unscaled residual).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

Trunk = Literal["stack", "ode"]
Parameterisation = Literal["sp", "mup", "completep"]
BlockKind = Literal["prenorm", "parallel", "sas", "sasp"]
NormKind = Literal["rmsnorm", "layernorm", "none"]
FFNKind = Literal["dense", "moe", "tree"]
Activation = Literal["gelu", "relu", "silu"]


class ConfigError(ValueError):
    """A configuration value is out of range; `field` names it."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field}={value!r}: {allowed}")


def _choice(name: str, value: Any, literal: Any) -> None:
    options = get_args(literal)
    if value not in options:
        raise ConfigError(name, value, f"must be one of {', '.join(map(repr, options))}")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(name, value, f"must be an integer >= {low}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(name, value, "must be a number > 0")


@dataclass(frozen=True)
class ExpertSetting:
    """A model's per-request conditional-compute setting: MoE top-k or tree depth.

    The only definition of the setting's name and range (`ModelConfig.expert_setting`);
    validation, the policy, the API's model description and the executors read it.

    Attributes:
        name: the request field ("experts_top_k" or "expert_depth").
        lo, hi: the allowed values, inclusive; `hi` is the trained setting.
    """

    name: str
    lo: int
    hi: int

    @property
    def default(self) -> int:
        """What a request that names no setting runs with: the trained maximum."""
        return self.hi

    @property
    def values(self) -> list[int]:
        return list(range(self.lo, self.hi + 1))


@dataclass
class ModelConfig:
    """Architecture and parameterisation of one model.

    Attributes are plain JSON types so `to_dict` / `from_dict` round-trip
    exactly; `name` is informational.
    """

    name: str = "model"
    vocab_size: int = 4096
    context_length: int = 256
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    """Hidden width of the dense FFN, of each expert, and of each tree node."""

    # --- trunk -------------------------------------------------------------
    trunk: Trunk = "stack"
    n_layers: int = 4
    """Distinct blocks of a stack trunk (ignored for the ODE trunk)."""
    n_shared_blocks: int = 1
    """Distinct blocks of an ODE trunk: 1 = fully shared, more = partial sharing."""
    min_steps: int | None = None
    max_steps: int | None = None
    default_steps: int | None = None
    """Step count used when a caller does not choose one (defaults to max_steps)."""
    ode_horizon: float | None = None
    """Integration time T; None = base_depth under CompleteP, else the nominal depth."""

    # --- blocks ------------------------------------------------------------
    block: BlockKind = "prenorm"
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu"
    tie_embeddings: bool = True
    sas_beta_ff_init: float = 0.1
    """Initial MLP branch gain of simplified blocks (He & Hofmann use 0.1 at depth 18)."""

    # --- feed-forward ------------------------------------------------------
    ffn: FFNKind = "dense"
    n_experts: int = 4
    experts_top_k: int = 2
    """Trained number of experts per token; inference may use 1..experts_top_k."""
    moe_aux_loss_coef: float = 0.01
    tree_depth: int = 3
    """Gating bits D of the tree FFN: 2**(D+1)-1 node matrices, D+1 matmuls per token."""

    # --- parameterisation --------------------------------------------------
    parameterisation: Parameterisation = "completep"
    base_width: int = 128
    """N_base of muP / CompleteP: width multiplier m_N = d_model / base_width."""
    base_depth: int = 2
    """L_base of CompleteP: depth multiplier m_L = depth / base_depth."""
    init_std: float = 0.02

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (training provenance); never read by the model."""

    def __post_init__(self) -> None:
        self._fill_defaults()
        self.validate()

    # ------------------------------------------------------------------
    def _fill_defaults(self) -> None:
        if self.trunk == "stack":
            # A stack runs each of its layers exactly once.
            for name in ("min_steps", "max_steps", "default_steps"):
                if getattr(self, name) is None:
                    setattr(self, name, self.n_layers)
        else:
            if self.max_steps is None:
                self.max_steps = 12
            if self.min_steps is None:
                self.min_steps = max(self.n_shared_blocks, 1)
            if self.default_steps is None:
                self.default_steps = self.max_steps

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid field."""
        for name, literal in (
            ("trunk", Trunk),
            ("parameterisation", Parameterisation),
            ("block", BlockKind),
            ("norm", NormKind),
            ("ffn", FFNKind),
            ("activation", Activation),
        ):
            _choice(name, getattr(self, name), literal)
        for name, low in (
            ("vocab_size", 2),
            ("context_length", 1),
            ("d_model", 1),
            ("n_heads", 1),
            ("d_ff", 1),
            ("n_layers", 1),
            ("n_shared_blocks", 1),
            ("n_experts", 1),
            ("experts_top_k", 1),
            ("tree_depth", 0),
            ("base_width", 1),
            ("base_depth", 1),
            ("min_steps", 1),
            ("max_steps", 1),
            ("default_steps", 1),
        ):
            _int_at_least(name, getattr(self, name), low)
        for name in ("norm_eps", "init_std"):
            _positive(name, getattr(self, name))
        if self.ode_horizon is not None:
            _positive("ode_horizon", self.ode_horizon)
        if not isinstance(self.moe_aux_loss_coef, (int, float)) or self.moe_aux_loss_coef < 0:
            raise ConfigError("moe_aux_loss_coef", self.moe_aux_loss_coef, "must be a number >= 0")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError("tie_embeddings", self.tie_embeddings, "must be true or false")
        if self.d_model % self.n_heads:
            raise ConfigError("n_heads", self.n_heads, f"must divide d_model={self.d_model}")
        if self.experts_top_k > self.n_experts:
            raise ConfigError("experts_top_k", self.experts_top_k, f"must be <= n_experts={self.n_experts}")
        if self.tree_depth > 10:
            raise ConfigError("tree_depth", self.tree_depth, "must be <= 10 (2**11-1 node matrices)")
        if self.trunk == "stack":
            for name in ("min_steps", "max_steps", "default_steps"):
                if getattr(self, name) != self.n_layers:
                    raise ConfigError(
                        name,
                        getattr(self, name),
                        f"a stack trunk runs each layer once, so it must equal n_layers={self.n_layers}",
                    )
        else:
            if self.min_steps > self.max_steps:
                raise ConfigError("min_steps", self.min_steps, f"must be <= max_steps={self.max_steps}")
            if self.min_steps < self.n_shared_blocks:
                raise ConfigError(
                    "min_steps",
                    self.min_steps,
                    f"must be >= n_shared_blocks={self.n_shared_blocks} so every block runs",
                )
            if not self.min_steps <= self.default_steps <= self.max_steps:
                raise ConfigError(
                    "default_steps",
                    self.default_steps,
                    f"must lie in [min_steps={self.min_steps}, max_steps={self.max_steps}]",
                )

    # ------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads_per_step(self) -> int:
        """Key/value heads one token caches at one step (the KV page's head axis).

        One attention per step here; a model whose step is a stack of layers
        with grouped-query attention (models/ouro.py) caches layers x kv heads.
        """
        return self.n_heads

    @property
    def n_blocks(self) -> int:
        """Number of distinct blocks (weight sets) in the trunk."""
        return self.n_layers if self.trunk == "stack" else self.n_shared_blocks

    @property
    def step_range(self) -> tuple[int, int]:
        return int(self.min_steps), int(self.max_steps)  # type: ignore[arg-type]

    @property
    def horizon(self) -> float:
        """Integration time T of the Euler trunk (h = T / N)."""
        if self.ode_horizon is not None:
            return float(self.ode_horizon)
        if self.parameterisation == "completep":
            return float(self.base_depth)
        return float(self.max_steps)  # type: ignore[arg-type]

    @property
    def width_mult(self) -> float:
        """m_N = d_model / base_width (1 under SP, where it is unused)."""
        return self.d_model / self.base_width if self.parameterisation != "sp" else 1.0

    @property
    def depth_mult(self) -> float:
        """m_L = nominal depth / base_depth (CompleteP only; 1 otherwise)."""
        if self.parameterisation != "completep":
            return 1.0
        return self.max_steps / self.base_depth  # type: ignore[operator]

    @property
    def attn_scale(self) -> float:
        """1/d_head under muP and CompleteP, 1/sqrt(d_head) under SP."""
        if self.parameterisation == "sp":
            return 1.0 / math.sqrt(self.head_dim)
        return 1.0 / self.head_dim

    @property
    def logit_mult(self) -> float:
        """Output multiplier 1/m_N, applied at training and at inference."""
        return 1.0 / self.width_mult

    @property
    def expert_setting(self) -> ExpertSetting | None:
        """The per-request conditional-compute setting (the one definition), None when dense."""
        if self.ffn == "moe":
            return ExpertSetting("experts_top_k", 1, self.experts_top_k)
        if self.ffn == "tree":
            return ExpertSetting("expert_depth", 0, self.tree_depth)
        return None

    @property
    def expert_options(self) -> dict[str, list[int]]:
        """What a request may choose per row: {setting name: allowed values}, {} when dense."""
        e = self.expert_setting
        return {} if e is None else {e.name: e.values}

    @property
    def max_expert_setting(self) -> int | None:
        """The trained (maximum) expert setting, which a request without one gets; None when dense."""
        e = self.expert_setting
        return None if e is None else e.default

    @property
    def n_expert_slots(self) -> int:
        """Length of the per-expert token-count vector (experts or tree nodes)."""
        if self.ffn == "moe":
            return self.n_experts
        if self.ffn == "tree":
            return 2 ** (self.tree_depth + 1) - 1
        return 0

    # ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError("config", type(data).__name__, "must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                unknown[0], data[unknown[0]], f"unknown field; known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path}: config file not found") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("config", str(path), f"is not valid JSON ({e})") from e
        return cls.from_dict(data)
