"""Small-scale study on Fashion-MNIST: vanilla, R-TR and DTR trained alike, FID along training (Fig. 5, Table 1).

    python -m analysis.study --out study-results --size small --seeds 0 1 2 --steps 400 --eval-every 100

Every (routing, seed) run is one train.py process (pixel space; the same seed, data order, noise and budget for
every routing) that checkpoints every --eval-every steps. Each checkpoint's EMA model is sampled in this process as
sample_ddp.py samples it (sampling.seeded, fixed sampling seeds) and scored with the evaluator's Inception features
against one fixed reference, a seeded subset of the t10k (test) split (FID only, as Table 1; computed exactly
through an (n, n) eigenproblem, since a 2048 x 2048 sqrtm per checkpoint would cost more than the sampling on one
CPU core). Runs go seed by seed, so a study cut short still holds whole seeds. <out>/results.json keeps every number and timing;
re-running the same command skips finished runs and evaluations and continues an interrupted training from its
last checkpoint; other --seeds or --routings add runs. After each run it rewrites <out>/convergence.png (FID
against step, mean and min-max over seeds, as Fig. 5) and <out>/table.md (final FID as Table 1, FID per step,
the paired DTR - vanilla and R-TR - vanilla gaps, the compute spent). Measured results: docs/study.md.
"""
import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time
from collections import deque

import numpy as np

from diffusion import create_diffusion
from evaluations.metrics import frechet_distance_of_features
from foundation.atomic_file import atomic_write
from foundation.flag_types import check_at_least, finite_float
from foundation.settings_diff import differing_settings
from foundation.usage_error import UsageError
from imagedata.fashion_mnist import DEBIAN_FASHION_MNIST, fashion_mnist_files
from launch.cli import run_command
from models.routing import DTR_ALPHA, DTR_BETA
from models.vae import NO_VAE, load_vae
from sampling.model_from_checkpoint import load_checkpoint
from sampling.sample_shards import rgb, write_npz
from sampling.seeded import SAMPLERS, class_labels, generate, timestep_respacing, to_uint8

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUTING_LABELS = {"none": "vanilla", "random": "R-TR", "dtr": "DTR"}  # the paper's names (Table 1)
ROUTING_COLORS = {"none": "tab:blue", "random": "tab:gray", "dtr": "tab:red"}
# Pixel-space DiTs for 28x28 (or 8x8) Fashion-MNIST. Tokens: (image_size / patch_size) ** 2.
STUDY_SIZES = {
    "toy": dict(image_size=8, patch_size=4, hidden_size=32, depth=2, num_heads=2),      # tests only: 4 tokens
    "small": dict(image_size=28, patch_size=4, hidden_size=96, depth=4, num_heads=4),   # the demo's: 49 tokens
    "medium": dict(image_size=28, patch_size=2, hidden_size=128, depth=6, num_heads=4),  # 196 tokens of 2x2
    # The size study (docs/study.md, "Does the gap depend on model size?"): small's 49 tokens and head width 24,
    # wider and deeper, so that only capacity changes.
    "base": dict(image_size=28, patch_size=4, hidden_size=144, depth=6, num_heads=6),   # 2.4M parameters
    "large": dict(image_size=28, patch_size=4, hidden_size=192, depth=8, num_heads=8),  # 5.5M parameters
}
METRICS = ("FID",)  # Table 1 reports FID only


#################################################################################
#                        Commands of the project's scripts                      #
#################################################################################

def train_command(settings, routing, seed, results_dir, resume=None):
    """train.py for one run: the study's model and budget, this routing and seed; resumes from `resume`."""
    size = STUDY_SIZES[settings["size"]]
    cmd = [sys.executable, "train.py", "--data-path", settings["data_path"], "--image-size", str(size["image_size"]),
           "--num-classes", "10", "--vae", "none", "--num-workers", "0",
           "--model", "DiT-S/2", "--model-arg", f"hidden_size={size['hidden_size']}",
           "--model-arg", f"depth={size['depth']}", "--model-arg", f"num_heads={size['num_heads']}",
           "--model-arg", f"patch_size={size['patch_size']}",
           "--routing", routing, "--alpha", str(settings["alpha"]), "--beta", str(settings["beta"]),
           "--routing-seed", str(seed), "--global-seed", str(seed),
           "--max-steps", str(settings["steps"]), "--global-batch-size", str(settings["batch_size"]),
           "--lr", str(settings["lr"]), "--ema-decay", str(settings["ema_decay"]),
           "--log-every", str(min(100, settings["eval_every"])), "--ckpt-every", str(settings["eval_every"]),
           "--results-dir", results_dir]
    if resume is not None:
        cmd += ["--resume", resume]
    return cmd


