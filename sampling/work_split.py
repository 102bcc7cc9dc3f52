"""Balanced split of sample_ddp's work over ranks: no rank waits for more than one batch at the end.

Official DiT gives every rank the same number of batches by overshooting N and trimming; shards dealt
round-robin (shard k to rank k mod world size) leave ranks a whole shard apart (50 shards on 8 GPUs:
7,7,6,6,6,6,6,6). Here the samples still missing, [0, N) minus the finished shards, are cut into
batches of B consecutive indices, starting at each gap's start, and each rank takes a contiguous run of
floor or ceil(batches / world size) of them, saved as shards of up to shard_size // B batches.
Shards end on batch boundaries, so the gaps a killed run leaves start on the same grid [kB, (k+1)B):
every sample is computed in the same batch, hence byte-identical output for any world size and after
any number of kills and reruns with the same B.
"""


def missing_intervals(n, finished):
    """[start, stop) ranges of [0, n) not covered by the finished (start, stop) shards, in order."""
    gaps, position = [], 0
    for start, stop in sorted(finished):
        if start > position:
            gaps.append((position, start))
        position = max(position, stop)
    if position < n:
        gaps.append((position, n))
    return gaps


def batches_of(intervals, batch_size):
    """Cut each interval into consecutive batches (start, stop) of batch_size indices (the last may be short)."""
    return [(first, min(first + batch_size, stop)) for start, stop in intervals
            for first in range(start, stop, batch_size)]


def rank_batches(batches, world_size, rank):
    """The contiguous run of batches for `rank`: the first len % world_size ranks take one more."""
    per_rank, extra = divmod(len(batches), world_size)
    begin = rank * per_rank + min(rank, extra)
    return batches[begin: begin + per_rank + (rank < extra)]


def group_into_shards(batches, batches_per_shard):
    """Consecutive, touching batches grouped into shards of at most batches_per_shard: [[batch, ...], ...]."""
    shards = []
    for batch in batches:
        if shards and len(shards[-1]) < batches_per_shard and shards[-1][-1][1] == batch[0]:
            shards[-1].append(batch)
        else:
            shards.append([batch])
    return shards


def rank_shards(n, finished, batch_size, shard_size, world_size, rank):
    """The shards this rank samples, each a list of (start, stop) batches: the whole split in one call."""
    batches = batches_of(missing_intervals(n, finished), batch_size)
    return group_into_shards(rank_batches(batches, world_size, rank), max(1, shard_size // batch_size))
