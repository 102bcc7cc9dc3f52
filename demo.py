"""Fashion-MNIST quick start: train a small class-conditional UNet with DTR, sample it, read its FID (`make demo`).

    python demo.py                  # DTR (Sec. 4): <out>/report.md with the grid, FID, loss curve and masks
    python demo.py --compare        # DTR and vanilla, same seed and data order: both grids, FIDs and losses

Stages, one progress line each: train (torchrun train.py --config), grid (sample.py), samples (torchrun
sample_ddp.py), reference features and sample features (analysis.study's scorer: the evaluator's Inception, FID
against a seeded t10k subset whose features are cached beside it, so later runs skip that stage).
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections import deque

import numpy as np
from tqdm import tqdm

from analysis.masks import mask_panels, plot_masks
from analysis.study import ROUTING_COLORS, ROUTING_LABELS, CheckpointScorer
from evaluations.batch_npz import write_npz_atomic
from evaluations.make_reference import load_reference_images
from foundation.atomic_file import atomic_write
from foundation.flag_types import check_at_least, finite_float
from foundation.usage_error import UsageError
from imagedata.fashion_mnist import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, fashion_mnist_files
from launch.cli import make_output_dir, run_command
from launch.yaml_config import read_config
from models.routing import ROUTING_KINDS
from monitoring.training_log import read_metrics
from sampling.seeded import FID_CFG_SCALE, GRID_CFG_SCALE, SAMPLERS

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
GRID_SAMPLES_PER_CLASS = 8
TRAIN_STEP = re.compile(r"\(step=(\d+)\)")  # train.py's log line
BAR_COUNT = re.compile(r"(\d+)/(\d+) \[")  # a tqdm bar (n/N) drawn by sample.py or sample_ddp.py's rank 0
STAGES = ("reference features", "train", "grid", "samples", "sample features")


#################################################################################
#                                 Stages                                        #
#################################################################################

def clock():
    """(wall, CPU) seconds: CPU is user + system time of this process and its finished children (2 cores, shared
    machine: CPU / cores is what a stage takes on an idle machine, whatever the load)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.time(), own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def since(start):
    """(wall, CPU) seconds since start = clock()."""
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def torchrun_command(nproc):
    """`torchrun --standalone --nproc_per_node=nproc` as this interpreter's module."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def stage_count(groups, total):
    """Units of the stage done from a progress match's groups: (count,), or a bar's (n, N) scaled to the stage's
    total (sample_ddp.py's rank 0 draws only its share)."""
    done = int(groups[0]) if len(groups) == 1 else int(groups[0]) * total // max(int(groups[1]), 1)
    return min(done, total)


def run_stage(name, cmd, log_path, total, progress, threads):
    """Run one script, its output kept in log_path and shown as one progress bar with ETA; (wall, CPU) seconds.

    progress: a regex whose groups are the count done (and the bar's total), read from the script's log lines or
    rank 0's tqdm bar (so two ranks never draw two bars); threads: OMP_NUM_THREADS of each of its processes.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    start, tail = clock(), deque(maxlen=30)
    with open(log_path, "w") as log, tqdm(total=total, desc=f"{name:<18}", unit="it", dynamic_ncols=True) as bar:
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: process.stdout.read1(4096), b""):
            text = chunk.decode(errors="replace")
            log.write(text)
            tail.extend(re.split(r"[\r\n]+", text))
            matches = list(progress.finditer(text))
            done = stage_count(matches[-1].groups(), total) if matches else 0
            if done > bar.n:
                bar.update(done - bar.n)
        process.wait()
    if process.returncode != 0:
        lines = "\n".join(line for line in tail if line.strip())
        raise RuntimeError(f"stage '{name}' failed (exit {process.returncode}); log {log_path}:\n{lines}")
    return since(start)


def train_and_sample(args, config, routing, run_dir, timings):
    """Train one routing, draw its grid and its FID samples; (checkpoint, metrics.jsonl, samples npz)."""
    logs, steps = os.path.join(run_dir, "logs"), config["max_steps"]
    make_output_dir(logs, "--out")
    train_dir = os.path.join(run_dir, "train")
    before = set(os.listdir(train_dir)) if os.path.isdir(train_dir) else set()
    timings["train"] = run_stage(f"train {routing}", torchrun_command(args.nproc) + [
        "train.py", "--config", os.path.abspath(args.config), "--data-path", args.data_path, "--routing", routing,
        "--global-seed", str(args.seed), "--results-dir", train_dir],
        os.path.join(logs, "train.log"), steps, TRAIN_STEP, threads=1)
    created = sorted(set(os.listdir(train_dir)) - before)  # train.py numbers a new experiment folder
    checkpoint = os.path.join(train_dir, created[-1], "checkpoints", f"{steps:07d}.pt")
    if len(created) != 1 or not os.path.isfile(checkpoint):
        raise RuntimeError(f"train.py left no final checkpoint {checkpoint}; log {logs}/train.log")

    grid = os.path.join(run_dir, "grid.png")
    timings["grid"] = run_stage(f"grid {routing}", [
        sys.executable, "sample.py", "--ckpt", checkpoint, "--sampler", args.grid_sampler, "--num-sampling-steps",
        str(args.grid_steps), "--cfg-scale", str(args.grid_cfg_scale), "--samples-per-class",
        str(GRID_SAMPLES_PER_CLASS), "--seed", str(args.seed), "--out", grid],
        os.path.join(logs, "grid.log"), args.grid_steps, BAR_COUNT, threads=args.nproc)

    sample_dir = os.path.join(run_dir, "samples")
    timings["samples"] = run_stage(f"samples {routing}", torchrun_command(args.nproc) + [
        "sample_ddp.py", "--ckpt", checkpoint, "--sample-dir", sample_dir, "--num-fid-samples",
        str(args.num_fid_samples), "--sampler", args.fid_sampler, "--num-sampling-steps", str(args.fid_steps),
        "--cfg-scale", str(args.fid_cfg_scale), "--balanced-classes", "--global-seed", str(args.seed),
        "--per-proc-batch-size", "50", "--shard-size", str(args.num_fid_samples)],
        os.path.join(logs, "samples.log"), args.num_fid_samples, BAR_COUNT, threads=1)
    npz = sorted(f for f in os.listdir(sample_dir) if f.endswith(".npz"))
    if len(npz) != 1:
        raise RuntimeError(f"expected one sample .npz in {sample_dir}, found {npz}")
    return checkpoint, os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "metrics.jsonl"), \
        os.path.join(sample_dir, npz[0])


def reference_batch(args, out_dir):
    """The FID reference: a seeded subset of the t10k split, written once and shared by every run in out_dir."""
    path = os.path.join(out_dir, "reference", f"fashion-mnist-t10k-n{args.ref_images}-seed{args.ref_seed}.npz")
    if not os.path.isfile(path):
        make_output_dir(os.path.dirname(path), "--out")
        images = load_reference_images("fashion-mnist", args.data_path, 28, args.ref_images, args.ref_seed, "t10k")
        write_npz_atomic(path, arr_0=images)
    return path


#################################################################################
#                                 Report                                        #
#################################################################################

def plot_losses(runs, path):
    """Training loss against step of every run on one log-scale plot (matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for routing, run in runs.items():
        rows = read_metrics(run["metrics_jsonl"])
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=ROUTING_COLORS.get(routing),
                label=ROUTING_LABELS.get(routing, routing))
    ax.set(xlabel="training step", ylabel="loss (mse + vb)", yscale="log", title="Training loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def honest_reading(runs):
    """What a one-seed FID gap between DTR and vanilla can mean at this scale (docs/study.md)."""
    if set(runs) != {"dtr", "none"}:
        return []
    gap = runs["dtr"]["FID"] - runs["none"]["FID"]
    return [f"DTR - vanilla = {gap:+.1f} FID, from one seed and {runs['dtr']['N']} samples. docs/study.md measured "
            "this gap over 3 seeds for a small pixel DiT (this demo trains a UNet): DTR ahead early (-20.8 +- 3.8 FID "
            "at 400 steps), behind once vanilla flattens (+7.5 +- 3.6 at 1200 steps), seeds spread by several FID. So "
            "a gap of this size says how the two trained at this short budget, not that DTR is better or worse than "
            "vanilla; the paper's gains are at ImageNet scale and 400K+ steps.", ""]


def seconds(wall_cpu):
    return f"{wall_cpu[0]:.0f} ({wall_cpu[1]:.0f})"


def shown_path(arg):
    """A command-line word for the report: absolute paths (machine-specific) as their name, the repo's relative."""
    if not os.path.isabs(arg):
        return arg
    return os.path.relpath(arg, REPO_ROOT) if arg.startswith(REPO_ROOT + os.sep) else os.path.basename(arg)


def describe_model(checkpoint, config, args):
    """Two report lines, the model and its training, read from the checkpoint train.py wrote."""
    import torch
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model, train = ckpt["model_config"], ckpt["args"]
    overrides = ", ".join(f"{k}={v}" for k, v in (config.get("model_args") or {}).items())
    params = sum(v.numel() for v in ckpt["ema"].values())
    return (f"{model['model']} with {overrides} ({params / 1e6:.2f}M parameters), 28x28x1 pixels, routing alpha "
            f"{model['alpha']:g}, beta {model['beta']:g}",
            f"{config['max_steps']} steps, global batch {train['global_batch_size']}, lr {train['lr']:g} "
            f"({train['lr_schedule']}, warmup {train['warmup_steps']} steps), EMA "
            f"{train['ema_decay']:g}, {train['noise_schedule']} schedule, seed {args.seed}, {args.nproc} process(es); "
            f"config `{shown_path(os.path.abspath(args.config))}`"), model


def write_report(path, args, runs, model_lines):
    """report.md: the grids and FIDs first, then losses, masks, settings and time per stage."""
    label = {r: ROUTING_LABELS.get(r, r) for r in runs}
    row = lambda first, cells: f"| {first} | " + " | ".join(cells) + " |"
    lines = [f"# Fashion-MNIST quick start: {' vs '.join(label.values())}", "", row("", label.values()),
             "|---|" + "---|" * len(runs),
             row(f"samples (rows: {', '.join(FASHION_MNIST_CLASSES)})", (f"![{label[r]}]({r}/grid.png)" for r in runs)),
             row(f"FID, {args.num_fid_samples} samples vs {args.ref_images} t10k images",
                 (f"**{run['FID']:.1f}**" for run in runs.values())), "", *honest_reading(runs),
             f"FID from {args.num_fid_samples} samples is biased upwards (its bias grows as 1/N): compare runs at the "
             f"same N and reference only, never with published 50K-sample FIDs. Samples: {args.fid_sampler}-"
             f"{args.fid_steps}, CFG {args.fid_cfg_scale:g}, classes balanced; grid: {args.grid_sampler}-"
             f"{args.grid_steps}, CFG {args.grid_cfg_scale:g}; Inception-v3 pool_3 (ADM evaluator); reference: a "
             f"seeded subset (seed {args.ref_seed}) of the t10k test split.", "",
             "## Training loss", "", "![loss](loss.png)", "", "## Routing masks", "",
             "DTR's mask table of the first routed block: row t marks the channels the task of timestep t uses.", "",
             "![masks](masks.png)", "", "## Settings", "", f"- model: {model_lines[0]}", f"- training: {model_lines[1]}",
             f"- command: `{' '.join(['python', *map(shown_path, sys.argv)])}`", "",
             "## Time per stage: wall seconds (CPU seconds of all processes)", "", row("stage", label.values()),
             "|---|" + "---|" * len(runs)]
    lines += [row(stage, (seconds(run["timings"].get(stage, (0, 0))) for run in runs.values())) for stage in STAGES]
    lines.append(row("total", (seconds(np.sum(list(run["timings"].values()), axis=0)) for run in runs.values())))
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), mode="w")


