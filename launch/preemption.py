"""Stop cleanly when the cluster asks: SIGTERM, SIGUSR1 or SIGINT end the run after the current step.

SLURM sends SIGTERM (preemption, scancel) or the signal of `#SBATCH --signal=USR1@180` (time limit) some
time before its SIGKILL; torchrun passes SIGTERM and SIGINT on to its workers. A signal may reach the
ranks at different moments, or only some of them, so the flag is summed over ranks at every step
boundary: all ranks see the same answer after the same step, rank 0 checkpoints that step, and every
rank leaves the loop and exits 0. The exchange goes through a gloo group on CPU tensors, so it never
waits for the GPU's queued work (a device all-reduce would cost a host-GPU sync per step).
"""
import signal

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_preemption_signals(worker_id=None):
    """DataLoader worker_init_fn: workers leave stopping to the main process (SLURM signals them too)."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class PreemptionFlag:
    """Records the first preemption signal; stop_requested() tells every rank whether any rank got one."""

    def __init__(self, world_size=1):
        self.world_size = world_size
        self.signum = None
        self.failed = False  # set by stop_requested: some rank failed
        self.previous = {}
        # gloo carries the flag on CPU; under a gloo default group (CPU runs) that group is reused
        self.group = None
        if world_size > 1 and dist.is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")

    def __enter__(self):
        for signum in PREEMPTION_SIGNALS:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        return False

    def handle(self, signum, frame):
        """Signal handler: remember the first signal. Repeats are ignored: Ctrl-C under torchrun reaches a
        worker twice (from the terminal and forwarded by torchrun); Ctrl-\\ (SIGQUIT) still stops at once."""
        if self.signum is None:
            self.signum = signum

    def stop_requested(self, failed=False):
        """True on every rank if any rank received a preemption signal or passed failed=True (a collective: all
        ranks call it). Afterwards self.failed says whether some rank failed (an image it cannot read)."""
        flags = torch.tensor([self.signum is not None, failed], dtype=torch.int32)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        self.failed = bool(flags[1])
        return bool(flags.any())

    def any_rank(self, flag):
        """True on every rank if `flag` is True on any rank (a collective on the same CPU group)."""
        if self.world_size == 1:
            return bool(flag)
        value = torch.tensor([bool(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    @property
    def name(self):
        """The signal's name ("SIGTERM"), or "a signal on another rank" where this rank saw none."""
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
