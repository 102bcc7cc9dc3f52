"""Preemption and resume semantics: signals stop after a whole step with a checkpoint and exit 0 (1 and 2
gloo ranks), --resume auto then equals an uninterrupted run bit for bit, and trajectory settings are kept."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from foundation.usage_error import UsageError
from launch.preemption import PreemptionFlag
from float_comparison import intra_op_threads
from test_train import TINY, images, load  # noqa: F401  (the module-scoped image folder fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def run(*argv):
    return train.main(train.parse_args(["--config", TINY, *map(str, argv)]))


def metrics(exp):
    return [json.loads(line) for line in open(f"{exp}/metrics.jsonl")]


def wait_for_steps(path, n, proc, timeout=120):
    """Block until metrics.jsonl (--log-every 1) holds n lines: the training loop is running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(path)


def children(pid):
    """Child process ids (torchrun's workers) from /proc."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def assert_same_state(a, b):
    for key in ("model", "ema", "opt"):
        flat_a, flat_b = a[key], b[key]
        if key == "opt":
            flat_a = {f"{i}.{n}": t for i, s in flat_a["state"].items() for n, t in s.items()}
            flat_b = {f"{i}.{n}": t for i, s in flat_b["state"].items() for n, t in s.items()}
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), key


#################################################################################
#                                    Signals                                    #
#################################################################################

def test_flag_records_the_first_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionFlag() as flag:
        assert not flag.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.stop_requested() and flag.name == "SIGUSR1"  # the first one is reported
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored on exit
    with PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C under torchrun: the terminal's and torchrun's copy
        assert flag.stop_requested() and flag.name == "SIGINT"  # no KeyboardInterrupt mid-step


def test_sigterm_checkpoints_the_current_step_exits_0_and_resume_auto_is_bitwise(tmp_path, images):
    common = ["--config", TINY, "--data-path", images, "--results-dir", str(tmp_path), "--ckpt-every", "1000",
              "--log-every", "1"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *common, "--exp-name", "job",
                             "--resume", "auto", "--max-steps", "100000"], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(tmp_path / "job" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    (name,) = os.listdir(tmp_path / "job" / "checkpoints")
    stopped_at = int(name[:-3])
    assert load(tmp_path / "job" / "checkpoints" / name)["step"] == stopped_at >= 2
    assert f"Stopped by SIGTERM after step {stopped_at}" in out
    assert [m["step"] for m in metrics(tmp_path / "job")] == list(range(1, stopped_at + 1))  # whole steps only

    flags = common[2:] + ["--max-steps", stopped_at + 3]
    with intra_op_threads(1):  # the stopped steps ran with OMP_NUM_THREADS=1: bitwise needs the same threads
        resumed = run(*flags, "--exp-name", "job", "--resume", "auto")  # the requeued job: same command line
        straight = run(*flags, "--exp-name", "straight")
    a = load(f"{resumed}/checkpoints/{stopped_at + 3:07d}.pt")
    assert_same_state(a, load(f"{straight}/checkpoints/{stopped_at + 3:07d}.pt"))
    assert [m["loss"] for m in metrics(resumed)] == [m["loss"] for m in metrics(straight)]


def test_a_signal_to_one_of_two_gloo_ranks_stops_both_after_the_same_step(tmp_path, images):
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), "--config", TINY, "--data-path", images,
                             "--results-dir", str(tmp_path), "--exp-name", "ddp", "--global-batch-size", "8",
                             "--max-steps", "100000", "--ckpt-every", "1000", "--log-every", "1"],
                            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_steps(tmp_path / "ddp" / "metrics.jsonl", 2, proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGUSR1)  # one rank only, as when a signal reaches the ranks apart
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out  # torchrun exits 0 only if both ranks did
    (name,) = os.listdir(tmp_path / "ddp" / "checkpoints")
    ckpt = load(tmp_path / "ddp" / "checkpoints" / name)
    assert ckpt["step"] == int(name[:-3]) == metrics(tmp_path / "ddp")[-1]["step"]
    assert len(ckpt["rng"]) == 2 and len(ckpt["loss_log"]["sums"]) == 2  # both ranks joined the save
    assert "Stopped by a signal on another rank" in out or "Stopped by SIGUSR1" in out


#################################################################################
#                               Resume semantics                                #
#################################################################################

def test_loss_log_after_resume_equals_a_straight_run(tmp_path, images):
    # log every 3 steps, stop at step 4: the line at step 6 averages steps 4, 5, 6 in both runs
    common = ["--data-path", images, "--results-dir", tmp_path, "--log-every", 3, "--ckpt-every", 100]
    straight = run(*common, "--exp-name", "straight", "--max-steps", 6)
    run(*common, "--exp-name", "resumed", "--max-steps", 4)
    resumed = run(*common, "--exp-name", "resumed", "--max-steps", 6, "--resume", "auto")
    assert [m["step"] for m in metrics(resumed)] == [3, 6]
    assert [m["loss"] for m in metrics(resumed)] == [m["loss"] for m in metrics(straight)]


def test_new_lr_is_applied_logged_and_recorded_and_trajectory_changes_are_refused(tmp_path, images):
    common = ["--data-path", images, "--results-dir", tmp_path, "--exp-name", "run", "--resume", "auto"]
    exp = run(*common, "--max-steps", 2)
    exp = run(*common, "--max-steps", 3, "--lr", "0.5")
    ckpt = load(f"{exp}/checkpoints/0000003.pt")
    assert ckpt["opt"]["param_groups"][0]["lr"] == 0.5 == ckpt["args"]["lr"]
    assert "Learning rate changed on resume: 0.0001 -> 0.5" in open(f"{exp}/log.txt").read()
    cases = [(["--global-batch-size", 8], "--global-batch-size 4 in the checkpoint, 8 now"),
             (["--global-seed", 1], "--global-seed 0 in the checkpoint, 1 now"),
             (["--ema-decay", 0.99], "--ema-decay 0.9999 in the checkpoint, 0.99 now"),
             ]
    fewer = tmp_path / "fewer-images"  # the data moved and lost 4 images: another epoch layout
    shutil.copytree(images, fewer)
    for name in sorted(os.listdir(fewer / "a"))[:4]:
        os.remove(fewer / "a" / name)
    cases.append((["--data-path", fewer], "dataset num samples 24 in the checkpoint, 20 now"))
    for flags, message in cases:
        with pytest.raises(UsageError, match=message):  # one line, exit code 2 on the command line
            run(*common, "--max-steps", 4, *flags)
    with pytest.raises(ValueError, match="loss_weighting: checkpoint 'vanilla' vs this run 'p2'"):
        run(*common, "--max-steps", 4, "--loss-weighting", "p2")
    assert sorted(os.listdir(f"{exp}/checkpoints")) == ["0000002.pt", "0000003.pt"]  # nothing written
