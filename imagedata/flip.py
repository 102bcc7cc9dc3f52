"""Reproducible random horizontal flip: the coin depends only on (seed, epoch, index)."""
import numpy as np


def flip_decision(seed, epoch, index):
    """Return True if sample `index` is flipped in `epoch` (paper setting: random hflip, Sec. 5).

    The coin comes from a hash of (seed, epoch, index), not from global RNG state, so a resumed
    run only needs (epoch, position in epoch, sampler seed) to reproduce every flip exactly.
    """
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    state = np.random.SeedSequence((int(seed), int(epoch), int(index))).generate_state(1)
    return bool(state[0] & 1)


class SeededFlip:
    """Mixin for datasets whose flip is a function of (seed, epoch, index); call set_epoch each epoch."""

    def _init_flip(self, flip, seed):
        self.flip = bool(flip)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch):
        """Select the epoch whose flips __getitem__ returns (like DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def is_flipped(self, index):
        """Whether __getitem__(index) returns the mirrored sample in the current epoch."""
        return self.flip and flip_decision(self.seed, self.epoch, index)
