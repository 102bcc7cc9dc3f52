"""Pins diffusion/timestep_sampler.py: uniform and cluster-stratified training timesteps."""

import pytest
import torch

from diffusion import create_diffusion
from diffusion.timestep_sampler import (StratifiedTimestepSampler, UniformTimestepSampler, cluster_index,
                                        uniform_cluster_bounds)


def test_weightings_pick_their_sampler():
    assert type(create_diffusion("").timestep_sampler) is UniformTimestepSampler
    assert type(create_diffusion("", loss_weighting="min-snr").timestep_sampler) is UniformTimestepSampler
    sampler = create_diffusion("", loss_weighting="ant-uw").timestep_sampler
    assert isinstance(sampler, StratifiedTimestepSampler) and sampler.num_clusters == 8


def test_uniform_sampler_covers_range_and_is_seeded():
    s = UniformTimestepSampler(1000)
    t = s.sample_timesteps(4096, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999 and len(t.unique()) > 900
    again = s.sample_timesteps(4096, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    t_official, weights = s.sample(5, "cpu")
    assert t_official.shape == (5,) and torch.equal(weights, torch.ones(5))


def test_stratified_sampler_gives_each_cluster_equal_share_when_divisible():
    s = StratifiedTimestepSampler(1000, 8)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        t = s.sample_timesteps(32, "cpu", generator=gen)
        assert torch.equal(torch.bincount(cluster_index(t, 1000, 8), minlength=8), torch.full((8,), 4))


def test_stratified_sampler_gives_remainder_to_distinct_rotating_clusters():
    s = StratifiedTimestepSampler(1000, 8)
    gen = torch.Generator().manual_seed(2)
    extra_clusters = set()
    for _ in range(20):
        t = s.sample_timesteps(35, "cpu", generator=gen)
        counts = torch.bincount(cluster_index(t, 1000, 8), minlength=8)
        assert len(t) == 35 and set(counts.tolist()) == {4, 5} and (counts == 5).sum() == 3
        extra_clusters |= set(torch.nonzero(counts == 5).flatten().tolist())
    assert extra_clusters == set(range(8))  # every cluster gets the extra sample sometimes


def test_stratified_timesteps_stay_inside_their_cluster_and_cover_it():
    s = StratifiedTimestepSampler(1000, 8)
    t = s.sample_timesteps(8000, "cpu", generator=torch.Generator().manual_seed(3))
    bounds = uniform_cluster_bounds(1000, 8)
    for k in range(8):
        in_k = t[k * 1000:(k + 1) * 1000]  # grouped by cluster, 1000 each
        assert in_k.min() >= bounds[k] and in_k.max() < bounds[k + 1]
        assert len(in_k.unique()) > 110  # ~all 125 timesteps of the cluster appear


def test_cluster_bounds_agree_with_cluster_index_for_non_divisible_steps():
    bounds = uniform_cluster_bounds(250, 8)
    k = cluster_index(torch.arange(250), 250, 8)
    for j in range(8):
        assert torch.equal(torch.nonzero(k == j).flatten(), torch.arange(bounds[j], bounds[j + 1]))


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_bad_batch_size_is_a_value_error(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        StratifiedTimestepSampler(1000, 8).sample_timesteps(batch_size, "cpu")