def reference_command(settings, output):
    """evaluations.make_reference: a seeded subset of the t10k split at the model's image size (images only)."""
    size = STUDY_SIZES[settings["size"]]
    return [sys.executable, "-m", "evaluations.make_reference", "--data-kind", "fashion-mnist",
            "--data-path", settings["data_path"], "--split", "t10k", "--image-size", str(size["image_size"]),
            "--num-images", str(settings["ref_images"]), "--seed", str(settings["ref_seed"]), "--no-statistics",
            "--output", output]


def run_logged(cmd, log_path, threads):
    """Run a script with `threads` CPU threads, its output in log_path; seconds taken, or an error with its tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.time()
    with open(log_path, "w") as log:
        process = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if process.returncode != 0:
        with open(log_path, errors="replace") as log:
            tail = "".join(deque(log, maxlen=20))
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {process.returncode}); log {log_path}:\n{tail}")
    return time.time() - start


#################################################################################
#                                 One run                                       #
#################################################################################

def run_key(routing, seed):
    return f"{routing}/seed{seed}"


def saved_checkpoints(train_dir):
    """{step: path} of every checkpoint train.py wrote under train_dir (all its experiment folders)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(train_dir, "*", "checkpoints", "*.pt"))):
        found[int(os.path.splitext(os.path.basename(path))[0])] = path
    return found


def train_run(settings, routing, seed, run_dir, threads):
    """Train one run to settings["steps"], continuing from its last checkpoint; seconds spent (0 if done)."""
    train_dir = os.path.join(run_dir, "train")
    checkpoints = saved_checkpoints(train_dir)
    if settings["steps"] in checkpoints:
        return 0.0
    resume = checkpoints[max(checkpoints)] if checkpoints else None
    log = os.path.join(run_dir, "logs", f"train-from-{max(checkpoints) if checkpoints else 0:07d}.log")
    seconds = run_logged(train_command(settings, routing, seed, train_dir, resume), log, threads)
    if settings["steps"] not in saved_checkpoints(train_dir):
        raise RuntimeError(f"train.py finished without its final checkpoint (step {settings['steps']}); log {log}")
    return seconds


class CheckpointScorer:
    """The project's evaluator pieces held in this process: one Inception and the reference statistics.

    Features and reference statistics are evaluations.inception's and evaluations.evaluator's (ADM protocol,
    cached beside the reference); FID is evaluations.metrics.frechet_distance_of_features, as in the evaluator.
    """

    def __init__(self, reference, device="cpu"):
        from evaluations.batch_npz import read_batch
        from evaluations.evaluator import reference_features
        from evaluations.inception import InceptionFeatures
        self.reference, self.inception = reference, InceptionFeatures(None, device=device)
        self.ref = reference_features(reference, read_batch(reference)["images"], self.inception, batch_size=50)

    def fid(self, sample_npz):
        """{"FID": value} of a sample batch against the reference."""
        from evaluations.batch_npz import read_batch
        features = self.inception.extract(read_batch(sample_npz)["images"], 50, desc="Sample features")
        return {"FID": frechet_distance_of_features(features["pool_3"], self.ref["mu"], self.ref["sigma"])}


def sample_checkpoint(settings, checkpoint, out):
    """One checkpoint's FID samples as sample_ddp.py draws them (its EMA model, classes balanced, one seed for all,
    batches of up to 100), in this process, written as the evaluator's .npz at `out`."""
    model, info = load_checkpoint(checkpoint)
    respacing = timestep_respacing(settings["sampler"], settings["sampling_steps"])
    diffusion = create_diffusion(**{**info.diffusion_config, "timestep_respacing": respacing})
    vae = None if info.vae == NO_VAE else load_vae(info.vae, "cpu")
    n, batch, seed = settings["num_fid_samples"], min(settings["num_fid_samples"], 100), settings["sample_seed"]
    images, labels = [], []
    for first in range(0, n, batch):
        indices = list(range(first, min(first + batch, n)))
        y = class_labels(indices, model.num_classes, seed, balanced=True)
        samples = generate(model, diffusion, settings["sampler"], indices, y, seed, settings["cfg_scale"],
                           clip_denoised=vae is None)
        images.append(rgb(to_uint8(samples, vae, info.latent_scale)))  # (B, H, W, 3)
        labels.append(y.numpy())
    os.makedirs(os.path.dirname(out), exist_ok=True)
    atomic_write(out, lambda f: write_npz(f, {"arr_0": np.concatenate(images), "arr_1": np.concatenate(labels)}))
    return out


