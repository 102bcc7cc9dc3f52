"""Does DTR's gain depend on model size? analysis.study's runs at several sizes, summarised (Table 5's question).

    python -m analysis.size_study --studies study-results/small study-results/base study-results/large \
        --out docs --prefix size_study

Each --studies folder is one `python -m analysis.study --size NAME --routings none dtr` result (its results.json),
all with the same steps, evaluations, samples and reference. This reads them, counts each size's parameters and
training FLOPs per step (FlopCounterMode on one forward pass, x3 for forward + backward, times the batch), and
writes <prefix>.md (per-size table: final FID, the DTR - vanilla gap paired by seed, where the mean curves
cross, whether vanilla has flattened) and three figures: FID against step and against training FLOPs for every
size, and the final gap against parameters (Table 5's form).
"""
import argparse
import json
import os

import numpy as np
import torch

from analysis.study import ROUTING_COLORS, ROUTING_LABELS, STUDY_SIZES, curves, mean_std, paired_gaps
from foundation.atomic_file import atomic_write
from foundation.settings_diff import describe_differences
from foundation.usage_error import UsageError
from launch.cli import run_command
from models import create_model
from training.step_cost import forward_flops

PER_SIZE_SETTINGS = ("size", "model", "seeds", "routings", "data_path", "threads")  # may differ between sizes
FLAT_TOLERANCE = 0.05  # vanilla has flattened when its mean FID fell by less than 5% over the last interval


def model_cost(size, batch_size):
    """(parameters, training FLOPs per step) of a study size: forward FLOPs x 3 (forward + backward) x batch."""
    shape = STUDY_SIZES[size]
    model = create_model("DiT-S/2", input_size=shape["image_size"], in_channels=1, num_classes=10,
                         hidden_size=shape["hidden_size"], depth=shape["depth"], num_heads=shape["num_heads"],
                         patch_size=shape["patch_size"]).eval()
    x = torch.zeros(1, 1, shape["image_size"], shape["image_size"])
    flops = forward_flops(model, x, torch.tensor([500]), {"y": torch.tensor([0])})
    return sum(p.numel() for p in model.parameters()), 3 * flops * batch_size


