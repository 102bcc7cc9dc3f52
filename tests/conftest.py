"""Test-wide settings: nothing may reach a model hub, and no test may leak global torch state."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def grad_mode_is_not_leaked():
    """Scripts' main() run in-process must leave autograd as they found it (a leak turns it off in later tests)."""
    yield
    assert torch.is_grad_enabled(), "a test left torch's global grad mode disabled"


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    """CLIP's real tokenizer (from open_clip's BPE file) with a random width-16 CLIPTextModel, saved offline."""
    pytest.importorskip("transformers")
    from tiny_clip import clip_bpe_path, write_tiny_clip
    if clip_bpe_path() is None:
        pytest.skip("open_clip_torch not installed (pip install --no-deps open_clip_torch): no CLIP BPE vocabulary")
    return write_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))