def evaluate_checkpoint(settings, checkpoint, step, run_dir, scorer):
    """Sample one checkpoint and score it: (metrics, sample s, evaluate s)."""
    start = time.time()
    npz = sample_checkpoint(settings, checkpoint, os.path.join(run_dir, "samples", f"{step:07d}.npz"))
    sample_seconds = time.time() - start
    start = time.time()
    metrics = scorer.fid(npz)
    return metrics, sample_seconds, time.time() - start


#################################################################################
#                             Results, table, plot                              #
#################################################################################

def save_results(path, results):
    atomic_write(path, lambda f: f.write(json.dumps(results, indent=1, sort_keys=True)), mode="w")


def curves(results, routing):
    """(steps, (num_seeds, num_steps) FID array with NaN where missing, seeds) of one routing."""
    runs = {int(key.split("seed")[1]): run for key, run in results["runs"].items()
            if key.split("/")[0] == routing and run.get("evals")}
    steps = sorted({int(s) for run in runs.values() for s in run["evals"]})
    seeds = sorted(runs)
    fid = np.full((len(seeds), len(steps)), np.nan)
    for i, seed in enumerate(seeds):
        for j, step in enumerate(steps):
            value = runs[seed]["evals"].get(str(step), {}).get("FID")
            fid[i, j] = np.nan if value is None else value
    return steps, fid, seeds


def mean_std(values):
    """'mean ± std (n)' over the finite values, std with ddof 1; '-' when none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (n={len(values)})"


def final_metrics(results, routing):
    """{seed: metrics at the last step} of the runs of `routing` that reached it."""
    last = str(results["settings"]["steps"])
    return {int(key.split("seed")[1]): run["evals"][last] for key, run in results["runs"].items()
            if key.split("/")[0] == routing and last in run.get("evals", {})}


def paired_gaps(results, routing, baseline="none"):
    """{step: [FID(routing) - FID(baseline) for each seed that has both]}: the per-seed difference (Fig. 5)."""
    gaps = {}
    for key, run in results["runs"].items():
        if key.split("/")[0] != routing:
            continue
        base = results["runs"].get(run_key(baseline, key.split("seed")[1]), {}).get("evals", {})
        for step, metrics in run.get("evals", {}).items():
            if step in base and metrics.get("FID") is not None and base[step].get("FID") is not None:
                gaps.setdefault(int(step), []).append(metrics["FID"] - base[step]["FID"])
    return dict(sorted(gaps.items()))


def write_table(results, path):
    """table.md: final metrics per routing (Table 1's form), FID per step, paired gaps to vanilla, budget."""
    s = results["settings"]
    routings = [r for r in s["routings"]]
    lines = [f"Final step {s['steps']}: mean ± std over seeds (sample std), {s['num_fid_samples']} samples "
             f"({s['sampler']}-{s['sampling_steps']}, CFG {s['cfg_scale']:g}) against {s['ref_images']} t10k images.", "",
             "| method | " + " | ".join(METRICS) + " |", "| --- |" + " --- |" * len(METRICS)]
    for routing in routings:
        final = final_metrics(results, routing)
        lines.append(f"| {ROUTING_LABELS.get(routing, routing)} | " + " | ".join(
            mean_std([m.get(name) for m in final.values()]) for name in METRICS) + " |")
    lines += ["", "FID along training (mean ± std over seeds):", "",
              "| step | " + " | ".join(ROUTING_LABELS.get(r, r) for r in routings) + " |",
              "| --- |" + " --- |" * len(routings)]
    all_steps = sorted({int(step) for run in results["runs"].values() for step in run.get("evals", {})})
    for step in all_steps:
        row = []
        for routing in routings:
            row.append(mean_std([run["evals"].get(str(step), {}).get("FID") for key, run in results["runs"].items()
                                 if key.split("/")[0] == routing]))
        lines.append(f"| {step} | " + " | ".join(row) + " |")
    for routing in [r for r in routings if r != "none"]:
        gaps = paired_gaps(results, routing)
        if not gaps or "none" not in routings:
            continue
        label = ROUTING_LABELS.get(routing, routing)
        lines += ["", f"FID gap {label} - vanilla, paired by seed (negative: {label} better):", "",
                  "| step | gap mean ± std | per seed |", "| --- | --- | --- |"]
        lines += [f"| {step} | {mean_std(g)} | {', '.join(f'{v:+.2f}' for v in g)} |" for step, g in gaps.items()]
    budget = results.get("seconds", {})
    lines += ["", "Compute (seconds of wall time, {} CPU thread(s), one process at a time): ".format(s["threads"]) +
              ", ".join(f"{name} {value:.0f}" for name, value in sorted(budget.items())) +
              f", total {sum(budget.values()):.0f}."]
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), mode="w")


