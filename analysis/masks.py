"""The routing masks of Fig. 2: one (T, C) table per routing kind and (alpha, beta), from models.routing.build_masks.

    python -m analysis.masks --out masks.png                                  # every kind, alpha {1, 4}, beta {0.5, 0.8}
    python -m analysis.masks --kinds dtr --alphas 1 2 4 8 --betas 0.8 --channels 1152 --out dtr_alpha.png

Row t (t = 0, the least noisy task, at the top) marks the channels the task of timestep t activates: yellow on,
purple off (viridis' two ends, as the paper). The tables are also written as <out>.npz (one array per panel).
"""
import argparse
import os

import numpy as np

from foundation.atomic_file import atomic_write
from foundation.flag_types import finite_float
from foundation.usage_error import UsageError
from launch.cli import run_command
from models.routing import NUM_TIMESTEPS, ROUTING_KINDS, build_masks, validate_routing

ALPHA_FREE_KINDS = ("none", "random", "ercdt")  # kinds whose table does not depend on alpha
BETA_FREE_KINDS = ("none", "ercdt")  # ... nor on beta (ercdt's split is fixed by Appendix F)


def mask_panels(kinds, alphas, betas, channels, num_tasks=NUM_TIMESTEPS, seed=0):
    """[(kind, alpha, beta, (T, C) 0/1 array)] for every kind x alpha x beta, each distinct table once."""
    panels = []
    for kind in kinds:
        for beta in (betas[:1] if kind in BETA_FREE_KINDS else betas):
            for alpha in (alphas[:1] if kind in ALPHA_FREE_KINDS else alphas):
                masks = build_masks(kind, num_tasks, channels, alpha, beta, seed).numpy()  # (T, C)
                panels.append((kind, alpha, beta, masks))
    return panels


def panel_title(kind, alpha, beta):
    if kind == "none":
        return "none (vanilla)"
    if kind == "ercdt":
        return "ercdt (K = 8 clusters)"
    if kind in ALPHA_FREE_KINDS:
        return f"{kind}, beta={beta:g}"
    return f"{kind}, alpha={alpha:g}, beta={beta:g}"


def plot_masks(panels, out_path, columns=4):
    """A grid of mask tables (PNG) and their numbers (<out>.npz, keys kind_alpha_beta)."""
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    rows = -(-len(panels) // columns)
    columns = min(columns, len(panels))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), dpi=110, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (kind, alpha, beta, masks) in zip(axes.flat, panels):
        ax.imshow(masks, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(panel_title(kind, alpha, beta), fontsize=9)
        ax.set_xlabel(f"channel (C = {masks.shape[1]})", fontsize=8)
        ax.set_ylabel("timestep t", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("Task routing masks (Fig. 2): yellow = active channel, purple = off", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    atomic_write(out_path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    arrays = {f"{kind}_alpha{alpha:g}_beta{beta:g}": masks.astype(np.uint8) for kind, alpha, beta, masks in panels}
    atomic_write(os.path.splitext(out_path)[0] + ".npz", lambda f: np.savez_compressed(f, **arrays))


def main(args):
    """Check every (kind, alpha, beta) first, then draw them all."""
    for kind in args.kinds:
        for alpha in args.alphas:
            for beta in args.betas:
                try:
                    validate_routing(kind, args.num_tasks, args.channels, alpha, beta)
                except ValueError as error:
                    raise UsageError(str(error)) from None
    panels = mask_panels(args.kinds, args.alphas, args.betas, args.channels, args.num_tasks, args.seed)
    plot_masks(panels, args.out, args.columns)
    print(f"{len(panels)} mask tables -> {args.out} and {os.path.splitext(args.out)[0]}.npz")
    return panels


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", type=str, nargs="+", choices=ROUTING_KINDS, default=list(ROUTING_KINDS))
    parser.add_argument("--alphas", type=finite_float, nargs="+", default=[1.0, 4.0], help="DTR window shift (Eq. 4)")
    parser.add_argument("--betas", type=finite_float, nargs="+", default=[0.5, 0.8], help="share of active channels")
    parser.add_argument("--channels", type=int, default=128, help="C; DiT-L/2 routes 1024, DiT-XL/2 1152")
    parser.add_argument("--num-tasks", type=int, default=NUM_TIMESTEPS, help="T, the diffusion steps")
    parser.add_argument("--seed", type=int, default=0, help="R-TR seed")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--out", type=str, default="masks.png")
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
