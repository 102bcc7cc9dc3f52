"""An image that fails to decode mid-run: found one batch ahead, so that training stops after a whole step.

The pre-check of train.py (imagedata.image_folder.find_damaged_images: size, header, end marker) cannot see a
file damaged in its body; PIL fails on it only when its batch is loaded, hours in, in a loader worker, on one
rank. Two pieces make that a clean stop:

  * ReportUnreadable wraps the dataset the loader reads: a sample that fails to decode comes back as a
    placeholder with the file and the reason, instead of an exception that kills the worker. With
    skip=True it is replaced by the next readable sample in index order (i+1, i+2, ... mod N) instead:
    a choice that depends only on the index and the files, not on ranks, workers or the resume point, so
    every global batch is still the same whatever the world size, and a resumed run continues bit for bit
    (as if the dataset held that sample twice).
  * BatchesAhead iterates the loader one batch ahead: while step k runs, batch k+1 is already read, and
    `unreadable` names its bad file, if any. train.py passes that to the per-step collective that already
    carries preemption signals (launch/preemption.py), so every rank learns after step k that some rank
    cannot go on, checkpoints step k, and stops. A loader's first batch has no step before it: the ranks
    agree on it with one collective per loader (once per epoch).
"""
import torch
from torch.utils.data import Dataset

from .image_folder import BadImageError


class ReportUnreadable(Dataset):
    """dataset[i] -> (x, y, problem): problem is "" for a good sample, else "PATH: reason" of the file that failed
    (x then a zero placeholder), or with skip=True "skipped PATH: reason, used sample j" (x, y of sample j)."""

    def __init__(self, dataset, skip=False):
        self.dataset, self.skip = dataset, skip

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return (*self.dataset[index], "")
        except BadImageError as error:
            failure = f"{error.path}: {error.reason}"
        if not self.skip:
            x_shape = (self.dataset.channels, self.dataset.resolution, self.dataset.resolution)
            return torch.zeros(x_shape), torch.tensor(-1), failure
        for step in range(1, len(self.dataset)):
            substitute = (index + step) % len(self.dataset)
            try:
                return (*self.dataset[substitute], f"skipped {failure}, used sample {substitute} instead")
            except BadImageError:
                continue
        raise BadImageError(error.path, f"{error.reason}; and no image of the dataset can be read")


class BatchesAhead:
    """Iterate a loader of ReportUnreadable samples one batch ahead, yielding (x, y).

    agree(failed) -> whether any rank failed (a collective every rank calls at the start of each loader);
    report(line) logs skipped files (once per file). After a step, `unreadable` is "PATH: reason" if this
    rank's next batch cannot be read; `stopped_at_start` is True when a loader's first batch could not be
    read on some rank (nothing was yielded).
    """

    def __init__(self, loader, agree, report):
        self.loader, self.agree, self.report = loader, agree, report
        self.unreadable, self.stopped_at_start = None, False
        self._reported = set()

    def _read(self, batches):
        """The next (x, y) and its first problem ("" if none), or None at the end of the loader."""
        batch = next(batches, None)
        if batch is None:
            return None
        x, y, problems = batch
        for problem in problems:
            if problem.startswith("skipped ") and problem not in self._reported:
                self._reported.add(problem)
                self.report(problem)
        failed = [p for p in problems if p and not p.startswith("skipped ")]
        return (x, y), failed[0] if failed else None

    def __iter__(self):
        batches = iter(self.loader)
        current = self._read(batches)
        self.unreadable = current[1] if current is not None else None
        if self.agree(self.unreadable is not None):
            self.stopped_at_start = True
            return
        while current is not None:
            ahead = self._read(batches)
            self.unreadable = ahead[1] if ahead is not None else None
            yield current[0]
            current = ahead
