"""torch.distributed setup shared by the torchrun scripts (train.py, extract_features.py, sample_ddp.py)."""
import os

import torch
import torch.distributed as dist


def setup_distributed():
    """(rank, world_size, device): a process group under torchrun (nccl on GPU, gloo on CPU), else one process.

    The backend follows the hardware, never a hard-coded name; multi-node jobs use torchrun's rendezvous.
    """
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def cleanup_distributed():
    """Destroy the process group if one was created (safe to call in a finally block)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
