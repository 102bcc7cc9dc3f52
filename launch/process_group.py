"""torch.distributed setup shared by train.py, extract_features.py and sample_ddp.py: torchrun, SLURM or one process.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` without torchrun (one task
per GPU), the same values come from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, the master address is
the first host of SLURM_JOB_NODELIST and the port is derived from SLURM_JOB_ID, so every task computes
the same rendezvous. Anything else (no launcher, or a SLURM job of one task) runs as one process; a plain
`python` in the batch script of a multi-task job is an error (it would train alone, or wait for peers).
The backend follows the device, never a hard-coded name: nccl on GPU, gloo on CPU.
"""
import datetime
import os
import re

import torch
import torch.distributed as dist

from foundation.flag_types import finite_float
from foundation.usage_error import UsageError

DEVICES = ("auto", "cuda", "cpu")
DEFAULT_TIMEOUT_MINUTES = 30  # longest collective wait: ranks at a barrier while rank 0 writes a 7 GB checkpoint
OFFICIAL_NUM_WORKERS = 4      # official DiT's --num-workers


def default_num_workers():
    """Data-loader workers per process: official DiT's 4, or as many as the CPUs this process may use if fewer
    (torch's DataLoader warns above that: on a 2-core machine the official 4 oversubscribe it)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS
        cpus = os.cpu_count() or 1
    return min(OFFICIAL_NUM_WORKERS, cpus)


def add_launch_arguments(parser):
    """--device and --dist-timeout, the same in every script that joins a process group."""
    group = parser.add_argument_group("launch")
    group.add_argument("--device", type=str, choices=DEVICES, default="auto",
                       help="auto = cuda if a GPU is visible, else cpu; cuda makes a missing GPU an error")
    group.add_argument("--dist-timeout", type=finite_float, default=DEFAULT_TIMEOUT_MINUTES,
                       help="minutes a rank may wait in a collective (init, barriers) before the job fails")
    return group


def first_host(nodelist):
    """The first host of a SLURM node list: 'gpu-[003-004,010],cpu1' -> 'gpu-003'."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first comma outside brackets ends the first entry
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    # each bracket group [a-b,c] stands for its hosts' suffixes: keep the first value of each
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end])


def slurm_environment(environ):
    """torchrun's variables from SLURM's, or None when the job has a single task."""
    if "SLURM_PROCID" not in environ or int(environ.get("SLURM_NTASKS", "1")) < 2:
        return None
    if "SLURM_STEP_NUM_TASKS" not in environ:  # set by srun only: this is the batch script itself
        raise UsageError(f"the SLURM job has {environ['SLURM_NTASKS']} tasks but this process was not started by "
                         "srun: launch with `srun python ...` (one task per GPU) or torchrun, or ask for one task")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
    return {
        "RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR", first_host(nodelist)),
        "MASTER_PORT": environ.get("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)),
    }


def resolve_device(device):
    """'auto' -> cuda if available else cpu; 'cuda' without a visible GPU is an error naming why."""
    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda but no CUDA device is visible (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, torch {torch.__version__} built "
                         f"with CUDA {torch.version.cuda})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def setup_distributed(device="auto", timeout_minutes=DEFAULT_TIMEOUT_MINUTES):
    """(rank, world_size, device): join the torchrun or SLURM process group, or run as one process."""
    if not timeout_minutes > 0:
        raise UsageError(f"--dist-timeout must be > 0 minutes, got {timeout_minutes}")
    kind = resolve_device(device)
    if "RANK" not in os.environ:
        slurm = slurm_environment(os.environ)
        if slurm is None:
            return 0, 1, torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")
        os.environ.update(slurm)  # init_process_group's env:// rendezvous reads these
    dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    if kind == "cuda":
        # one task per GPU may see only its own GPU (srun --gpus-per-task=1): index within what is visible
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank())) % torch.cuda.device_count()
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def describe_distributed(world_size, device):
    """One log line: launcher, world size, device and backend."""
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "slurm" if world_size > 1 and \
        "SLURM_PROCID" in os.environ else "single process" if world_size == 1 else "env://"
    backend = dist.get_backend() if dist.is_initialized() else "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{launcher}: {world_size} process(es), device {device} ({name}), backend {backend}"


def cleanup_distributed():
    """Destroy the process group if one was created (safe to call in a finally block)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
