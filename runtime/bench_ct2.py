"""CTranslate2, the CPU speed peer of `leanserve bench engine --ctranslate2`.

CTranslate2 (a C++ inference engine) runs the same random-weight GPT-2 that
the benchmark's HF peer builds (`bench_engine._hf_model`: the model's shape,
n_layer = max_steps), converted with its own `TransformersConverter` into a
temporary directory. The converter wants a tokenizer with the model's
vocabulary and bos/eos tokens: a word-level one over the names `t0..t{V-1}`
is written next to the weights, and prompts are sent as those names, so ids
map one to one.

Measured the way the HF peer is (`bench_engine.peer_measure`, one function for both), greedy, with
`min_length = max_length = new tokens` so every row generates exactly that
many: per-token decode latency at batch 1 (the difference of a long and a
one-token run, best of 3), tokens/s of a batch of equal requests, and useful
tokens/s of the mixed workload as one `generate_batch` (prompts of their own
lengths; the batch runs to its longest request, and only the tokens each
request asked for count). Per compute type: "float32" and "int8" (its fastest
CPU type here; CTranslate2 has no bfloat16 on CPU).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from models.config import ModelConfig
from runtime.bench_engine import BEST_OF, peer_measure

COMPUTE_TYPES = ("float32", "int8")


def _token(i: int) -> str:
    return f"t{i}"


def convert(hf_model: Any, config: ModelConfig, out_dir: Path) -> Path:
    """Write `hf_model` (a transformers GPT-2) as a CTranslate2 model under `out_dir`; its path."""
    import ctranslate2
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    hf_dir, ct2_dir = out_dir / "hf", out_dir / "ct2"
    hf_model.save_pretrained(hf_dir)
    vocab = {_token(i): i for i in range(config.vocab_size)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=_token(0)))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="t0", eos_token="t0", unk_token="t0")
    fast.save_pretrained(hf_dir)
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(ct2_dir), force=True)
    return ct2_dir


def _generate(generator: Any, prompts: list[list[int]], new: int) -> float:
    """Seconds for one greedy `generate_batch` of exactly `new` tokens per prompt."""
    tokens = [[_token(i) for i in p] for p in prompts]
    t0 = time.perf_counter()
    results = generator.generate_batch(
        tokens, max_length=new, min_length=new, sampling_topk=1, include_prompt_in_result=False
    )
    seconds = time.perf_counter() - t0
    got = {len(r.sequences_ids[0]) for r in results}
    if got != {new}:
        raise RuntimeError(f"CTranslate2 generated {sorted(got)} tokens per row, asked for {new}")
    return seconds


def measure(
    generator: Any, config: ModelConfig, P: int, M: int, batch: int, workload: list[tuple[list[int], int]]
) -> dict[str, float]:
    """Per-token latency at batch 1 (s), tokens/s of `batch` equal requests (`P` prompt and `M` new
    tokens each) and useful tokens/s of the mixed `workload` as one batch."""

    def generate(prompts: list[list[int]], new: int) -> float:
        return _generate(generator, prompts, new)

    per_token, uniform = peer_measure(generate, config.vocab_size, P, M, batch)
    longest = max(m for _, m in workload)
    useful = sum(m for _, m in workload)
    mixed = useful / min(_generate(generator, [p for p, _ in workload], longest) for _ in range(BEST_OF))
    return {"itl_s": per_token, "tokens_per_s": uniform, "tokens_per_s_mixed": mixed}


def run(hf_model: Any, config: ModelConfig, P: int, M: int, batch: int, workload: list[tuple[list[int], int]],
        threads: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """`measure` for every compute type in `COMPUTE_TYPES` (one conversion, one thread pool size)."""
    import ctranslate2

    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="leanserve-ct2-") as tmp:
        model_dir = convert(hf_model, config, Path(tmp))
        for compute_type in COMPUTE_TYPES:
            generator = ctranslate2.Generator(
                str(model_dir),
                device="cpu",
                compute_type=compute_type,
                inter_threads=1,
                intra_threads=threads,
            )
            out[compute_type] = measure(generator, config, P, M, batch, workload)
            del generator
    return out
