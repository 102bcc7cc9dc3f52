"""sampling/work_split.py: ranks differ by at most one batch, every sample is sampled once, on a fixed grid."""
import random

import pytest

from sampling.work_split import batches_of, group_into_shards, missing_intervals, rank_shards


def split(n, finished, batch_size, shard_size, world_size):
    return [rank_shards(n, finished, batch_size, shard_size, world_size, r) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 8, 16])
def test_ranks_differ_by_at_most_one_batch_and_cover_every_sample_once(world_size):
    for n in list(range(1, 40)) + [1000, 50_000, 50_001]:
        for batch_size in (1, 3, 32):
            per_rank = split(n, [], batch_size, 100, world_size)
            counts = [sum(len(shard) for shard in shards) for shards in per_rank]
            assert max(counts) - min(counts) <= 1, (n, batch_size, counts)
            indices = [i for shards in per_rank for shard in shards for a, b in shard for i in range(a, b)]
            assert sorted(indices) == list(range(n))
    # official DiT's round-robin shards left ranks a whole shard apart: 50 shards on 8 ranks, 7 vs 6
    counts = [sum(len(s) for s in shards) for shards in split(50_000, [], 32, 1000, 8)]
    assert counts == [196] * 3 + [195] * 5  # 1563 batches of 32 (the last holds 16)


def test_after_kills_the_missing_samples_are_rebalanced_on_the_same_batch_grid():
    rng = random.Random(0)
    n, batch_size = 1000, 32
    grid = set(batches_of([(0, n)], batch_size))
    for trial in range(50):
        first = split(n, [], batch_size, rng.choice([32, 64, 200]), rng.choice([1, 3, 8]))
        shards = [(s[0][0], s[-1][1]) for shards in first for s in shards]
        finished = rng.sample(shards, rng.randrange(len(shards)))  # a kill keeps any subset of shards
        world_size = rng.choice([1, 2, 5, 8])
        second = split(n, finished, batch_size, 64, world_size)
        counts = [sum(len(s) for s in shards) for shards in second]
        assert max(counts) - min(counts) <= 1
        batches = [b for shards in second for s in shards for b in s]
        assert set(batches) <= grid  # each sample in the batch it had in an uninterrupted run
        covered = sorted([(a, b) for s in finished for a, b in [s]] + batches)
        assert missing_intervals(n, covered) == [] and sum(b - a for a, b in covered) == n


def test_shards_hold_whole_touching_batches():
    assert missing_intervals(10, [(3, 6), (0, 3)]) == [(6, 10)]
    assert group_into_shards([(0, 3), (3, 6), (6, 9), (12, 15)], 2) == [[(0, 3), (3, 6)], [(6, 9)], [(12, 15)]]
    assert rank_shards(10, [], 3, 2, 1, 0) == [[(0, 3)], [(3, 6)], [(6, 9)], [(9, 10)]]  # shard < batch: 1 batch
