"""What a checkpoint file is, and whether train.py --resume can continue it (one line saying what it lacks if not).

train.py resumes only its own checkpoints: they hold what an exact continuation needs (optimizer, EMA, loss
weighting, RNG states, the position in the data, the model's full config). Other readable files are named
for what they are, so that the user learns which file they meant: official DiT's training dicts and
released state_dicts, the DTR release's files, EMA-only exports, or anything else torch.save wrote. train.py
cannot start from pretrained weights (no fine-tuning flag); those files are for sample.py --ckpt.
"""
import argparse

import torch

from foundation.usage_error import UsageError

# What train.py --resume reads (train.py's docstring lists every key; "loss_log", "scaler", "dataset" and the
# text keys are optional: older checkpoints, fp32 runs, class-conditional models).
RESUME_KEYS = ("model", "ema", "opt", "step", "args", "model_config", "diffusion_config", "loss_weighting", "rng",
               "data_state")
NOT_RESUMABLE = "resume needs a checkpoint written by train.py; to sample from it, give it to sample.py --ckpt"


def _is_state_dict(obj):
    """A raw state_dict maps parameter names to tensors and nothing else."""
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def describe(obj):
    """What a loaded checkpoint is, in a few words."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not a checkpoint dict"
    if _is_state_dict(obj):
        return f"a raw state_dict ({len(obj)} tensors: weights only, like the released DiT-XL-2-256x256.pt)"
    keys = sorted(map(str, obj))
    if "model_config" in obj:
        return "a train.py checkpoint"
    if "config" in obj and ("ema" in obj or "model" in obj):
        return "a checkpoint of the DTR authors' release (its Hydra config, no train.py state)"
    if isinstance(obj.get("args"), argparse.Namespace) and ("ema" in obj or "model" in obj):
        return f"an official DiT training checkpoint ({', '.join(keys)}; no model_config)"
    if set(obj) <= {"ema", "model"} and obj:
        return f"a file of weights only ({', '.join(keys)})"
    shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
    return f"a dict with keys {shown}, not a checkpoint of train.py"


def check_resumable(obj, path):
    """UsageError unless `obj` (read from path) is a train.py checkpoint with every key a resume reads."""
    kind = describe(obj)
    if kind != "a train.py checkpoint":
        raise UsageError(f"cannot resume {path}: it is {kind}; {NOT_RESUMABLE}")
    missing = [key for key in RESUME_KEYS if key not in obj]
    if missing:
        raise UsageError(f"cannot resume {path}: it is a train.py checkpoint without {', '.join(missing)} "
                         f"(edited or written by other code), so the run cannot continue exactly")


def check_weights_fit(state_dict, expected, path, which):
    """UsageError naming the missing, unexpected or reshaped tensors of a checkpoint's `which` weights."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
                if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                for label, keys in (("lacks", missing), ("has unknown", unexpected), ("has reshaped", reshaped))
                if keys]
    if problems:
        raise UsageError(f"cannot resume {path}: its {which} weights do not fit the model its model_config "
                         f"describes: {'; '.join(problems)}")
