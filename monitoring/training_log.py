"""What train.py reports while it runs: log.txt (rank 0) and metrics.jsonl, one JSON line per --log-every steps.

metrics.jsonl lines are {"step", "loss", "steps_per_sec", "images_per_sec", "peak_mem_gb"}; the loss is the
mean over every rank and every step since the previous line. read_metrics gives them back (demo.py).
"""
import json
import logging
import os
import resource
import time

import torch
import torch.distributed as dist

from foundation.atomic_file import atomic_write
from monitoring.progress import console_handler, file_handler


def create_logger(logging_dir, rank):
    """Rank 0 logs to the console and <logging_dir>/log.txt; other ranks log nothing."""
    logger = logging.getLogger(f"train.{os.path.abspath(logging_dir) if logging_dir else rank}")
    logger.propagate = False
    close_logger(logger)
    if rank == 0:  # colour and the progress bar on a terminal only; log.txt gets plain lines
        for handler in (console_handler(), file_handler(f"{logging_dir}/log.txt")):
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def close_logger(logger):
    """Detach and close handlers so repeated in-process runs do not leak file handles."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def peak_memory_gb(device):
    """Peak accelerator memory allocated, or peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def read_metrics(metrics_path):
    """The lines of a metrics.jsonl as dicts, in step order."""
    with open(metrics_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(metrics_path, step):
    """Drop metrics logged after `step` (written before a crash, redone after resume); atomic rewrite."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(metrics_path, lambda f: f.writelines(kept), mode="w")


class LossLog:
    """The running loss since the last log line, and the line itself (log.txt and metrics.jsonl)."""

    def __init__(self, metrics_path, logger, global_batch_size, rank, world_size, device):
        self.metrics_path, self.logger = metrics_path, logger
        self.global_batch_size, self.rank, self.world_size, self.device = global_batch_size, rank, world_size, device
        self.running_loss = torch.zeros((), device=device)  # sum of this rank's losses since the last line
        self.steps = 0                                      # steps in that sum (carried over a resume)
        self.timed_steps, self.start_time = 0, time.time()  # steps/s counts this process's steps only

    def add(self, loss):
        """Count one step's loss (a 0-dim tensor; no device sync)."""
        self.running_loss += loss
        self.steps += 1
        self.timed_steps += 1

    def state(self):
        """{"sums": (world_size,) every rank's running sum, "steps"}: saved so the next line survives a resume."""
        sums = [self.running_loss.detach().float().cpu().reshape(1)]
        if self.world_size > 1:
            gathered = [torch.zeros_like(self.running_loss).reshape(1) for _ in range(self.world_size)]
            dist.all_gather(gathered, self.running_loss.detach().reshape(1))
            sums = [s.float().cpu() for s in gathered]
        return {"sums": torch.cat(sums), "steps": self.steps}

    def restore(self, state):
        """Continue the sums of a checkpoint's state() (another world size: every rank takes the mean)."""
        sums = state["sums"]
        self.running_loss.fill_(sums[self.rank] if len(sums) == self.world_size else sums.mean())
        self.steps = state["steps"]

    def write(self, step, lr=None):
        """Log the mean loss over ranks and steps since the last line, the speed and peak memory; reset.

        Returns the line's {"loss", "steps_per_sec", "images_per_sec", "peak_mem_gb"} and "lr" (the last step's
        learning rate) if given, as written to metrics.jsonl (for TensorBoard)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        steps_per_sec = self.timed_steps / (time.time() - self.start_time)
        mean_loss = self.running_loss / self.steps
        if self.world_size > 1:
            dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)
            mean_loss = mean_loss / self.world_size
        loss, mem, images_per_sec = mean_loss.item(), peak_memory_gb(self.device), steps_per_sec * self.global_batch_size
        self.logger.info(f"(step={step:07d}) Train Loss: {loss:.4f}, Train Steps/Sec: {steps_per_sec:.2f}, "
                         f"Images/Sec: {images_per_sec:.1f}, Peak Mem: {mem:.2f} GB")
        scalars = {"loss": loss, "steps_per_sec": steps_per_sec, "images_per_sec": images_per_sec, "peak_mem_gb": mem}
        if lr is not None:
            scalars["lr"] = lr
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        self.running_loss.zero_()
        self.steps, self.timed_steps, self.start_time = 0, 0, time.time()
        return scalars