def read_study(folder):
    """results.json of one analysis.study folder; an error naming the folder when it is missing."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        raise UsageError(f"{folder}: no results.json (run python -m analysis.study --out {folder} first)")
    with open(path) as f:
        return json.load(f)


def crossing(steps, gap_means):
    """'between A and B' for the first sign change of the mean gap along training, or 'none'."""
    for (a, ga), (b, gb) in zip(zip(steps, gap_means), zip(steps[1:], gap_means[1:])):
        if np.sign(ga) != np.sign(gb) and ga != 0:
            return f"between {a} and {b}"
    return "none"


def final_fids(study, routing, last):
    """FID of each seed of `routing` at step `last` (the seeds that reached it)."""
    steps, fid, _ = curves(study, routing)
    if not steps or steps[-1] != last:
        return []
    return [float(v) for v in fid[:, -1] if np.isfinite(v)]


def summarise(study):
    """Numbers of one size: final FIDs, paired gaps by step, crossing, whether vanilla flattened."""
    s = study["settings"]
    vanilla_steps, vanilla, _ = curves(study, "none")
    gaps = paired_gaps(study, "dtr")
    last = s["steps"]
    flat = None
    if len(vanilla_steps) >= 2 and vanilla_steps[-1] == last and not np.isnan(vanilla[:, -2:]).any():
        before, after = vanilla[:, -2].mean(), vanilla[:, -1].mean()
        flat = bool((before - after) / before < FLAT_TOLERANCE)
    gap_steps = sorted(gaps)
    return {"size": s["size"], "steps": last,
            "final": {routing: final_fids(study, routing, last) for routing in ("none", "dtr")},
            "gaps": gaps, "final_gap": gaps.get(last, []),
            "crossing": crossing(gap_steps, [float(np.mean(gaps[k])) for k in gap_steps]), "flat": flat}


def plot_sizes(studies, costs, path):
    """FID against step (top) and against training FLOPs (bottom), one column per size, mean and min..max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(studies), figsize=(4 * len(studies), 6), dpi=110, squeeze=False)
    for column, study in enumerate(studies):
        size = study["settings"]["size"]
        params, flops_per_step = costs[size]
        for routing in ("none", "dtr"):
            steps, fid, seeds = curves(study, routing)
            if not steps:
                continue
            with np.errstate(all="ignore"):
                mean, low, high = np.nanmean(fid, 0), np.nanmin(fid, 0), np.nanmax(fid, 0)
            label = f"{ROUTING_LABELS[routing]} ({len(seeds)} seeds)"
            for row, x in ((0, np.array(steps)), (1, np.array(steps) * flops_per_step / 1e15)):
                ax = axes[row][column]
                ax.plot(x, mean, marker="o", color=ROUTING_COLORS[routing], label=label)
                ax.fill_between(x, low, high, color=ROUTING_COLORS[routing], alpha=0.2, linewidth=0)
        axes[0][column].set_title(f"{size}: {params / 1e6:.2f}M params", fontsize=9)
        axes[0][column].set_xlabel("training step")
        axes[1][column].set_xlabel("training PFLOPs")
        for row in (0, 1):
            axes[row][column].grid(alpha=0.3)
            axes[row][column].set_ylabel("FID")
        axes[0][column].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def plot_gap_against_size(summaries, costs, path):
    """Final DTR - vanilla FID gap (mean, one dot per seed) against parameters: Table 5's form."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    for summary in summaries:
        gaps = summary["final_gap"]
        if not gaps:
            continue
        params = costs[summary["size"]][0] / 1e6
        ax.scatter([params] * len(gaps), gaps, color="tab:red", alpha=0.4, s=14)
        ax.errorbar(params, np.mean(gaps), yerr=np.std(gaps, ddof=1) if len(gaps) > 1 else None, fmt="o",
                    color="tab:red", capsize=3)
        ax.annotate(summary["size"], (params, np.mean(gaps)), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (M, log scale)")
    ax.set_ylabel("final FID gap DTR - vanilla\n(negative: DTR better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def size_table(summaries, costs):
    """Markdown: one row per size."""
    lines = ["| size | params (M) | training GFLOPs / step | seeds | vanilla FID | DTR FID | gap DTR - vanilla "
             "(paired) | per seed | mean curves cross | vanilla flat at the end |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for summary in summaries:
        params, flops = costs[summary["size"]]
        flat = {None: "not yet known", True: "yes", False: "no"}[summary["flat"]]
        lines.append(f"| {summary['size']} | {params / 1e6:.2f} | {flops / 1e9:.1f} | {len(summary['final_gap'])} | "
                     f"{mean_std(summary['final']['none'])} | {mean_std(summary['final']['dtr'])} | "
                     f"{mean_std(summary['final_gap'])} | {', '.join(f'{g:+.1f}' for g in summary['final_gap'])} | "
                     f"{summary['crossing']} | {flat} |")
    lines += ["", "Paired gap DTR - vanilla (mean ± std over seeds) at every evaluated step:", "",
              "| size | " + " | ".join(str(s) for s in sorted({k for x in summaries for k in x["gaps"]})) + " |",
              "| --- |" + " --- |" * len({k for x in summaries for k in x["gaps"]})]
    all_steps = sorted({k for x in summaries for k in x["gaps"]})
    for summary in summaries:
        lines.append(f"| {summary['size']} | " + " | ".join(mean_std(summary["gaps"].get(k, [])) for k in all_steps)
                     + " |")
    return "\n".join(lines) + "\n"


def main(args):
    """Read every study folder, write the table and the figures."""
    studies = [read_study(folder) for folder in args.studies]
    for folder, study in zip(args.studies, studies):
        differ = describe_differences(studies[0]["settings"], study["settings"], args.studies[0], folder,
                                      ignore=PER_SIZE_SETTINGS)
        if differ:
            raise UsageError(f"the sizes must share every setting but the model; {differ}")
    costs = {study["settings"]["size"]: model_cost(study["settings"]["size"], study["settings"]["batch_size"])
             for study in studies}
    summaries = [summarise(study) for study in studies]
    os.makedirs(args.out, exist_ok=True)
    table = size_table(summaries, costs)
    atomic_write(os.path.join(args.out, f"{args.prefix}.md"), lambda f: f.write(table), mode="w")
    plot_sizes(studies, costs, os.path.join(args.out, f"{args.prefix}_curves.png"))
    plot_gap_against_size(summaries, costs, os.path.join(args.out, f"{args.prefix}_gap.png"))
    print(table)
    return summaries


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=str, nargs="+", required=True, help="analysis.study --out folders")
    parser.add_argument("--out", type=str, default=".", help="folder for the table and figures")
    parser.add_argument("--prefix", type=str, default="size_study")
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
