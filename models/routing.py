"""Task routing masks for diffusion models (Park et al., "Denoising Task Routing", ICLR 2024).

A mask table M has shape (T, C): row t (0-based, t = 0 is the least noisy task D_t) says which
of the C channels of a routed feature are active for the denoising task at timestep t.

Kinds
-----
none       all ones: the vanilla model.
dtr        sliding window of C_beta = floor(beta * C) channels whose start moves from 0 to C - C_beta
           as start[t] = round((C - C_beta) * (t / (T - 1)) ** alpha), round half to even. This is what
           the authors' released code computes (np.linspace(0, 1, T) ** alpha, then .round()).
dtr-paper  Eq. 4 of the paper taken literally: with 1-based t, channel c (1-based) is active when
           round((C - C_beta) * ((t - 1) / T) ** alpha) < c <= round((C - C_beta) * (t / T) ** alpha) + C_beta.
           Call the two rounded terms lo and hi: they use different fractions, so row t holds
           C_beta + (hi - lo) ones, C_beta plus how far the window moves from t - 1 to t. The first
           window starts at channel 1 (lo = 0 at t = 1) and the last ends at channel C (hi = C - C_beta
           at t = T). Reviewers flagged the (t - 1)/T as a typo; it is offered only to reproduce the text.
random     R-TR (Sec. 4.2): every row draws its own C_beta channels uniformly at random from a seeded
           generator, so the table is reproducible. (The paper's Pseudo Code 1 permutes the columns of a
           single shared row, which would give every task the same channels; we follow Sec. 4.2.)
cdtr       Appendix F: the T tasks are split into K = 8 uniform timestep clusters and each cluster gets one
           DTR window (start = round((C - C_beta) * (k / (K - 1)) ** alpha)).
ercdt      Appendix F: the first floor(C / 2) channels are shared by every task; the remaining channels are
           split into K = 8 contiguous, disjoint segments, and cluster k activates segment k. beta and alpha
           do not enter (the split is fixed by the appendix), but they are still validated.
"""
import math

import numpy as np
import torch
from torch import nn

from diffusion.schedules import NUM_TIMESTEPS  # T: one task per original diffusion timestep; tables are indexed by it

ROUTING_KINDS = ("none", "dtr", "dtr-paper", "random", "cdtr", "ercdt")
DTR_ALPHA, DTR_BETA = 4.0, 0.8  # the paper's DTR setting (Sec. 5): window shift exponent, share of active channels
NUM_TIMESTEP_CLUSTERS = 8  # Appendix F: k = 8 uniform timestep clusters


def active_channels(channels, beta):
    """C_beta = floor(beta * C), the channels each task activates (Sec. 4.2)."""
    return int(math.floor(beta * channels))


