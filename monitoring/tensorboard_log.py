"""Optional TensorBoard scalars (--tensorboard): loss, loss per timestep bucket, speed, memory, learning rate.

The tensorboard package is an optional extra (pip install -e ".[tensorboard]"); without --tensorboard
nothing here is imported. Loss per timestep bucket shows where in t the model improves (the tasks DTR
separates, Sec. 4): buckets of NUM_BUCKETS equal ranges of t, each averaged over all ranks' samples.
"""
import importlib.util
import os

import torch
import torch.distributed as dist

NUM_BUCKETS = 10


def tensorboard_available():
    """Whether torch.utils.tensorboard can be used (the tensorboard package is installed)."""
    return importlib.util.find_spec("tensorboard") is not None


class TimestepBucketLoss:
    """Sums of per-sample losses and counts in NUM_BUCKETS ranges of t, on the device (no sync per step)."""

    def __init__(self, num_timesteps, device):
        self.num_timesteps = num_timesteps
        self.sums = torch.zeros(NUM_BUCKETS, device=device, dtype=torch.float64)
        self.counts = torch.zeros(NUM_BUCKETS, device=device, dtype=torch.float64)

    def add(self, t, losses):
        """t (B,) timesteps and losses (B,) per-sample losses of one step."""
        bucket = (t * NUM_BUCKETS // self.num_timesteps).clamp(max=NUM_BUCKETS - 1)
        self.sums.index_add_(0, bucket, losses.detach().to(self.sums.dtype))
        self.counts.index_add_(0, bucket, torch.ones_like(self.counts[bucket]))

    def means(self, world_size):
        """{"loss_t000-099": mean, ...} over every rank's samples since the last call (all ranks call it)."""
        both = torch.stack([self.sums, self.counts])  # (2, NUM_BUCKETS)
        if world_size > 1:
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
        self.sums.zero_()
        self.counts.zero_()
        sums, counts = both.tolist()
        width = self.num_timesteps // NUM_BUCKETS
        return {f"loss_t{k * width:03d}-{(k + 1) * width - 1:03d}": s / c
                for k, (s, c) in enumerate(zip(sums, counts)) if c > 0}


class TensorBoardLog:
    """Rank 0's SummaryWriter in <run>/tensorboard; other ranks hold a writer that writes nothing."""

    def __init__(self, run_dir, rank):
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
            self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))

    def scalars(self, step, values, prefix="train"):
        """One add_scalar per {name: value} at this step."""
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
