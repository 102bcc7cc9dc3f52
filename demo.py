"""Fashion-MNIST quick start: train a class-conditional pixel DiT with DTR, sample it and read its FID (`make demo`).

    python demo.py                                  # DTR (Sec. 4), configs/demo_fashion_mnist.yaml
    python demo.py --routing none                   # the same model without routing, in its own run folder

Every stage runs the project's own scripts, exactly as a user would type them:
  1. data       Debian's dataset-fashion-mnist (apt-get when root), else torchvision's download into ./data
  2. train      torchrun train.py --config ... (DDP over --nproc CPU processes)
  3. grid       sample.py: one row per class, 8 samples each (10 x 8)
  4. samples    torchrun sample_ddp.py: --num-fid-samples images into one ADM-format .npz
  5. reference  evaluations/make_reference.py: a seeded subset of the t10k (test) split
  6. evaluate   evaluations/evaluator.py: FID, sFID, precision, recall against that reference
  7. report     <results-dir>/<run>/report.md with the metrics, the grid, the loss curve and the routing masks
The scripts hold the math; this file only wires them together and draws two small pictures with PIL.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import deque

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from foundation.atomic_file import atomic_write
from foundation.flag_types import finite_float
from foundation.usage_error import UsageError
from imagedata.fashion_mnist import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, fashion_mnist_files
from launch.cli import make_output_dir, run_command
from launch.yaml_config import read_config
from models.routing import NUM_TIMESTEPS, build_masks
from monitoring.training_log import read_metrics
from sampling.seeded import FID_CFG_SCALE

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
GRID_SAMPLES_PER_CLASS = 8
# viridis' two ends, the colours of the paper's Fig. 2: active channel yellow, inactive purple
ACTIVE_RGB, INACTIVE_RGB = (253, 231, 37), (68, 1, 84)


#################################################################################
#                                   Data                                        #
#################################################################################

def has_fashion_mnist(path):
    """True if `path` holds both Fashion-MNIST splits in a layout imagedata reads."""
    try:
        fashion_mnist_files(path, "train"), fashion_mnist_files(path, "test")
    except (FileNotFoundError, ValueError):
        return False
    return os.path.isdir(path)


def obtain_fashion_mnist(data_path=None, download_root="data"):
    """Folder holding Fashion-MNIST: --data-path, Debian's package (installed with apt when root), or torchvision's download."""
    if data_path is not None:
        if not has_fashion_mnist(data_path):
            raise UsageError(f"--data-path {data_path} does not hold the Fashion-MNIST train and t10k IDX files")
        return data_path
    if has_fashion_mnist(DEBIAN_FASHION_MNIST):
        return DEBIAN_FASHION_MNIST
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("Fashion-MNIST: installing Debian's dataset-fashion-mnist with apt-get", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], env=env).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env)
            subprocess.run(["apt-get", "install", "-y", "dataset-fashion-mnist"], env=env)
        if has_fashion_mnist(DEBIAN_FASHION_MNIST):
            return DEBIAN_FASHION_MNIST
    root = os.path.abspath(download_root)
    if not has_fashion_mnist(root):
        print(f"Fashion-MNIST: downloading with torchvision into {root}", flush=True)
        from torchvision.datasets import FashionMNIST  # only needed on this fallback path
        for train in (True, False):
            FashionMNIST(root, train=train, download=True)
    return root  # torchvision's layout <root>/FashionMNIST/raw is one that imagedata reads


#################################################################################
#                               Running the stages                              #
#################################################################################

def script_env(threads=None):
    """Environment of a stage: offline hub, unbuffered output (live progress), threads per process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torchrun would set 1 anyway, with a warning
    return env


