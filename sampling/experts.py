"""Multi-experts sampling (paper Table 6; eDiff-I's ensemble of expert denoisers): one model per timestep range.

Each expert is trained with `train.py --timestep-range LO HI` on its own tasks; at every sampling step the
sample goes to the expert whose [LO, HI] holds its (original-scale) timestep t. The ranges must tile 0..T-1.
"""
import torch
from torch import nn

from foundation.usage_error import UsageError
from models.routing import NUM_TIMESTEPS
from sampling.model_from_checkpoint import load_checkpoint

# Settings every expert must share: they denoise the same x_t of the same diffusion
SHARED_SETTINGS = ("image_size", "vae", "latent_scale", "diffusion_config")


def check_expert_ranges(ranges, num_timesteps=NUM_TIMESTEPS):
    """Raise UsageError (a ValueError) unless the [lo, hi] ranges, taken in order of lo, cover 0..T-1 exactly once."""
    if not ranges:
        raise UsageError("multi-experts sampling needs at least one expert range")
    expected = 0
    for lo, hi in sorted(ranges):
        if lo > hi:
            raise UsageError(f"expert range [{lo}, {hi}] is empty (LO > HI)")
        if lo != expected:
            what = "overlaps the previous range" if lo < expected else f"leaves t = {expected}..{lo - 1} to no expert"
            raise UsageError(f"expert range [{lo}, {hi}] {what}; the ranges must tile 0..{num_timesteps - 1}")
        expected = hi + 1
    if expected != num_timesteps:
        raise UsageError(f"the expert ranges end at t = {expected - 1}; t = {expected}..{num_timesteps - 1} "
                         "belong to no expert")


class TimestepExperts(nn.Module):
    """Calls, for every sample, the expert whose [lo, hi] owns its timestep t; looks like one model to samplers."""

    def __init__(self, experts, ranges, num_timesteps=NUM_TIMESTEPS):
        super().__init__()
        if len(experts) != len(ranges):
            raise UsageError(f"{len(experts)} experts but {len(ranges)} ranges")
        check_expert_ranges(ranges, num_timesteps)
        first = experts[0]
        for attribute in ("num_classes", "in_channels", "input_size"):
            values = {getattr(expert, attribute) for expert in experts}
            if len(values) > 1:
                raise UsageError(f"experts disagree on {attribute}: {sorted(values)}")
        self.experts = nn.ModuleList(experts)
        self.ranges = [(int(lo), int(hi)) for lo, hi in ranges]
        self.num_classes, self.in_channels, self.input_size = first.num_classes, first.in_channels, first.input_size
        self.config = first.config  # label dropout (the null class for CFG) is read from here
        owner = torch.empty(num_timesteps, dtype=torch.long)
        for k, (lo, hi) in enumerate(self.ranges):
            owner[lo:hi + 1] = k
        self.register_buffer("owner", owner, persistent=False)  # (T,): expert index of every timestep

    def forward(self, x, t, y):
        """Output (N, ...) of the owning expert for each sample; experts run on their samples only."""
        owner = self.owner[t.long()]  # (N,)
        out = None
        for k in owner.unique().tolist():
            rows = (owner == k).nonzero().flatten()
            part = self.experts[k](x[rows], t[rows], y[rows])
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out[rows] = part
        return out


def check_lone_expert(settings, path, allowed, num_timesteps=NUM_TIMESTEPS):
    """UsageError if a checkpoint sampled alone was trained on part of the timesteps only (one expert of several),
    unless allowed (--allow-partial-expert): the sampler visits every t, most of which it never saw."""
    if settings.timestep_range is None or allowed:
        return
    lo, hi = settings.timestep_range
    if (lo, hi) == (0, num_timesteps - 1):
        return
    raise UsageError(f"{path} is one expert, trained only on t = {lo}..{hi} (--timestep-range), but sampling visits "
                     f"every t in 0..{num_timesteps - 1}: give every expert (--ckpt A.pt B.pt ...), or "
                     f"--allow-partial-expert to sample with this one alone")


def load_experts(paths, ranges=None, flags=None, use_model_weights=False):
    """(TimestepExperts, settings of the first) from checkpoints; ranges default to each one's --timestep-range."""
    if ranges is not None and len(ranges) != len(paths):
        raise UsageError(f"{len(paths)} checkpoints but {len(ranges)} --expert-range values: give one per --ckpt")
    experts, found, settings = [], [], []
    for i, path in enumerate(paths):
        model, setting = load_checkpoint(path, flags, use_model_weights)
        timestep_range = ranges[i] if ranges is not None else setting.timestep_range
        if timestep_range is None:
            raise UsageError(f"{path} was trained on every timestep (no --timestep-range); give --expert-range LO HI "
                             "for each --ckpt")
        experts.append(model)
        found.append(tuple(timestep_range))
        settings.append(setting)
    for name in SHARED_SETTINGS:
        values = [getattr(s, name) for s in settings]
        if any(v != values[0] for v in values):
            raise UsageError(f"the experts disagree on {name}: {values}")
    return TimestepExperts(experts, found).eval(), settings[0]
