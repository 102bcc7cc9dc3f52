"""One DataLoader for a whole run whose worker processes persist across epochs, with exact resume.

Flips depend on (seed, epoch, index) (imagedata.flip), and a persistent worker keeps its copy of the dataset
from the first epoch; so the loader asks for samples as (epoch, index) and the worker's copy switches to
that epoch itself. The main process picks the order: this rank's share of the epoch (DistributedSampler)
from a batch position on, so a resumed run skips exactly the batches it has done.
"""
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochIndexed(Dataset):
    """reader indexed by (epoch, index): sets the epoch of `dataset` (the copy in this process) before reading.

    reader: the dataset itself, or a wrapper around it (e.g. unreadable_images.ReportUnreadable); both are
    pickled into a worker together, so the worker's reader reads the worker's dataset.
    """

    def __init__(self, dataset, reader=None):
        self.dataset, self.reader = dataset, dataset if reader is None else reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, key):
        epoch, index = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        return self.reader[index]


class EpochOrder(Sampler):
    """(epoch, index) keys of this rank's share of one epoch, from a batch position on; start() selects them."""

    def __init__(self, distributed_sampler, local_batch_size):
        self.distributed_sampler, self.local_batch_size = distributed_sampler, local_batch_size
        self.keys = []

    def start(self, epoch, position):
        """Serve epoch `epoch` with its first `position` batches skipped."""
        self.distributed_sampler.set_epoch(epoch)
        self.keys = [(epoch, i) for i in list(self.distributed_sampler)[position * self.local_batch_size:]]

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


class EpochLoader:
    """iter(loader.epoch(epoch, position)) gives the rest of an epoch; the workers (num_workers > 0) live on."""

    def __init__(self, dataset, distributed_sampler, local_batch_size, num_workers, pin_memory=False,
                 worker_init_fn=None, wrap=None):
        """wrap(dataset) -> what the loader reads, e.g. a ReportUnreadable around it (default: the dataset)."""
        self.dataset = dataset
        self.order = EpochOrder(distributed_sampler, local_batch_size)
        reader = dataset if wrap is None else wrap(dataset)
        self.loader = DataLoader(EpochIndexed(dataset, reader), batch_size=local_batch_size, sampler=self.order,
                                 num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory,
                                 drop_last=True, worker_init_fn=worker_init_fn)

    def epoch(self, epoch, position=0):
        """The loader, set to iterate the batches of `epoch` after the first `position` ones."""
        self.order.start(epoch, position)
        self.dataset.set_epoch(epoch)  # the main process's copy too (num_workers = 0 reads from it)
        return self.loader
