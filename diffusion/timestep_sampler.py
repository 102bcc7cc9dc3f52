"""Training timestep samplers: uniform t ~ U{0..T-1} (DDPM Alg. 1) and cluster-stratified (ANT, Go et al. 2023)."""

import torch


def uniform_cluster_bounds(num_timesteps, num_clusters):
    """Edges b_0 = 0 < ... < b_K = T of K contiguous clusters; cluster k is [b_k, b_{k+1}), b_k = ceil(k T / K)."""
    if not isinstance(num_clusters, int) or not 1 <= num_clusters <= num_timesteps:
        raise ValueError(f"num_clusters must be an int in [1, {num_timesteps}], got {num_clusters!r}")
    # ceil(kT/K) is exactly the set where t * K // T == k starts, so bounds and cluster_index agree for any T
    return [-(-k * num_timesteps // num_clusters) for k in range(num_clusters + 1)]


def cluster_index(t, num_timesteps, num_clusters):
    """Cluster id of each timestep: floor(t K / T), consistent with uniform_cluster_bounds."""
    return torch.div(t * num_clusters, num_timesteps, rounding_mode="floor")


def _on_generator_device(device, generator):
    """Draw on the generator's device (torch requires it), then move to the target device."""
    return generator.device if generator is not None else torch.device(device)


class UniformTimestepSampler:
    """t ~ U{0, ..., T-1} independently per sample (DDPM Alg. 1)."""

    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps

    def sample_timesteps(self, batch_size, device, generator=None):
        """(batch_size,) int64 timesteps on device."""
        _check_batch_size(batch_size)
        draw_device = _on_generator_device(device, generator)
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=draw_device, generator=generator)
        return t.to(device)

    def sample(self, batch_size, device):
        """Official ADM / DiT ScheduleSampler API: (timesteps, importance weights = 1)."""
        t = self.sample_timesteps(batch_size, device)
        return t, torch.ones(batch_size, device=device)


class StratifiedTimestepSampler(UniformTimestepSampler):
    """Batch split evenly over K uniform timestep clusters, t uniform inside its cluster (ANT-UW batches).

    Rule for a batch size N not divisible by K: every cluster gets floor(N / K) samples and
    N mod K distinct clusters, drawn uniformly without replacement from `generator` each call,
    get one extra, so every cluster expects exactly N / K samples. Nothing is dropped.
    Samples are returned grouped by cluster (cluster 0 first); order does not affect the loss.
    """

    def __init__(self, num_timesteps, num_clusters=8):
        super().__init__(num_timesteps)
        self.num_clusters = num_clusters
        self.bounds = uniform_cluster_bounds(num_timesteps, num_clusters)
        self._bounds_by_device = {}  # the bounds as a tensor, copied to each device once

    def cluster_counts(self, batch_size, generator=None, device="cpu"):
        """(K,) number of samples per cluster for one batch, following the rule in the class docstring."""
        _check_batch_size(batch_size)
        K = self.num_clusters
        base, remainder = divmod(batch_size, K)
        counts = torch.full((K,), base, dtype=torch.long, device=device)
        if remainder:
            extra = torch.randperm(K, device=device, generator=generator)[:remainder]
            counts[extra] += 1
        return counts

    def sample_timesteps(self, batch_size, device, generator=None):
        """(batch_size,) int64 timesteps on device, stratified over clusters."""
        draw_device = _on_generator_device(device, generator)
        counts = self.cluster_counts(batch_size, generator, draw_device)
        bounds = self._bounds_by_device.get(draw_device)
        if bounds is None:
            bounds = self._bounds_by_device[draw_device] = torch.tensor(self.bounds, dtype=torch.long, device=draw_device)
        # output_size: the length is known on the host, so the GPU need not read the counts back
        cluster = torch.repeat_interleave(torch.arange(self.num_clusters, device=draw_device), counts,
                                          output_size=batch_size)  # (N,)
        low, width = bounds[cluster], bounds[cluster + 1] - bounds[cluster]
        u = torch.rand(batch_size, device=draw_device, generator=generator, dtype=torch.float64)
        # min() guards the u -> 1 rounding edge so t never leaves its cluster
        t = low + torch.minimum((u * width).long(), width - 1)
        return t.to(device)


def _check_batch_size(batch_size):
    """Reject batch sizes that cannot be sampled."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