def torchrun(nproc, script):
    """Command prefix launching `script` on nproc local processes (`torchrun --standalone`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]


def run_stage(name, cmd, log_path, env):
    """Run one stage, its output shown live (its own progress bars) and kept in log_path; error on failure."""
    print(f"\n==> {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        tail = deque(maxlen=40)
        # tqdm redraws with "\r": pass bytes through as they come so the bars stay live
        for chunk in iter(lambda: process.stdout.read1(4096), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk.decode(errors="replace"))
            tail.extend(chunk.decode(errors="replace").splitlines())
        process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"stage '{name}' failed (exit {process.returncode}); log: {log_path}\n" + "\n".join(tail))
    return time.time() - start


def created_folders(results_dir, before):
    """Folders of results_dir that were not among `before` (train.py's new experiment folder)."""
    return sorted(set(os.listdir(results_dir)) - before) if os.path.isdir(results_dir) else []


def latest_metrics(results_dir, before):
    """The newest metrics.jsonl line of the run train.py is writing in results_dir, or None."""
    created = created_folders(results_dir, before)
    path = os.path.join(results_dir, created[0], "metrics.jsonl") if len(created) == 1 else None
    if path is None or not os.path.exists(path):
        return None
    try:
        metrics = read_metrics(path)
    except ValueError:  # a line being appended right now: the next poll reads it whole
        return None
    return metrics[-1] if metrics else None


def run_training(cmd, results_dir, max_steps, log_path, env):
    """Run train.py, its metrics.jsonl shown as one progress bar; returns (experiment dir, seconds)."""
    print(f"\n==> train: {' '.join(cmd)}", flush=True)
    before = set(os.listdir(results_dir)) if os.path.isdir(results_dir) else set()
    start, tail = time.time(), deque(maxlen=40)
    with open(log_path, "w") as log, tqdm(total=max_steps, desc="train", unit="step") as bar:
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1)
        for line in process.stdout:
            log.write(line)
            log.flush()
            tail.append(line.rstrip())
            latest = latest_metrics(results_dir, before)  # polled when train.py prints, i.e. at every log line
            if latest is not None and latest["step"] > bar.n:
                bar.update(latest["step"] - bar.n)
                bar.set_postfix(loss=f"{latest['loss']:.4f}")
        process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"stage 'train' failed (exit {process.returncode}); log: {log_path}\n" + "\n".join(tail))
    # train.py numbers a new experiment folder inside results_dir: the one that was not there before
    created = created_folders(results_dir, before)
    if len(created) != 1:
        raise RuntimeError(f"expected train.py to create one experiment folder in {results_dir}, found {created}")
    return os.path.join(results_dir, created[0]), time.time() - start


#################################################################################
#                                  Pictures                                     #
#################################################################################

def save_png(image, path):
    """PIL image -> PNG, atomically (a crash never leaves half a picture)."""
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def draw_loss_curve(metrics_path, out_path, width=640, height=400):
    """Training loss against step (log y axis) from train.py's metrics.jsonl, drawn with PIL."""
    rows = read_metrics(metrics_path)
    points = [(r["step"], r["loss"]) for r in rows if math.isfinite(r["loss"]) and r["loss"] > 0]
    if not points:
        raise ValueError(f"{metrics_path} holds no finite positive losses to plot")
    font = ImageFont.load_default()
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, width - 20, 30, height - 50
    steps = [s for s, _ in points]
    logs = [math.log10(v) for _, v in points]
    s0, s1 = min(0, min(steps)), max(max(steps), 1)
    y0, y1 = math.floor(min(logs) * 10) / 10, math.ceil(max(logs) * 10) / 10
    y1 = y1 if y1 > y0 else y0 + 0.1

    def xy(step, log_loss):
        return (left + (step - s0) / (s1 - s0) * (right - left),
                bottom - (log_loss - y0) / (y1 - y0) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(math.floor(y0), math.ceil(y1) + 1):  # ticks at 1, 2, 5 x 10^k inside the range
        for m in (1, 2, 5):
            v = m * 10.0 ** k
            if y0 <= math.log10(v) <= y1:
                _, y = xy(s0, math.log10(v))
                draw.line([left - 4, y, right, y], fill=(225, 225, 225))
                draw.text((left - 8, y), f"{v:g}", fill="black", font=font, anchor="rm")
    for i in range(5):
        step = s0 + (s1 - s0) * i / 4
        x, _ = xy(step, y0)
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x, bottom + 8), f"{step:.0f}", fill="black", font=font, anchor="mt")
    draw.line([xy(s, l) for s, l in zip(steps, logs)] if len(points) > 1 else [xy(steps[0], logs[0])] * 2,
              fill=(31, 119, 180), width=2)
    draw.text((width / 2, 8), "training loss (mse + vb), log scale", fill="black", font=font, anchor="mt")
    draw.text((width / 2, height - 16), "training step", fill="black", font=font, anchor="mt")
    save_png(image, out_path)


