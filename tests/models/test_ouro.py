"""Ouro (models/ouro.py) against golden values from the reference implementation.

Provenance of tests/models/golden/ouro_tiny.json (also in its "provenance" entry):
    reference  LoopedLMs/ouro_rl, ouro_rl/modeling/modeling_ouro.py at commit
               0d7e8e4998d0cc4460c1c931457c78e6e981b288 and configuration_ouro.py at
               3bad4c1891fa7a1c5e11f8eb4e59e7d1cec5502b (a public copy of ByteDance's Ouro code),
               run outside this repository (never copied into it) with transformers 5.24.0 and
               torch 2.13.0 on CPU, float32, eager attention, one thread. Adapted to transformers
               5.24 only where its API moved (listed in the JSON: the default RoPE init, the
               causal-mask call, the cache's get_mask_sizes argument); the arithmetic is untouched.
    weights    `python -m models.ouro_random DIR --preset tiny --seed 0 --dtype float32 --shards 3`
               (hidden 64, 2 layers, 4 heads / 2 kv heads, SwiGLU 128, vocabulary 288,
               total_ut_steps 4), loaded into the reference with load_state_dict(strict=True);
               their SHA-256 is in the JSON and checked here.
    values     per prompt and loop count n = 1..4 (`exit_at_step = n - 1`): the last position's
               logits, the argmax at every position, 8 greedy tokens (full recompute each token;
               the script checked the reference's own cached decoding gives the same tokens, and
               that a config with total_ut_steps = n gives identical logits); the exit gate's
               logit after every loop at every position; and the threshold mode
               (`exit_threshold` 0.25 / 0.5 / 0.75 / 0.95: every loop runs, each token reads its
               exit loop's state) with the same three outputs.

Tolerance: logits within 1e-4 absolute (measured: at most 2e-6 apart); argmax and greedy tokens exact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_model
from models.kv_cache import PagedKVCache
from models.ouro import OuroLM, exit_distribution, threshold_exit

GOLDEN = json.loads((Path(__file__).parent / "golden" / "ouro_tiny.json").read_text())
PROMPTS: dict[str, list[int]] = GOLDEN["provenance"]["prompts"]
LOOPS = [1, 2, 3, 4]
ATOL = 1e-4


@pytest.fixture(scope="module")
def model(ouro_tiny_dir) -> OuroLM:
    torch.manual_seed(0)
    m = load_model(ouro_tiny_dir)
    assert isinstance(m, OuroLM)
    return m


def test_the_generator_writes_the_golden_weights(ouro_tiny_dir):
    from safetensors.torch import load_file

    index = json.loads((ouro_tiny_dir / "model.safetensors.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(ouro_tiny_dir / shard)))
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].numpy().tobytes())
    assert digest.hexdigest() == GOLDEN["provenance"]["weights_sha256"]


@pytest.mark.parametrize("key", sorted(PROMPTS))
@pytest.mark.parametrize("loops", LOOPS)
def test_logits_match_the_reference_for_every_loop_count(model, key, loops):
    gold = GOLDEN["loops"][key][str(loops)]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[key]]), steps=loops).logits[0]  # (T, V)
    torch.testing.assert_close(logits[-1], torch.tensor(gold["last_logits"]), atol=ATOL, rtol=0)
    assert logits.argmax(-1).tolist() == gold["argmax_per_position"]


@pytest.mark.parametrize("key", sorted(PROMPTS))
@pytest.mark.parametrize("loops", LOOPS)
def test_greedy_decoding_with_the_paged_cache_matches_the_reference(model, key, loops):
    assert model.generate(PROMPTS[key], 8, steps=loops) == GOLDEN["loops"][key][str(loops)]["greedy"]


def test_one_forward_with_rows_at_every_loop_count_matches_each_alone(model):
    """Four rows, loops 1..4, one prefill and decode batch over one paged cache (the trunk's
    mixed-step schedule): each row's tokens are the reference's for its loop count."""
    prompt = PROMPTS["a"]
    cache = PagedKVCache(model.config, num_pages=64, page_size=4)
    for b, n in enumerate(LOOPS):
        cache.reserve(b, n, len(prompt) + 8)
    kv = cache.batch(list(range(4)))
    # Each loop's page holds every layer's kv heads: loops x layers x kv x head_dim per token.
    c = model.config
    assert cache.page_bytes == 4 * 2 * c.loop_layers * c.n_kv_heads * c.head_dim * 4
    assert cache.used_bytes == sum(n * 4 for n in LOOPS) * cache.page_bytes  # 4 pages per loop (15 tokens)
    ids = torch.tensor([prompt] * 4)
    pos = torch.arange(len(prompt)).expand(4, -1)
    out: list[list[int]] = [[] for _ in LOOPS]
    with torch.no_grad():
        for _ in range(8):
            nxt = model(ids, pos, LOOPS, kv=kv, last_only=True).logits[:, -1].argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                out[b].append(t)
            ids, pos = nxt[:, None], pos[:, -1:] + 1
    assert out == [GOLDEN["loops"]["a"][str(n)]["greedy"] for n in LOOPS]
    for b in range(4):
        cache.release(b)
    assert cache.used_bytes == 0


@pytest.mark.parametrize("key", sorted(PROMPTS))
def test_exit_gate_logits_match_the_reference(model, key):
    _, gates = model.loop_states(torch.tensor([PROMPTS[key]]))  # (1, T, N)
    torch.testing.assert_close(gates[0].T, torch.tensor(GOLDEN["gate_logits"][key]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("key", sorted(PROMPTS))
@pytest.mark.parametrize("threshold", ["0.25", "0.5", "0.75", "0.95"])
def test_threshold_exit_matches_the_reference(model, key, threshold):
    """The reference's exit_threshold mode: every loop runs, each token reads its exit loop."""
    gold = GOLDEN["threshold"][key][threshold]
    ids = list(PROMPTS[key])
    logits, _ = model.threshold_logits(torch.tensor([ids]), float(threshold))
    torch.testing.assert_close(logits[0, -1], torch.tensor(gold["last_logits"]), atol=ATOL, rtol=0)
    assert logits[0].argmax(-1).tolist() == gold["argmax_per_position"]
    greedy = []
    for _ in range(8):  # the reference's generation in this mode: full recompute each token
        nxt = int(model.threshold_logits(torch.tensor([ids]), float(threshold))[0][0, -1].argmax())
        greedy.append(nxt)
        ids.append(nxt)
    assert greedy == gold["greedy"]


def test_exit_distribution_sums_to_one_and_thresholds_pick_the_first_loop_reaching_it():
    g = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, -3.0, 2.0, 0.0]])
    p = exit_distribution(g)
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    torch.testing.assert_close(p[0], torch.tensor([0.5, 0.25, 0.125, 0.125]))
    assert threshold_exit(p, 0.7).tolist() == [1, 0]
    assert threshold_exit(p, 1.5).tolist() == [3, 3]  # never reached: the last loop


def test_steps_outside_the_loop_range_are_refused_naming_the_range(model):
    with pytest.raises(ValueError, match=r"steps=5: must lie in \[1, 4\]"):
        model(torch.tensor([[1, 2]]), steps=5)
