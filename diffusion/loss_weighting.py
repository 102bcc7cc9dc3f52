"""Per-sample MSE loss weightings from the MTL view of diffusion (paper Table 2): vanilla, Min-SNR, P2, ANT-UW.

Each weighting maps the per-sample MSE (N,) and timesteps t (N,) to a weighted per-sample loss (N,);
GaussianDiffusion adds the VB term unweighted. ANT-UW (weights_vb = True) instead weights the whole
per-sample loss MSE + VB, as the ANT and DTR releases do.
snr(t) = alpha_bar_t / (1 - alpha_bar_t).
"""

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .timestep_sampler import StratifiedTimestepSampler, UniformTimestepSampler, cluster_index

WEIGHTINGS = ("vanilla", "min-snr", "p2", "ant-uw")
PREDICTIONS = ("epsilon", "x_start", "velocity")


def snr_from_alphas_cumprod(alphas_cumprod):
    """snr_t = alpha_bar_t / (1 - alpha_bar_t) as a float64 tensor (Kingma et al. 2021)."""
    alphas_cumprod = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)
    return alphas_cumprod / (1.0 - alphas_cumprod)


def _check_positive(name, value):
    """Reject non-positive hyperparameters with a message naming the flag."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


class LossWeighting(nn.Module):
    """Vanilla weighting: loss = mse (DDPM's simple loss). Base class; holds the snr table."""

    weights_vb = False  # True: forward receives the whole per-sample loss MSE + VB, not the MSE alone

    def __init__(self, alphas_cumprod):
        super().__init__()
        # non-persistent: derived from the schedule, so checkpoints only carry learnable state
        self.register_buffer("snr", snr_from_alphas_cumprod(alphas_cumprod), persistent=False)

    @property
    def num_timesteps(self):
        return self.snr.shape[0]

    def weights(self, t):
        """(N,) per-sample weight of the MSE term; 1 for vanilla."""
        return torch.ones(t.shape, dtype=torch.float64, device=t.device)

    def forward(self, mse, t, global_t=None):
        """Weighted per-sample loss (N,) from per-sample mse (N,) at timesteps t (N,); global_t is for ANT-UW."""
        _check_per_sample(mse, t)
        return self.weights(t).to(mse.dtype) * mse

    def timestep_sampler(self):
        """The training timestep sampler this weighting expects (uniform unless stated otherwise)."""
        return UniformTimestepSampler(self.num_timesteps)

    def param_groups(self):
        """Extra optimizer param groups for learnable weighting state; none here."""
        return []

    def all_reduce_gradients(self):
        """Average learnable weighting gradients over DDP ranks; nothing to do without parameters."""


class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023, Eq. 8 and Sec. 3.4): the x0-loss weight min(snr, gamma), in the prediction's units."""

    def __init__(self, alphas_cumprod, prediction="epsilon", gamma=5.0):
        super().__init__(alphas_cumprod)
        _check_positive("min_snr_gamma", gamma)
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        self.prediction, self.gamma = prediction, float(gamma)

    def weights(self, t):
        snr = self.snr.to(t.device)[t]
        clipped = torch.clamp(snr, max=self.gamma)
        # ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / snr = ||v - v_hat||^2 / (snr + 1), so each
        # target's weight is min(snr, gamma) rescaled into that target's units
        if self.prediction == "epsilon":
            return clipped / snr
        if self.prediction == "x_start":
            return clipped
        return clipped / (snr + 1.0)


class P2Weighting(LossWeighting):
    """Perception-prioritised weighting (Choi et al. 2022, Eq. 8): weight 1 / (k + snr)^gamma per sample."""

    def __init__(self, alphas_cumprod, k=1.0, gamma=1.0):
        super().__init__(alphas_cumprod)
        _check_positive("p2_k", k)
        _check_positive("p2_gamma", gamma)
        self.k, self.gamma = float(k), float(gamma)

    def weights(self, t):
        # indexed per sample, so the weight is (N,): the authors' release broadcast it over the width axis
        return 1.0 / (self.k + self.snr.to(t.device)[t]) ** self.gamma


