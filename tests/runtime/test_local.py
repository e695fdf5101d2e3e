"""runtime/local.py: what `leanserve info` reports about a model directory."""

from __future__ import annotations

import torch

from models.checkpoint import check_model_dir, load_model
from runtime.local import model_summary


def test_info_of_an_ouro_directory_describes_the_looped_stack(ouro_tiny_dir):
    c = check_model_dir(ouro_tiny_dir)
    s = model_summary(c)
    model = load_model(ouro_tiny_dir)
    assert s["architecture"] == "ouro"
    assert s["parameters"] == sum(p.numel() for p in model.parameters())  # counted, not estimated
    assert (s["layers_per_loop"], s["heads"], s["kv_heads"], s["head_dim"]) == (2, 4, 2, 16)
    assert s["steps"] == {"min": 1, "max": 4, "default": 4}
    # K and V of 2 layers x 2 kv heads x 16 values per token and loop.
    assert s["kv_bytes_per_token_per_step"] == {"float32": 2 * 2 * 2 * 16 * 4, "bfloat16": 2 * 2 * 2 * 16 * 2}
    assert "trunk" not in s and "block" not in s  # a LeanLM's fields would mislead here


def test_info_of_a_leanlm_directory(tiny_model_dir):
    c = check_model_dir(tiny_model_dir)
    s = model_summary(c)
    model = load_model(tiny_model_dir)
    assert s["architecture"] == "leanlm"
    assert s["parameters"] == sum(p.numel() for p in model.parameters())
    assert (s["trunk"], s["ffn"], s["steps"]["max"]) == ("ode", "moe", 4)
    d = c.d_model
    assert s["kv_bytes_per_token_per_step"]["float32"] == 2 * d * torch.float32.itemsize
