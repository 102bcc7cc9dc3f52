"""EMA sample grid every --sample-every steps: <run>/samples/<step:07d>.png, 16 fixed samples, DDIM-50.

The same 16 sample indices (labels and noise seeded by (global seed, index), as sample_ddp.py) at every
grid, so grids of one run show the same images improving. Drawn by rank 0 only; the samplers use their
own generators, and the global RNG is forked anyway, so training continues bit for bit as without grids.
"""
import io

import numpy as np
import torch
from PIL import Image

from diffusion import create_diffusion
from foundation.atomic_file import atomic_write
from models.label_dropout import CFG_DROP_PROB
from models.vae import LATENT_SCALE
from sampling.seeded import FID_CFG_SCALE, class_labels, generate, resolve_cfg_scale, to_uint8

GRID_SAMPLES = 16  # a 4 x 4 grid
GRID_STEPS = 50    # DDIM steps: enough to see structure, cheap next to thousands of training steps


def tile(images, columns=4):
    """(N, H, W, C) uint8 -> one (rows * H, columns * W, C) image, row-major."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        grid[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = image
    return grid


@torch.no_grad()
def ema_sample_grid(ema, diffusion_config, global_seed, vae=None, latent_scale=LATENT_SCALE):
    """(4H, 4W, C) uint8 grid of GRID_SAMPLES samples of the EMA model (VAE-decoded for latent models)."""
    device = next(ema.parameters()).device
    diffusion = create_diffusion(**{**diffusion_config, "timestep_respacing": f"ddim{GRID_STEPS}"})
    indices = list(range(GRID_SAMPLES))
    labels = class_labels(indices, ema.num_classes, global_seed, balanced=True)
    cfg_scale = resolve_cfg_scale(None, ema.num_classes, FID_CFG_SCALE,
                                  ema.config.get("class_dropout_prob", CFG_DROP_PROB))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        samples = generate(ema, diffusion, "ddim", indices, labels, global_seed, cfg_scale,
                           clip_denoised=vae is None)  # (16, C, H, W) in model space
    return tile(to_uint8(samples, vae, latent_scale))


def save_grid(path, grid):
    """PNG of the grid, written atomically (grayscale grids as L images)."""
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