class ANTUncertaintyWeighting(LossWeighting):
    """ANT-UW (Go et al. 2023, with Kendall et al. 2018): sum_k 0.5 * (exp(-s_k) L_k / K + s_k) over K timestep clusters.

    The objective of the ANT authors' code and of the DTR release, where the paper's Table 2
    (5.85 -> 4.61) and Table 3 (2.33) come from: s_k = log sigma_k^2 is learnable, initialised
    at 0; L_k is the mean over the global batch's samples in cluster k of the WHOLE per-sample
    loss, MSE + VB (so, unlike the other weightings, this one also weights the VB term).
    Setting d/ds_k = 0 gives its equilibrium exp(s_k) = L_k / K: each cluster's loss then enters
    the model's gradient with weight 0.5 exp(-s_k) / K = 0.5 / L_k.

    Not implemented: Kendall et al.'s objective taken literally, mean_k 0.5 * (exp(-s_k) L_k + s_k)
    with L_k the MSE only, which this module computed before. Its equilibrium is exp(s_k) = L_k,
    K times larger, and its model weight 0.5 / (K L_k). The ANT paper cites Kendall et al. for UW
    without writing a different equation, and ANT's own code uses the form above.

    Per-sample losses are scaled so that their mean over the global batch is the objective:
    sample i of cluster k carries (N / n_k) * 0.5 * (exp(-s_k) loss_i / K + s_k), where n_k counts
    the cluster's samples in the global batch (counted from its timesteps, see forward).
    """

    weights_vb = True

    def __init__(self, alphas_cumprod, num_clusters=8, lr=0.025):
        super().__init__(alphas_cumprod)
        if not isinstance(num_clusters, int) or not 1 <= num_clusters <= self.num_timesteps:
            raise ValueError(f"ant_num_clusters must be an int in [1, {self.num_timesteps}], got {num_clusters!r}")
        _check_positive("ant_lr", lr)
        self.num_clusters, self.lr = num_clusters, float(lr)
        self.log_vars = nn.Parameter(torch.zeros(num_clusters))  # s_k

    def cluster_index(self, t):
        """(N,) cluster id of each timestep, floor(t K / T)."""
        return cluster_index(t, self.num_timesteps, self.num_clusters)

    def forward(self, loss, t, global_t=None):
        """Per-sample share (N,) of the objective from the per-sample loss MSE + VB (N,) at timesteps t (N,).

        global_t: the timesteps of the whole global batch when t is this rank's share of it. train.py draws
        them on every rank from the same seeded generator, so each rank counts n_k itself, with no collective.
        Without it, under DDP the counts are summed with one all-reduce of K integers (no host sync either).
        """
        _check_per_sample(loss, t)
        k = self.cluster_index(t)
        if global_t is not None:
            n_k = self.cluster_counts(global_t)  # (K,) samples per cluster in the global batch
        else:
            n_k = self.cluster_counts(t)  # this rank's samples per cluster
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(n_k)  # cluster means over the global batch, as the release's batches give
        global_batch = n_k.sum()  # N, summed on the device: nothing is read back to the host
        share = global_batch.to(loss.dtype) / n_k[k].to(loss.dtype)  # (N,) N / n_k
        s = self.log_vars.to(loss.dtype)[k]
        return share * 0.5 * (torch.exp(-s) * loss / self.num_clusters + s)

    def cluster_counts(self, t):
        """(K,) int64 number of timesteps t (N,) in each cluster; a comparison, since bincount syncs on the GPU."""
        clusters = torch.arange(self.num_clusters, device=t.device)
        return (self.cluster_index(t)[:, None] == clusters).sum(dim=0)  # (N, K) -> (K,)

    def timestep_sampler(self):
        return StratifiedTimestepSampler(self.num_timesteps, self.num_clusters)

    def param_groups(self):
        # own group: higher lr, and no weight decay (AdamW's default 0.01 would pull s_k to 0)
        return [{"params": [self.log_vars], "lr": self.lr, "weight_decay": 0.0}]

    def all_reduce_gradients(self):
        # s_k lives outside the DDP-wrapped model, so DDP does not average its gradient for us
        if dist.is_available() and dist.is_initialized() and self.log_vars.grad is not None:
            dist.all_reduce(self.log_vars.grad, op=dist.ReduceOp.SUM)
            self.log_vars.grad /= dist.get_world_size()


def build_loss_weighting(name, alphas_cumprod, prediction="epsilon", min_snr_gamma=5.0, p2_k=1.0,
                         p2_gamma=1.0, ant_num_clusters=8, ant_lr=0.025):
    """The weighting module called `name` (one of WEIGHTINGS) for a schedule's alphas_cumprod."""
    if name == "vanilla":
        return LossWeighting(alphas_cumprod)
    if name == "min-snr":
        return MinSNRWeighting(alphas_cumprod, prediction=prediction, gamma=min_snr_gamma)
    if name == "p2":
        return P2Weighting(alphas_cumprod, k=p2_k, gamma=p2_gamma)
    if name == "ant-uw":
        return ANTUncertaintyWeighting(alphas_cumprod, num_clusters=ant_num_clusters, lr=ant_lr)
    raise ValueError(f"unknown loss_weighting {name!r}; expected one of {WEIGHTINGS}")


def _check_per_sample(mse, t):
    """Weights are per sample: mse and t must both be (N,)."""
    if mse.dim() != 1 or t.shape != mse.shape:
        raise ValueError(f"expected per-sample mse (N,) and t (N,), got {tuple(mse.shape)} and {tuple(t.shape)}")
