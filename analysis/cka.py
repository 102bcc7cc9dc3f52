"""Linear CKA between the block outputs of one model at different timesteps (Fig. 6, Sec. 5.4).

    python -m analysis.cka --ckpt results/000-DiT-S-2/checkpoints/0001600.pt \\
        --data-path /usr/share/datasets/fashion-mnist --out cka/          # pixel models: images
    python -m analysis.cka --ckpt ... --feature-path features/imagenet256 --out cka/   # latent models

Blocks: DiT's transformer blocks, or ADM's ResBlocks and attention blocks in forward order (where DTR routes).
Latent inputs are the VAE posterior means of extract_features.py's folders (either --latent-stat).

A fixed, seeded set of inputs x_0 is noised to x_t = q(x_t | x_0) with one fixed noise for every t, run through
the (EMA) model at each timestep of a grid, and every block's output tokens are kept. For each block, the
timestep x timestep matrix of linear CKA between those features is written as a heatmap (<out>/cka.png) and as
numbers (<out>/cka.npz: cka (blocks, G, G), timesteps (G,)). High CKA between t and t' means the block computes
similar representations for the two denoising tasks; DTR lowers it between distant timesteps.
"""
import argparse
import os

import numpy as np
import torch

from diffusion import create_diffusion
from foundation.atomic_file import atomic_write
from foundation.usage_error import UsageError
from imagedata import LatentFeatureDataset, build_dataset
from launch.cli import run_command
from sampling.model_from_checkpoint import load_checkpoint


#################################################################################
#                                  Linear CKA                                   #
#################################################################################

def linear_cka(X, Y):
    """Linear CKA of (n, p) and (n, q) features (Kornblith et al. 2019, Eq. 3 via feature-space products).

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc: the same number as the
    centred-Gram form HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, but in O(n p q) time and
    O(p q) memory, so n (every token of every image) can be large. Computed in float64.
    """
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"linear_cka needs (n, p) and (n, q) features with the same n, got {tuple(X.shape)} "
                         f"and {tuple(Y.shape)}")
    X = X.double() - X.double().mean(0, keepdim=True)
    Y = Y.double() - Y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(Y.T @ X) ** 2
    return (cross / (torch.linalg.matrix_norm(X.T @ X) * torch.linalg.matrix_norm(Y.T @ Y))).item()


def cka_matrix(features):
    """(G, G) linear CKA between every pair of G feature sets, each (n, d); symmetric with ones on the diagonal."""
    centred = [f.double() - f.double().mean(0, keepdim=True) for f in features]
    self_norms = [torch.linalg.matrix_norm(f.T @ f) for f in centred]
    g = len(features)
    matrix = np.ones((g, g))
    for i in range(g):
        for j in range(i + 1, g):
            cross = torch.linalg.matrix_norm(centred[j].T @ centred[i]) ** 2
            matrix[i, j] = matrix[j, i] = (cross / (self_norms[i] * self_norms[j])).item()
    return matrix


#################################################################################
#                          Block features at each timestep                      #
#################################################################################

def fixed_inputs(dataset, num_images, seed):
    """(x_0 (N, C, H, W), y (N,)): a seeded subset of the dataset, the same on every call."""
    if num_images > len(dataset):
        raise UsageError(f"--num-images {num_images} exceeds the {len(dataset)} samples of the data")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_images]
    items = [dataset[int(i)] for i in order]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def routed_blocks(model):
    """The blocks whose outputs are compared, in forward order: DiT's transformer blocks; ADM's ResBlocks and
    attention blocks (DTR routes each after its first GroupNorm, App. A.1)."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    from models.adm import AttentionBlock, ResBlock  # ADM only
    return [module for module in model.modules() if isinstance(module, (ResBlock, AttentionBlock))]


def tokens(output):
    """A block's output as (tokens, channels): DiT's (B, L, D) -> (B * L, D); ADM's (B, C, H, W) -> (B * H * W, C)."""
    if output.dim() == 4:
        output = output.permute(0, 2, 3, 1)
    return output.reshape(-1, output.shape[-1])


@torch.no_grad()
def block_features(model, diffusion, x0, y, timesteps, noise, batch_size=64):
    """{t: [(N * L, D) output tokens of block b for b in routed_blocks(model)]}, from forward hooks."""
    blocks = routed_blocks(model)
    captured = []
    hooks = [block.register_forward_hook(lambda module, inputs, output: captured.append(output))
             for block in blocks]
    features = {}
    try:
        for t in timesteps:
            per_block = [[] for _ in blocks]
            for start in range(0, x0.shape[0], batch_size):
                x = x0[start:start + batch_size]
                tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
                x_t = diffusion.q_sample(x, tt, noise=noise[start:start + batch_size])
                captured.clear()
                model(x_t, tt, y[start:start + batch_size])
                for b, output in enumerate(captured):  # (B, L, D) or (B, C, H, W) per block
                    per_block[b].append(tokens(output).float().cpu())
            features[int(t)] = [torch.cat(chunks) for chunks in per_block]  # (N * L, D)
    finally:
        for hook in hooks:
            hook.remove()
    return features


