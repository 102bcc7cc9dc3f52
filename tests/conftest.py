"""Test-wide settings: nothing may reach a model hub, and no test may leak global torch state."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def grad_mode_is_not_leaked():
    """Scripts' main() run in-process must leave autograd as they found it (a leak broke later tests)."""
    yield
    assert torch.is_grad_enabled(), "a test left torch's global grad mode disabled"
