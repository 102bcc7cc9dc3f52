"""imagedata/epoch_loader.py: persistent workers serve each epoch's flips and resume at a batch position."""
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from imagedata.epoch_loader import EpochLoader
from imagedata.flip import SeededFlip


class Numbers(SeededFlip, Dataset):
    """Sample i is (+i or -i if flipped this epoch, label i)."""

    def __init__(self):
        self._init_flip(True, seed=7)

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.tensor(-index if self.is_flipped(index) else index), torch.tensor(index)


def expected(epoch, skip, rank=0, world_size=2):
    sampler = DistributedSampler(Numbers(), num_replicas=world_size, rank=rank, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(epoch)
    reference = Numbers()
    reference.set_epoch(epoch)
    return [reference[i][0].item() for i in list(sampler)[skip * 2:]]


def test_persistent_workers_follow_the_epoch_and_resume_mid_epoch():
    dataset = Numbers()
    sampler = DistributedSampler(dataset, num_replicas=2, rank=0, shuffle=True, seed=0, drop_last=True)
    loader = EpochLoader(dataset, sampler, local_batch_size=2, num_workers=1)
    assert loader.loader.persistent_workers
    seen = {}
    for epoch, position in ((0, 0), (1, 0), (2, 1)):
        seen[epoch] = [v for x, _ in loader.epoch(epoch, position) for v in x.tolist()]
        assert seen[epoch] == expected(epoch, position)
    assert seen[0] != seen[1]  # another order and other flips: the worker's copy did switch epochs
    workers = loader.loader._iterator._workers
    list(loader.epoch(3))  # iterating again resets the persistent iterator
    assert loader.loader._iterator._workers is workers  # the same processes served the next epoch
