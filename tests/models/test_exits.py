"""models/exits.py: the exit gate's choice inside the one trunk loop (on the tiny Ouro model).

Reference for the threshold mode: `OuroLM.threshold_logits` (every loop without a cache,
checked against the reference implementation's golden values in tests/models/test_ouro.py).
"""

from __future__ import annotations

import pytest
import torch

from models.checkpoint import load_model
from models.exits import exit_distribution
from models.ouro import OuroLM
from models.trunk import describe, run_forward

TOKENS = torch.tensor([[5, 17, 33, 2, 99, 4, 8], [7, 7, 1, 250, 3, 60, 12]])


@pytest.fixture(scope="module")
def model(ouro_tiny_dir) -> OuroLM:
    m = load_model(ouro_tiny_dir)
    assert isinstance(m, OuroLM)
    return m.eval()


@pytest.mark.parametrize("threshold", [0.25, 0.5, 0.95])
def test_a_forward_with_thresholds_is_the_threshold_exit_at_every_position(model, threshold):
    with torch.no_grad():
        ref, _ = model.threshold_logits(TOKENS, threshold)
        fwd = describe(model.config, TOKENS, None, 4)
        fwd.exit_threshold = torch.tensor([threshold, threshold])
        out = run_forward(model.executor(), model.config, fwd).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_rows_of_different_loop_counts_choose_over_their_own_loops(model):
    """Row 0 at 2 loops and row 1 at 4 in one forward: each equals its own forward alone."""
    with torch.no_grad():
        fwd = describe(model.config, TOKENS, None, torch.tensor([2, 4]))
        fwd.exit_threshold = torch.tensor([0.5, 0.5])
        both = run_forward(model.executor(), model.config, fwd).logits
        for b, n in ((0, 2), (1, 4)):
            alone = describe(model.config, TOKENS[b : b + 1], None, n)
            alone.exit_threshold = torch.tensor([0.5])
            torch.testing.assert_close(both[b], run_forward(model.executor(), model.config, alone).logits[0])


def test_an_unreachable_threshold_is_the_plain_output(model):
    with torch.no_grad():
        fwd = describe(model.config, TOKENS, None, 3)
        fwd.exit_threshold = torch.tensor([2.0, 2.0])
        plain = model(TOKENS, steps=3).logits
        torch.testing.assert_close(run_forward(model.executor(), model.config, fwd).logits, plain)


def test_a_model_without_an_exit_gate_refuses_thresholds(tiny_model_dir):
    from models.executors import EagerExecutor

    m = load_model(tiny_model_dir).eval()
    fwd = describe(m.config, torch.tensor([[1, 2, 3]]), None, 2)
    fwd.exit_threshold = torch.tensor([0.5])
    with pytest.raises(ValueError, match="no exit gate"):
        run_forward(EagerExecutor(m), m.config, fwd)


def test_exit_distribution_is_the_geometric_exit_with_the_rest_on_the_last_loop():
    g = torch.tensor([[0.0, 0.0, 0.0]])
    torch.testing.assert_close(exit_distribution(g), torch.tensor([[0.5, 0.25, 0.25]]))