def draw_routing_masks(model_config, out_path, block=0, height=400, min_width=400):
    """The (T = 1000, C) routing table of one block: yellow = active channel, purple = off (paper Fig. 2)."""
    kind, channels = model_config["routing"], model_config["hidden_size"]
    seed = model_config["routing_seed"] + block if kind == "random" else model_config["routing_seed"]
    masks = build_masks(kind, NUM_TIMESTEPS, channels, model_config["alpha"], model_config["beta"], seed)  # (T, C)
    table = np.where(masks.numpy()[..., None] > 0.5, ACTIVE_RGB, INACTIVE_RGB).astype(np.uint8)  # (T, C, 3)
    scale = max(1, math.ceil(min_width / channels))
    picture = Image.fromarray(table).resize((channels * scale, height), Image.NEAREST)
    font = ImageFont.load_default()
    left, top, bottom = 70, 36, 40
    canvas = Image.new("RGB", (picture.width + left + 20, height + top + bottom), "white")
    canvas.paste(picture, (left, top))
    draw = ImageDraw.Draw(canvas)
    title = (f"routing '{kind}' of block {block}: C = {channels}, alpha = {model_config['alpha']:g}, "
             f"beta = {model_config['beta']:g}")
    draw.text((canvas.width / 2, 10), title, fill="black", font=font, anchor="mt")
    for t in (0, 250, 500, 750, 999):
        y = top + (t + 0.5) / NUM_TIMESTEPS * height
        draw.text((left - 6, y), f"t={t}", fill="black", font=font, anchor="rm")
    for c in (0, channels // 2, channels - 1):
        x = left + (c + 0.5) * scale
        draw.text((x, top + height + 6), f"{c}", fill="black", font=font, anchor="mt")
    draw.text((left + picture.width / 2, top + height + 22), "channel (yellow = active, purple = off)",
              fill="black", font=font, anchor="mt")
    save_png(canvas, out_path)


#################################################################################
#                                    Report                                     #
#################################################################################

def format_metric(value):
    return f"{value:.2f}" if isinstance(value, float) else "unavailable"


def write_report(path, context):
    """report.md: metrics, grid, loss curve, masks, settings and stage timings (atomic write)."""
    c = context
    metrics = c["metrics"]
    lines = [
        f"# Fashion-MNIST quick start: routing `{c['routing']}`",
        "",
        f"Command: `{c['command']}`",
        "",
        "## Metrics",
        "",
        f"{c['num_fid_samples']} samples ({c['fid_sampler']}-{c['fid_sampling_steps']}, CFG {c['fid_cfg_scale']:g}, "
        f"classes balanced) against {c['ref_images']} Fashion-MNIST t10k images (seeded subset, seed "
        f"{c['ref_seed']}), ADM evaluator protocol.",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for name in ("FID", "sFID", "Precision", "Recall", "Inception Score"):
        value = metrics.get(name)
        why = metrics.get("unavailable", {}).get(name, "")
        lines.append(f"| {name} | {format_metric(value)}{f' ({why})' if value is None and why else ''} |")
    if c["other_runs"]:
        lines += ["", "Other demo runs against the same reference: " + "; ".join(
            f"`{name}` FID {format_metric(fid)}" for name, fid in c["other_runs"].items())]
    lines += [
        "",
        f"FID from {c['num_fid_samples']} samples is biased upwards (the estimate of a 2048 x 2048 covariance "
        "from so few images is noisy, and FID's bias grows as 1/N): compare runs only at the same N and "
        "reference, never with published 50K-sample FIDs.",
        "",
        "## Samples",
        "",
        f"One row per class (top to bottom: {', '.join(FASHION_MNIST_CLASSES)}), "
        f"{GRID_SAMPLES_PER_CLASS} samples each; {c['grid_sampler']}-{c['grid_sampling_steps']}, CFG {c['grid_cfg_scale']:g}.",
        "",
        "![samples](grid.png)",
        "",
        "## Training loss",
        "",
        "![loss](loss.png)",
        "",
        "## Routing masks",
        "",
        "Block 0's mask table: row t (top t = 0, bottom t = 999) marks the channels the task of timestep t uses.",
        "",
        "![masks](masks.png)",
        "",
        "## Settings",
        "",
        f"- model: {c['model_summary']}",
        f"- training: {c['steps']} steps, global batch {c['global_batch_size']}, lr {c['lr']:g}, EMA "
        f"{c['ema_decay']:g}, {c['noise_schedule']} schedule, {c['nproc']} process(es); config `{c['config']}`",
        f"- data: `{c['data_path']}`",
        f"- checkpoint: `{c['checkpoint']}`",
        f"- samples: `{c['sample_npz']}`; reference: `{c['reference']}`",
        "",
        "## Wall time",
        "",
        "| stage | seconds |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in c["timings"].items()]
    lines.append(f"| total | {sum(c['timings'].values()):.0f} |")
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), mode="w")


def other_runs(results_dir, run_dir, reference):
    """{run name: FID} of the other demo runs in results_dir evaluated against the same reference batch."""
    found = {}
    for name in sorted(os.listdir(results_dir)):
        path = os.path.join(results_dir, name, "metrics.json")
        if os.path.join(results_dir, name) == run_dir or not os.path.isfile(path):
            continue
        with open(path) as f:
            metrics = json.load(f)
        if os.path.abspath(metrics.get("reference", "")) == reference:
            found[name] = metrics.get("FID")
    return found


#################################################################################
#                                    Pipeline                                   #
#################################################################################

def main(args):
    """Run every stage and write <results-dir>/<run>/report.md; returns the run folder."""
    for flag in ("steps", "num_fid_samples", "ref_images", "nproc", "grid_sampling_steps", "fid_sampling_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for flag in ("grid_cfg_scale", "fid_cfg_scale"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {getattr(args, flag)}")
    config = read_config(args.config)  # train.py's own reading of the file (launch/yaml_config.py)
    routing = args.routing or config.get("routing", "dtr")
    steps = args.steps or config.get("max_steps")
    if steps is None:
        raise UsageError(f"{args.config} sets no max-steps; pass --steps")
    if args.data_path is not None and not has_fashion_mnist(args.data_path):  # before anything is written
        raise UsageError(f"--data-path {args.data_path} does not hold the Fashion-MNIST train and t10k IDX files")
    run_dir = os.path.abspath(os.path.join(args.results_dir, args.run_name or f"demo-fashion-mnist-{routing}"))
    logs = os.path.join(run_dir, "logs")
    make_output_dir(logs, "--results-dir")
    timings = {}

    start = time.time()
    data_path = obtain_fashion_mnist(args.data_path, args.download_root)
    timings["data"] = time.time() - start
    print(f"Fashion-MNIST: {data_path}", flush=True)

    # 2. train.py under torchrun: the YAML gives the model, the flags here what the demo overrides
    train_cmd = torchrun(args.nproc, "train.py") + [
        "--config", os.path.abspath(args.config), "--data-path", data_path, "--routing", routing,
        "--max-steps", str(steps), "--results-dir", os.path.join(run_dir, "train")]
    experiment_dir, timings["train"] = run_training(train_cmd, os.path.join(run_dir, "train"), steps,
                                                    os.path.join(logs, "train.log"), script_env(threads=1))
    checkpoint = os.path.join(experiment_dir, "checkpoints", f"{steps:07d}.pt")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"train.py finished without writing the final checkpoint {checkpoint}")

    # 3. the 10 x 8 class grid
    grid_path = os.path.join(run_dir, "grid.png")
    timings["grid"] = run_stage("grid", [
        sys.executable, "sample.py", "--ckpt", checkpoint, "--sampler", args.grid_sampler,
        "--num-sampling-steps", str(args.grid_sampling_steps), "--cfg-scale", str(args.grid_cfg_scale),
        "--samples-per-class", str(GRID_SAMPLES_PER_CLASS), "--seed", str(args.seed), "--out", grid_path],
        os.path.join(logs, "grid.log"), script_env())

    # 4. FID samples, one shard per process so that every process works
    sample_dir = os.path.join(experiment_dir, "samples")
    shard_size = math.ceil(args.num_fid_samples / args.nproc)
    timings["samples"] = run_stage("samples", torchrun(args.nproc, "sample_ddp.py") + [
        "--ckpt", checkpoint, "--sample-dir", sample_dir, "--num-fid-samples", str(args.num_fid_samples),
        "--sampler", args.fid_sampler, "--num-sampling-steps", str(args.fid_sampling_steps),
        "--cfg-scale", str(args.fid_cfg_scale), "--balanced-classes", "--global-seed", str(args.seed),
        "--shard-size", str(shard_size), "--per-proc-batch-size", str(min(shard_size, 250))],
        os.path.join(logs, "samples.log"), script_env(threads=1))
    npz = sorted(p for p in os.listdir(sample_dir) if p.endswith(".npz"))
    if len(npz) != 1:
        raise RuntimeError(f"expected one sample .npz in {sample_dir}, found {npz}")
    sample_npz = os.path.join(sample_dir, npz[0])

    # 5. reference: a seeded subset of the test split, shared by runs (its Inception features are cached beside it)
    reference_dir = os.path.abspath(os.path.join(args.results_dir, "demo-reference"))
    os.makedirs(reference_dir, exist_ok=True)
    reference = os.path.join(reference_dir, f"fashion-mnist-t10k-n{args.ref_images}-seed{args.ref_seed}.npz")
    timings["reference"] = 0.0
    if not os.path.isfile(reference):
        # images only: the evaluator extracts (and caches) their features in the same pass as the samples'
        timings["reference"] = run_stage("reference", [
            sys.executable, "-m", "evaluations.make_reference", "--dataset", "fashion-mnist", "--data-path",
            data_path, "--split", "t10k", "--num-images", str(args.ref_images), "--seed", str(args.ref_seed),
            "--no-statistics", "--output", reference], os.path.join(logs, "reference.log"), script_env())

    # 6. evaluator
    metrics_path = os.path.join(run_dir, "metrics.json")
    timings["evaluate"] = run_stage("evaluate", [
        sys.executable, "-m", "evaluations.evaluator", reference, sample_npz, "--output", metrics_path],
        os.path.join(logs, "evaluate.log"), script_env())
    with open(metrics_path) as f:
        metrics = json.load(f)

    # 7. pictures and report
    import torch  # imported late: the stages above run in their own processes
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model_config = ckpt["model_config"]
    draw_loss_curve(os.path.join(experiment_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"))
    draw_routing_masks(model_config, os.path.join(run_dir, "masks.png"))
    train_args = ckpt["args"]
    context = {
        "routing": routing, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "metrics": metrics, "num_fid_samples": args.num_fid_samples, "fid_sampler": args.fid_sampler,
        "grid_sampler": args.grid_sampler,
        "fid_sampling_steps": args.fid_sampling_steps, "fid_cfg_scale": args.fid_cfg_scale,
        "grid_sampling_steps": args.grid_sampling_steps, "grid_cfg_scale": args.grid_cfg_scale,
        "ref_images": args.ref_images, "ref_seed": args.ref_seed, "steps": steps,
        "model_summary": (f"{model_config['model']} pixel DiT, {model_config['input_size']}x"
                          f"{model_config['input_size']}x{model_config['in_channels']}, patch "
                          f"{model_config['patch_size']}, width {model_config['hidden_size']}, depth "
                          f"{model_config['depth']}, {model_config['num_heads']} heads, routing "
                          f"{model_config['routing']} (alpha {model_config['alpha']:g}, beta {model_config['beta']:g})"),
        "global_batch_size": train_args["global_batch_size"], "lr": train_args["lr"],
        "ema_decay": train_args["ema_decay"], "noise_schedule": train_args["noise_schedule"], "nproc": args.nproc,
        "config": os.path.relpath(os.path.abspath(args.config), REPO_ROOT), "data_path": data_path,
        "checkpoint": checkpoint, "sample_npz": sample_npz, "reference": reference, "timings": timings,
        "other_runs": other_runs(os.path.dirname(run_dir), run_dir, reference),
    }
    write_report(os.path.join(run_dir, "report.md"), context)
    print(f"\nFID {format_metric(metrics.get('FID'))} ({args.num_fid_samples} samples vs {args.ref_images} "
          f"t10k images); total {sum(timings.values()):.0f} s")
    print(os.path.join(run_dir, "report.md"))
    return run_dir


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=str, default="configs/demo_fashion_mnist.yaml",
                        help="train.py config of the model and its training")
    parser.add_argument("--routing", type=str, default=None, help="dtr, none, random, ...; default: the config's")
    parser.add_argument("--steps", type=int, default=None, help="training steps; default: the config's max-steps")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes for training and sampling")
    parser.add_argument("--data-path", type=str, default=None,
                        help=f"Fashion-MNIST IDX folder; default {DEBIAN_FASHION_MNIST}, else a download")
    parser.add_argument("--download-root", type=str, default="data", help="torchvision download folder (fallback)")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--run-name", type=str, default=None, help="default demo-fashion-mnist-<routing>")
    parser.add_argument("--grid-sampler", type=str, choices=["ddpm", "ddim"], default="ddpm",
                        help="ancestral DDPM draws visibly cleaner grids from this short run than DDIM")
    parser.add_argument("--grid-sampling-steps", type=int, default=100)
    parser.add_argument("--grid-cfg-scale", type=finite_float, default=4.0, help="official DiT's grid setting")
    parser.add_argument("--fid-sampler", type=str, choices=["ddpm", "ddim"], default="ddim")
    parser.add_argument("--fid-sampling-steps", type=int, default=25, help="fewer than the grid's: 500 images on CPU")
    parser.add_argument("--fid-cfg-scale", type=finite_float, default=FID_CFG_SCALE, help="the paper's FID setting")
    parser.add_argument("--num-fid-samples", type=int, default=500)
    parser.add_argument("--ref-images", type=int, default=500, help="t10k images in the FID reference")
    parser.add_argument("--ref-seed", type=int, default=0, help="seed of the reference subset")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
