"""launch/process_group.py: SLURM's variables join one gloo group without torchrun; --device; node lists."""
import os
import subprocess
import sys

import pytest
import torch

from foundation.usage_error import UsageError
from launch.process_group import default_num_workers, first_host, resolve_device, setup_distributed, slurm_environment
from test_train import TINY, images, load  # noqa: F401  (the module-scoped image folder fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_num_workers_default_is_official_four_or_the_cpus_this_process_may_use(monkeypatch):
    import extract_features
    import train
    for cpus, expected in ((2, 2), (64, 4)):  # a 2-core machine: 2 (torch's DataLoader warns above), a node: 4
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert default_num_workers() == expected
        assert train.build_parser().parse_args([]).num_workers == expected
        assert extract_features.build_parser().parse_args(["--data-path", "x"]).num_workers == expected


@pytest.mark.parametrize("nodelist, host", [
    ("node7", "node7"),
    ("gpu-[003-004,010],cpu1", "gpu-003"),
    ("gpu-[010,003-004]", "gpu-010"),
    ("a1,b[1-2]", "a1"),
    ("rack[2-3]-node[07-08]", "rack2-node07"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_variables_map_to_torchrun_ones_one_task_is_no_group_and_the_batch_script_is_refused():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu-[011-012]", "SLURM_STEP_NUM_TASKS": "16"}
    assert slurm_environment(env) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                      "MASTER_ADDR": "gpu-011", "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert slurm_environment({**env, "SLURM_NTASKS": "1"}) is None  # `python train.py` in an allocation
    assert slurm_environment({}) is None
    batch_script = {k: v for k, v in env.items() if k != "SLURM_STEP_NUM_TASKS"}  # no srun: not a task
    with pytest.raises(UsageError, match="has 16 tasks but this process was not started by srun"):
        slurm_environment(batch_script)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_an_error_and_auto_falls_back_to_cpu():
    with pytest.raises(UsageError, match="--device cuda but no CUDA device is visible"):
        setup_distributed("cuda")
    assert resolve_device("auto") == "cpu"
    assert setup_distributed("auto")[:2] == (0, 1)
    with pytest.raises(UsageError, match="--dist-timeout must be > 0"):
        setup_distributed("auto", 0)


def test_two_srun_style_tasks_join_one_gloo_group_without_torchrun(tmp_path, images):
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", SLURM_PROCID=str(rank),
                   SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="localhost",
                   SLURM_JOB_ID=str(os.getpid() % 20000))  # a port no other test run shares
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, "--data-path", images,
             "--results-dir", str(tmp_path), "--exp-name", "srun", "--global-batch-size", "8", "--max-steps", "2",
             "--dist-timeout", "2"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ckpt = load(tmp_path / "srun" / "checkpoints" / "0000002.pt")
    assert len(ckpt["rng"]) == 2 and len(ckpt["loss_log"]["sums"]) == 2  # one group of two ranks
    log = open(tmp_path / "srun" / "log.txt").read()
    assert "slurm: 2 process(es), device cpu (cpu), backend gloo" in log
    assert "global batch 8 = 2 ranks x 4" in log
