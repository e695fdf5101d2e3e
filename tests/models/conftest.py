"""Fixtures for model tests: tiny configs and perturbed weights (helpers in tests/helpers.py)."""

from __future__ import annotations

import pytest

from tests.helpers import perturbed_model, tiny_config


@pytest.fixture
def make_model():
    return perturbed_model


@pytest.fixture
def tiny():
    return tiny_config