#################################################################################
#                                 Pipeline                                      #
#################################################################################

def demo_config(path):
    """The train.py config the demo trains (launch.yaml_config), which must fix its number of steps."""
    config = read_config(path)
    if not isinstance(config.get("max_steps"), int) or config["max_steps"] < 1:
        raise UsageError(f"--config {path} must set max-steps to an integer >= 1")
    return config


def finished_run(record, settings):
    """The run record (FID, timings, files) written by an earlier run with the same settings, or None."""
    try:
        with open(record) as f:
            run = json.load(f)
    except (OSError, ValueError):
        return None
    done = run.get("settings") == settings and os.path.isfile(run["checkpoint"])
    return run if done else None


def main(args):
    """Train, sample and score each routing, then write <out>/report.md; returns the output folder."""
    check_at_least(args, 1, "num_fid_samples", "ref_images", "nproc", "grid_steps", "fid_steps")
    check_at_least(args, 0, "grid_cfg_scale", "fid_cfg_scale")
    try:
        fashion_mnist_files(args.data_path, "train"), fashion_mnist_files(args.data_path, "test")
    except (OSError, ValueError):
        raise UsageError(f"no Fashion-MNIST IDX files in --data-path {args.data_path} (Debian: apt-get install "
                         "dataset-fashion-mnist)") from None
    config = demo_config(args.config)
    out_dir = os.path.abspath(args.out)
    make_output_dir(out_dir, "--out")
    routings = [args.routing] + (["none"] if args.compare and args.routing != "none" else [])

    import torch  # the in-process stages (Inception) use as many cores as the runs
    torch.set_num_threads(args.nproc)
    start = clock()  # first, so that missing Inception weights stop the demo before training
    scorer = CheckpointScorer(reference_batch(args, out_dir))  # its features: computed once, then read from a cache
    reference_seconds = since(start)
    # what makes two runs the same: the config's content and every flag but the choice of runs and the output folder
    settings = {**{k: v for k, v in vars(args).items() if k not in ("compare", "routing", "out")}, "config": config}
    runs = {}
    for routing in routings:
        record = os.path.join(out_dir, routing, "metrics.json")
        runs[routing] = finished_run(record, settings)
        if runs[routing] is not None:
            print(f"{routing}: reusing the finished run in {os.path.dirname(record)} (same config and flags)")
            continue
        timings = {"reference features": reference_seconds}
        reference_seconds = (0.0, 0.0)  # spent once per command
        checkpoint, metrics_jsonl, samples = train_and_sample(args, config, routing, os.path.dirname(record), timings)
        start = clock()
        fid = scorer.fid(samples)["FID"]
        timings["sample features"] = since(start)
        runs[routing] = {"FID": fid, "N": args.num_fid_samples, "timings": timings, "metrics_jsonl": metrics_jsonl,
                         "checkpoint": checkpoint, "settings": settings}
        atomic_write(record, lambda f: f.write(json.dumps(runs[routing], indent=1)), mode="w")

    model_lines, model = describe_model(runs[routings[0]]["checkpoint"], config, args)
    width = model.get("model_channels", model.get("hidden_size"))  # of the first routed block: ADM's, DiT's
    plot_masks(mask_panels(["dtr"], [model["alpha"]], [model["beta"]], width), os.path.join(out_dir, "masks.png"), 1)
    plot_losses(runs, os.path.join(out_dir, "loss.png"))
    report = os.path.join(out_dir, "report.md")
    write_report(report, args, runs, model_lines)
    print("\nwall seconds (CPU seconds of all processes):")
    for routing, run in runs.items():
        stages = ", ".join(f"{name} {seconds(spent)}" for name, spent in run["timings"].items())
        print(f"{ROUTING_LABELS.get(routing, routing)}: FID {run['FID']:.1f} ({args.num_fid_samples} samples); {stages}; "
              f"total {seconds(np.sum(list(run['timings'].values()), axis=0))}")
    print(f"report: {report}")
    return out_dir


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=str, default="configs/demo_fashion_mnist.yaml", help="train.py config")
    parser.add_argument("--routing", type=str, choices=ROUTING_KINDS, default="dtr")
    parser.add_argument("--compare", action="store_true", help="also train vanilla (routing none), same seed")
    parser.add_argument("--data-path", type=str, default=DEBIAN_FASHION_MNIST, help="Fashion-MNIST IDX folder")
    parser.add_argument("--out", type=str, default="results/demo-fashion-mnist", help="output folder")
    parser.add_argument("--nproc", type=int, default=2, help="processes (training, samples) = threads (grid, FID)")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed, the same for every routing")
    parser.add_argument("--grid-sampler", type=str, choices=SAMPLERS, default="ddpm",
                        help="ancestral DDPM draws this short run's pullovers, shirts and coats without the speckle "
                             "of DPM-Solver++ (grids compared by eye); 80 images, so the cost is small")
    parser.add_argument("--grid-steps", type=int, default=50,
                        help="DDPM-50 draws the same grid as DDPM-100 here (compared by eye) in half the time")
    parser.add_argument("--grid-cfg-scale", type=finite_float, default=GRID_CFG_SCALE, help="official DiT's grid setting")
    parser.add_argument("--fid-sampler", type=str, choices=SAMPLERS, default="dpm-solver++")
    parser.add_argument("--fid-steps", type=int, default=20, help="500 images on 2 CPU cores: the cheap sampler")
    parser.add_argument("--fid-cfg-scale", type=finite_float, default=FID_CFG_SCALE, help="the paper's FID setting")
    parser.add_argument("--num-fid-samples", type=int, default=500)
    parser.add_argument("--ref-images", type=int, default=500, help="t10k images in the FID reference")
    parser.add_argument("--ref-seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