def timestep_cka(model, diffusion, x0, y, timesteps, seed=0, batch_size=64):
    """(blocks, G, G) linear CKA between each block's outputs at every pair of timesteps (Fig. 6)."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device)
    features = block_features(model, diffusion, x0, y, timesteps, noise, batch_size)
    return np.stack([cka_matrix([features[int(t)][b] for t in timesteps]) for b in range(len(features[int(timesteps[0])]))])


def plot_cka(cka, timesteps, out_path, title, columns=4):
    """One t x t heatmap per block (viridis, CKA from 0 to 1), t = 0 top-left as in Fig. 6."""
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    blocks = cka.shape[0]
    columns = min(columns, blocks)
    rows = -(-blocks // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.8 * columns, 2.6 * rows), dpi=110, squeeze=False)
    for ax in axes.flat[blocks:]:
        ax.axis("off")
    ticks = list(range(len(timesteps)))
    labels = [str(int(t)) for t in timesteps]
    for b, ax in enumerate(axes.flat[:blocks]):
        image = ax.imshow(cka[b], vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title(f"block {b}", fontsize=9)
        step = max(1, len(ticks) // 5)
        ax.set_xticks(ticks[::step], labels[::step], fontsize=7)
        ax.set_yticks(ticks[::step], labels[::step], fontsize=7)
        ax.set_xlabel("timestep t", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="linear CKA")
    fig.suptitle(title, fontsize=10)
    atomic_write(out_path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


#################################################################################
#                                    Command                                    #
#################################################################################

def open_inputs(args, image_size):
    """The dataset of x_0: images, or latents whose posterior MEAN is x_0 (a fixed input per image, as CKA needs;
    training draws mean + std * eps instead, which would add a second noise on top of q(x_t | x_0)'s)."""
    try:
        if args.feature_path is not None:
            return LatentFeatureDataset(args.feature_path, flip=False, seed=args.seed, latent_stat="mean")
        return build_dataset(data_path=args.data_path, image_size=image_size, flip=False, seed=args.seed)
    except (OSError, ValueError) as error:  # no manifest, unreadable shards, no images
        flag = "--feature-path" if args.feature_path is not None else "--data-path"
        raise UsageError(f"{flag}: {error}") from None


def main(args):
    """Load a checkpoint, compute per-block timestep CKA on fixed inputs, write cka.png and cka.npz."""
    if args.num_images < 2 or args.num_timesteps < 2:
        raise UsageError(f"--num-images and --num-timesteps must be >= 2, got {args.num_images}, {args.num_timesteps}")
    if (args.data_path is None) == (args.feature_path is None):
        raise UsageError("give exactly one of --data-path (pixel models: images) and --feature-path (latents)")
    if not os.path.isfile(args.ckpt):
        raise UsageError(f"--ckpt {args.ckpt}: no such file")
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, settings = load_checkpoint(args.ckpt, use_model_weights=args.use_model_weights)
    model = model.to(device)
    diffusion = create_diffusion(**{**settings.diffusion_config, "timestep_respacing": ""})
    num_tasks = diffusion.num_timesteps
    timesteps = np.unique(np.round(np.linspace(0, num_tasks - 1, args.num_timesteps)).astype(int))
    if hasattr(model, "context_dim"):
        raise UsageError(f"--ckpt {args.ckpt} is a text-to-image model; analysis.cka takes class-conditional or "
                         "unconditional DiT and ADM checkpoints")
    x0, y = fixed_inputs(open_inputs(args, settings.image_size), args.num_images, args.seed)
    expected = (model.config["in_channels"], model.config["input_size"], model.config["input_size"])
    if tuple(x0.shape[1:]) != expected:
        raise UsageError(f"the data gives inputs {tuple(x0.shape[1:])}, the model takes {expected}")
    if model.num_classes == 1:
        y = torch.zeros_like(y)  # unconditional models have one class
    cka = timestep_cka(model, diffusion, x0.to(device), y.to(device), timesteps, args.seed, args.batch_size)
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "cka.npz"),
                 lambda f: np.savez(f, cka=cka, timesteps=timesteps, num_images=args.num_images))
    routing = model.routing_config()
    plot_cka(cka, timesteps, os.path.join(args.out, "cka.png"),
             f"{os.path.basename(args.ckpt)}: linear CKA of block outputs across timesteps "
             f"(routing {routing['routing']}, {args.num_images} inputs)")
    print(f"{cka.shape[0]} blocks x {len(timesteps)} timesteps -> {args.out}/cka.png, {args.out}/cka.npz")
    return cka, timesteps


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=str, required=True, help="a DiT or ADM checkpoint (EMA weights)")
    parser.add_argument("--data-path", type=str, default=None, help="images (pixel-space models)")
    parser.add_argument("--feature-path", type=str, default=None,
                        help="extract_features.py latents (their posterior means are x_0)")
    parser.add_argument("--out", type=str, default="cka")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--num-timesteps", type=int, default=10, help="evenly spaced over [0, T - 1]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="picks the inputs and their noise")
    parser.add_argument("--use-model-weights", action="store_true", help="raw training weights, not EMA")
    parser.add_argument("--device", type=str, default=None)
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