def validate_routing(kind, num_tasks, channels, alpha, beta):
    """Raise ValueError naming the first bad routing argument."""
    if kind not in ROUTING_KINDS:
        raise ValueError(f"unknown routing kind {kind!r}; expected one of {', '.join(ROUTING_KINDS)}")
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be an integer >= 1, got {channels!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
        raise ValueError(f"beta must lie in (0, 1], got {beta!r}")
    if active_channels(channels, beta) == 0:
        raise ValueError(f"beta={beta} activates floor(beta * C) = 0 of C={channels} channels; raise beta")


def _windows(starts, widths, channels):
    """0/1 table whose row i is ones on [starts[i], starts[i] + widths[i])."""
    c = torch.arange(channels)
    starts = torch.as_tensor(starts, dtype=torch.long)[:, None]
    widths = torch.as_tensor(widths, dtype=torch.long)[:, None]
    return ((c >= starts) & (c < starts + widths)).float()


def _cluster_of(num_tasks):
    """Cluster index of every task for K uniform timestep clusters (K <= num_tasks)."""
    k = min(NUM_TIMESTEP_CLUSTERS, num_tasks)
    return torch.arange(num_tasks) * k // num_tasks, k


def build_dtr_masks(num_tasks, channels, alpha, beta):
    """Sliding-window DTR masks as in the authors' released code (Sec. 4.3, Pseudo Code 1)."""
    c_beta = active_channels(channels, beta)
    offsets = np.round((channels - c_beta) * np.linspace(0.0, 1.0, num_tasks) ** alpha)
    return _windows(offsets.astype(np.int64), [c_beta] * num_tasks, channels)


def build_dtr_paper_masks(num_tasks, channels, alpha, beta):
    """Eq. 4 of the paper, with (t - 1)/T on the lower and t/T on the upper bound."""
    c_beta = active_channels(channels, beta)
    t = np.arange(num_tasks, dtype=np.float64)  # 0-based row = 1-based t minus one
    lo = np.round((channels - c_beta) * (t / num_tasks) ** alpha).astype(np.int64)
    hi = np.round((channels - c_beta) * ((t + 1) / num_tasks) ** alpha).astype(np.int64)
    return _windows(lo, hi - lo + c_beta, channels)


def build_random_masks(num_tasks, channels, beta, seed):
    """R-TR: each task activates C_beta channels drawn uniformly at random (Sec. 4.2), seeded."""
    c_beta = active_channels(channels, beta)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.rand(num_tasks, channels, generator=generator).argsort(dim=1)[:, :c_beta]
    masks = torch.zeros(num_tasks, channels)
    masks.scatter_(1, chosen, 1.0)
    return masks


def build_cdtr_masks(num_tasks, channels, alpha, beta):
    """CDTR (Appendix F): one DTR window per uniform timestep cluster."""
    cluster, k = _cluster_of(num_tasks)
    return build_dtr_masks(k, channels, alpha, beta)[cluster]


def build_ercdt_masks(num_tasks, channels):
    """ERCDT (Appendix F): half the channels shared, the other half split into cluster segments."""
    cluster, k = _cluster_of(num_tasks)
    shared = channels // 2
    segments = np.array_split(np.arange(shared, channels), k)
    masks = torch.zeros(num_tasks, channels)
    masks[:, :shared] = 1.0
    for i, segment in enumerate(segments):
        rows = (cluster == i).nonzero().flatten()
        masks[rows[:, None], torch.as_tensor(segment)[None, :]] = 1.0
    return masks


def build_masks(kind, num_tasks, channels, alpha=DTR_ALPHA, beta=DTR_BETA, seed=0):
    """Routing mask table of shape (num_tasks, channels) with 0/1 float entries."""
    validate_routing(kind, num_tasks, channels, alpha, beta)
    if kind == "none":
        return torch.ones(num_tasks, channels)
    if kind == "dtr":
        return build_dtr_masks(num_tasks, channels, alpha, beta)
    if kind == "dtr-paper":
        return build_dtr_paper_masks(num_tasks, channels, alpha, beta)
    if kind == "random":
        return build_random_masks(num_tasks, channels, beta, seed)
    if kind == "cdtr":
        return build_cdtr_masks(num_tasks, channels, alpha, beta)
    return build_ercdt_masks(num_tasks, channels)


ROUTING_CONFIG_KEYS = ("routing", "alpha", "beta", "routing_seed")  # what rebuilds every mask table


@torch.compiler.disable
def check_timesteps(t, batch_size, num_tasks, integral=True):
    """Reject timesteps that are not (N,) integers in [0, num_tasks) instead of clamping them (row t is task D_t).

    Models call it once per forward, before any block gathers a mask row. torch.compiler.disable keeps it
    out of compiled graphs: under torch.compile on CPU a bad index inside the graph aborts the process in
    an inductor bounds check, here it stays this ValueError. On the GPU it asserts asynchronously (no host sync).
    """
    if t.dim() != 1 or t.shape[0] != batch_size:
        raise ValueError(f"timesteps must have shape ({batch_size},), got {tuple(t.shape)}")
    integers = (t == t.round()).all() if integral and t.is_floating_point() else None
    in_range = ((t >= 0) & (t < num_tasks)).all()
    if t.device.type != "cpu":  # accelerators (and meta, where tests count syncs) assert without a host sync
        if integers is not None:
            torch._assert_async(integers, "timesteps must be integers")
        torch._assert_async(in_range, f"timestep outside [0, {num_tasks})")
        return
    if integers is not None and not bool(integers):
        raise ValueError(f"routing needs integer timesteps, got {t.tolist()[:8]}")
    if not bool(in_range):
        bad = t[(t < 0) | (t >= num_tasks)].tolist()[:8]
        raise ValueError(f"timesteps {bad} lie outside [0, {num_tasks}); pass original-scale diffusion timesteps")


def make_block_router(kind, block_index, channels, alpha, beta, seed, num_tasks=NUM_TIMESTEPS):
    """The router of one block, or None without routing; R-TR gives block i its own table (seed + i)."""
    if kind == "none":
        return None
    return TaskRouter(kind, num_tasks, channels, alpha, beta, seed + block_index if kind == "random" else seed)


def check_routing_covers(model, num_timesteps):
    """ValueError unless each routing table of `model` has one row per diffusion timestep (T = num_timesteps).

    The tables are indexed by the original timestep t, so a diffusion of another T would gather wrong rows (or
    fail in the gather) instead of routing task t.
    """
    rows = sorted({m.num_tasks for m in model.modules() if isinstance(m, TaskRouter)})
    if rows and rows != [num_timesteps]:
        raise ValueError(f"the model's routing tables have {' / '.join(map(str, rows))} rows (one per timestep) but "
                         f"the diffusion has T = {num_timesteps} timesteps; build both with the same T")


def routed(block, z, mask, *args):
    """Eq. 8: (1 - m) * z + Block(m * z, ...), the block's inner residuals included; mask (N, 1, C) of 0/1.

    (1 - m) * z is computed as z - m * z: the same values for a 0/1 mask (exactly), one multiply fewer.
    """
    masked = mask * z
    return block(masked, *args) + (z - masked)


class TaskRouter(nn.Module):
    """Holds a fixed mask table and turns timesteps (N,) into masks (N, 1, C) by one gather.

    The table is a non-persistent buffer, so state_dicts keep the official DiT keys. The authors'
    DTR checkpoints store it as `<prefix>_unit_mapping`; such a key is accepted when it equals the
    configured table and rejected with a clear error otherwise.
    """

    def __init__(self, kind, num_tasks, channels, alpha=DTR_ALPHA, beta=DTR_BETA, seed=0):
        super().__init__()
        self.kind, self.alpha, self.beta, self.seed = kind, alpha, beta, seed
        self.num_tasks, self.channels = num_tasks, channels
        # bool keeps the (T, C) table per block small; it is cast to the activation dtype on lookup.
        self.register_buffer("masks", build_masks(kind, num_tasks, channels, alpha, beta, seed).bool(),
                             persistent=False)

    def forward(self, t, dtype=torch.float32):
        """Masks (N, 1, C) for integer timesteps t (N,) in [0, num_tasks), broadcastable over tokens.

        The model checks t once per forward (check_timesteps), not every block.
        """
        return self.masks[t.long()].unsqueeze(1).to(dtype)

    def adopt_table(self, table):
        """Route with a stored 0/1 table (T, C) instead of the one built from the settings: the authors' R-TR
        checkpoints drew each block's masks unseeded, so only the file knows them. ValueError if it cannot be one."""
        if table.numel() != self.masks.numel():
            raise ValueError(f"a routing table of shape {tuple(table.shape)} does not fit this block's "
                             f"{tuple(self.masks.shape)} (tasks x channels)")
        table = table.reshape(self.masks.shape)
        if not ((table == 0) | (table == 1)).all():
            raise ValueError("a routing table must hold only 0 and 1")
        self.masks = table.to(device=self.masks.device, dtype=torch.bool)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "_unit_mapping"
        if key in state_dict:
            stored = state_dict.pop(key)
            if stored.numel() != self.masks.numel() or not torch.equal(
                    stored.reshape(self.masks.shape).to(self.masks.device).bool(), self.masks):
                raise ValueError(
                    f"checkpoint routing masks {key} (shape {tuple(stored.shape)}) differ from the "
                    f"configured routing={self.kind!r} alpha={self.alpha} beta={self.beta} "
                    f"seed={self.seed} table of shape {tuple(self.masks.shape)}: the checkpoint was trained with "
                    f"other routing settings")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self):
        return (f"kind={self.kind}, num_tasks={self.num_tasks}, channels={self.channels}, "
                f"alpha={self.alpha}, beta={self.beta}, seed={self.seed}")
