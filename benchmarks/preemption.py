"""
How fast a preempted train.py gets out, and what --keep-last keeps on disk (issue: runs that survive clusters).

    python -m benchmarks.preemption --model DiT-S/2 --batch-size 32 --threads 2

1. SIGTERM latency: train.py runs DiT-S/2 in pixel space on 32x32 Fashion-MNIST (256 tokens, the token count of
   a 256px latent model) until two steps are logged; then SIGTERM, and the time until the process has exited:
   the rest of the running step, the checkpoint of that step, shutdown. Repeated --repeats times.
2. Disk: --ckpt-every 1 for 10 steps with --keep-last 2: bytes left in checkpoints/, and one checkpoint's size.
Prints one JSON line per measurement.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from imagedata.fashion_mnist import DEBIAN_FASHION_MNIST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(args, results_dir, *extra):
    """train.py on Fashion-MNIST in pixel space, one process."""
    return [sys.executable, os.path.join(ROOT, "train.py"), "--model", args.model, "--data-path", args.data_path,
            "--vae", "none", "--image-size", "32", "--num-classes", "10", "--global-batch-size", str(args.batch_size),
            "--num-workers", "0", "--log-every", "1", "--results-dir", results_dir, *map(str, extra)]


def logged_steps(path):
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def sigterm_latency(args, results_dir):
    """Seconds from SIGTERM (sent while step 3 runs) to the exit of train.py, and its exit code."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(train_command(args, results_dir, "--exp-name", "latency", "--max-steps", 100_000,
                                          "--ckpt-every", 100_000), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    metrics = os.path.join(results_dir, "latency", "metrics.jsonl")
    while logged_steps(metrics) < 2:
        if proc.poll() is not None:
            raise RuntimeError(f"train.py exited early with {proc.returncode}")
        time.sleep(0.01)
    lines = [json.loads(line) for line in open(metrics)]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    return time.time() - sent, code, 1 / lines[-1]["steps_per_sec"]


def keep_last_bytes(args, results_dir):
    """(bytes in checkpoints/ after 10 checkpoints with --keep-last 2, files left, bytes of one checkpoint)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    subprocess.run(train_command(args, results_dir, "--exp-name", "disk", "--max-steps", 10, "--ckpt-every", 1,
                                 "--keep-last", 2), env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    folder = os.path.join(results_dir, "disk", "checkpoints")
    sizes = {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}
    return sum(sizes.values()), sorted(sizes), max(sizes.values())


def main(args):
    with tempfile.TemporaryDirectory(dir=args.work_dir) as results_dir:
        for repeat in range(args.repeats):
            seconds, code, step_seconds = sigterm_latency(args, os.path.join(results_dir, str(repeat)))
            print(json.dumps({"measure": "sigterm_to_exit_s", "model": args.model, "batch": args.batch_size,
                              "threads": args.threads, "seconds": round(seconds, 3), "exit_code": code,
                              "step_seconds": round(step_seconds, 3)}), flush=True)
        total, kept, one = keep_last_bytes(args, results_dir)
        print(json.dumps({"measure": "keep_last_2_after_10_checkpoints", "model": args.model, "bytes": total,
                          "files": kept, "one_checkpoint_bytes": one, "without_pruning_bytes": 10 * one}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", type=str, default="DiT-S/2")
    parser.add_argument("--data-path", type=str, default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--batch-size", type=int, default=32, help="one GPU's share of the paper's batch 256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=str, default=None, help="where the temporary run folders go")
    main(parser.parse_args())