def plot_convergence(results, path):
    """FID against training step, one line per routing: mean over seeds, band = min..max over seeds (Fig. 5)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    s = results["settings"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for routing in s["routings"]:
        steps, fid, seeds = curves(results, routing)
        if not steps:
            continue
        with np.errstate(all="ignore"):  # a step no seed reached yet is NaN
            mean, low, high = np.nanmean(fid, 0), np.nanmin(fid, 0), np.nanmax(fid, 0)
        color = ROUTING_COLORS.get(routing)
        ax.plot(steps, mean, marker="o", color=color, label=f"{ROUTING_LABELS.get(routing, routing)} ({len(seeds)} seeds)")
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    size = STUDY_SIZES[s["size"]]
    ax.set_title(f"Fashion-MNIST {size['image_size']}px, DiT width {size['hidden_size']} depth {size['depth']} "
                 f"patch {size['patch_size']}", fontsize=9)
    ax.set_xlabel("training step (batch {})".format(s["batch_size"]))
    ax.set_ylabel(f"FID ({s['num_fid_samples']} samples; band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


#################################################################################
#                                     Study                                     #
#################################################################################

def study_settings(args):
    """Everything that decides the numbers (stored in results.json; a resume must match it but for seeds/routings)."""
    return {"size": args.size, "model": STUDY_SIZES[args.size], "routings": list(args.routings),
            "seeds": list(args.seeds), "steps": args.steps, "eval_every": args.eval_every,
            "batch_size": args.batch_size, "lr": args.lr, "ema_decay": args.ema_decay, "alpha": args.alpha,
            "beta": args.beta, "num_fid_samples": args.num_fid_samples, "ref_images": args.ref_images,
            "ref_seed": args.ref_seed, "sampler": args.sampler, "sampling_steps": args.sampling_steps,
            "cfg_scale": args.cfg_scale, "sample_seed": args.sample_seed, "threads": args.threads,
            "data_path": os.path.abspath(args.data_path)}


def check_args(args):
    """One clear error for bad flags, before anything runs or is written."""
    check_at_least(args, 1, "steps", "eval_every", "batch_size", "sampling_steps", "threads", "ref_images")
    if args.steps % args.eval_every != 0:
        raise UsageError(f"--eval-every {args.eval_every} must divide --steps {args.steps} (the last evaluation "
                         "is the final checkpoint)")
    if args.num_fid_samples < 10:
        raise UsageError(f"--num-fid-samples must be >= 10, got {args.num_fid_samples}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        raise UsageError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
    if len(set(args.routings)) != len(args.routings):
        raise UsageError(f"--routings must be distinct, got {args.routings}")
    try:
        fashion_mnist_files(args.data_path, "train"), fashion_mnist_files(args.data_path, "test")
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--data-path {args.data_path}: {error}") from None


def load_results(path, settings):
    """results.json of an earlier call with the same settings, or a fresh one; an error if settings differ."""
    if not os.path.isfile(path):
        return {"settings": settings, "runs": {}, "seconds": {}}
    with open(path) as f:
        results = json.load(f)
    # More seeds or routings only add runs (each run is keyed by both); anything else changes the numbers.
    changed = differing_settings(results["settings"], settings, ignore=("seeds", "routings"))
    if changed:
        raise UsageError(f"{path} was made with other settings ({', '.join(changed)} differ); use another --out "
                         "or the same flags")
    results["settings"] = settings
    return results


def main(args):
    """Train, sample and evaluate every (seed, routing) run not done yet; returns results.json's content."""
    check_args(args)
    settings = study_settings(args)
    out = os.path.abspath(args.out)
    results_path = os.path.join(out, "results.json")
    results = load_results(results_path, settings)
    os.makedirs(out, exist_ok=True)
    save_results(results_path, results)

    def spend(name, seconds):
        results["seconds"][name] = results["seconds"].get(name, 0.0) + seconds

    reference = os.path.join(out, "reference", f"fashion-mnist-t10k-n{args.ref_images}-seed{args.ref_seed}.npz")
    if not os.path.isfile(reference):
        spend("reference", run_logged(reference_command(settings, reference),
                                      os.path.join(out, "reference", "make_reference.log"), args.threads))
        save_results(results_path, results)

    import torch
    torch.set_num_threads(args.threads)  # sampling and scoring run in this process
    scorer = CheckpointScorer(reference)
    eval_steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
    start = time.time()
    for seed in args.seeds:  # seed-major: an interrupted study still holds whole seeds
        for routing in args.routings:
            key = run_key(routing, seed)
            run = results["runs"].setdefault(key, {"evals": {}, "seconds": {}})
            run_dir = os.path.join(out, "runs", f"{routing}-seed{seed}")
            if not all(str(step) in run["evals"] for step in eval_steps):
                seconds = train_run(settings, routing, seed, run_dir, args.threads)
                run["seconds"]["train"] = run["seconds"].get("train", 0.0) + seconds
                spend("train", seconds)
                if seconds > 0:  # 0: its checkpoints were all there, only evaluations are missing
                    print(f"[{time.time() - start:7.0f} s] {key}: trained {args.steps} steps in {seconds:.0f} s",
                          flush=True)
                save_results(results_path, results)
            checkpoints = saved_checkpoints(os.path.join(run_dir, "train"))
            for step in eval_steps:
                if str(step) in run["evals"]:
                    continue
                metrics, sample_s, eval_s = evaluate_checkpoint(settings, checkpoints[step], step, run_dir, scorer)
                run["evals"][str(step)] = {**metrics, "sample_seconds": sample_s, "evaluate_seconds": eval_s}
                spend("sample", sample_s)
                spend("evaluate", eval_s)
                save_results(results_path, results)
                print(f"[{time.time() - start:7.0f} s] {key} step {step}: FID {metrics['FID']:.2f} "
                      f"(sampling {sample_s:.0f} s, evaluation {eval_s:.0f} s)", flush=True)
            write_table(results, os.path.join(out, "table.md"))
            plot_convergence(results, os.path.join(out, "convergence.png"))
    print(open(os.path.join(out, "table.md")).read())
    print(f"Results: {results_path}; plot {os.path.join(out, 'convergence.png')}")
    return results


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=str, default="study-results", help="results folder (outside git)")
    parser.add_argument("--data-path", type=str, default=DEBIAN_FASHION_MNIST, help="Fashion-MNIST IDX folder")
    parser.add_argument("--size", type=str, choices=list(STUDY_SIZES), default="small")
    parser.add_argument("--routings", type=str, nargs="+", choices=list(ROUTING_LABELS), default=["none", "random", "dtr"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training (and R-TR mask) seeds")
    parser.add_argument("--steps", type=int, default=400, help="training steps of every run")
    parser.add_argument("--eval-every", type=int, default=100, help="FID of the EMA model every this many steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=finite_float, default=1e-3, help="the demo's: short runs need a large lr")
    parser.add_argument("--ema-decay", type=finite_float, default=0.995, help="horizon ~200 steps, fits a short run")
    parser.add_argument("--alpha", type=finite_float, default=DTR_ALPHA, help="DTR window shift (Eq. 4)")
    parser.add_argument("--beta", type=finite_float, default=DTR_BETA, help="share of active channels per task")
    parser.add_argument("--num-fid-samples", type=int, default=100)
    parser.add_argument("--ref-images", type=int, default=500, help="t10k images in the fixed FID reference")
    parser.add_argument("--ref-seed", type=int, default=0)
    parser.add_argument("--sampler", type=str, choices=SAMPLERS, default="ddim")
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=finite_float, default=1.0, help="1 = unguided (DiT's FID-vs-steps curves)")
    parser.add_argument("--sample-seed", type=int, default=0, help="the same sampling noise for every checkpoint")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each script (one runs at a time)")
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
