"""Draw a grid of samples from a DiT or ADM checkpoint (with or without DTR) into one PNG (App. C: DDPM 250 steps).

    python sample.py --ckpt results/000-DiT-L-2/checkpoints/0400000.pt --class-labels 207 360 --samples-per-class 4
    python sample.py --ckpt results/001-ADM-ImageNet64/checkpoints/0400000.pt   # any backbone, no model flags
    python sample.py --ckpt DiT-XL-2-256x256.pt                     # official weights, official defaults
    python sample.py --model DiT-XL/2 --image-size 512              # the same, downloaded once into pretrained_models/
    python sample.py --ckpt results/000-TextDiT-B-2/checkpoints/0400000.pt --prompt "a red bus" --prompt "two dogs"
    python sample.py --ckpt ... --prompts-file prompts.txt --samples-per-prompt 4   # text models: one prompt a line

Model, routing and diffusion settings come from the checkpoint; raw state_dicts are built from the
flags with official DiT's defaults (guided-diffusion's for --model ADM-*). Image i of the grid depends only on --seed and i (see
sampling/seeded.py), so it matches sample i of sample_ddp.py for the same labels and settings.
"""
import argparse
import math
import os

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from foundation.atomic_file import atomic_write
from foundation.flag_types import finite_float
from foundation.usage_error import UsageError
from launch.cli import make_output_dir, run_command
from sampling.captioned_grid import captioned_grid
from sampling.checkpoint_flags import add_checkpoint_arguments
from sampling.seeded import (GRID_CFG_SCALE, SAMPLERS, check_sampling_flags, generate, load_for_sampling,
                             load_text_conditioning, parse_guide_channels, to_uint8)
from storage.pretrained import use_pretrained


OFFICIAL_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # official DiT's sample.py grid
MAX_DEFAULT_ROWS = 16  # few-class models: one row per class, at most this many rows


def grid_labels(class_labels, samples_per_class, num_classes):
    """(labels (N,), images per grid row) for the requested classes, validated against num_classes."""
    if num_classes == 1:  # unconditional: every label is 0
        if class_labels and any(y != 0 for y in class_labels):
            raise UsageError(f"--class-labels {class_labels} given, but the model is unconditional (num_classes = 1)")
        n = samples_per_class or 16
        return torch.zeros(n, dtype=torch.long), math.ceil(math.sqrt(n))
    if class_labels is None:
        if num_classes > max(OFFICIAL_CLASS_LABELS):
            class_labels, default_per_class = OFFICIAL_CLASS_LABELS, 1
        else:
            class_labels, default_per_class = list(range(min(num_classes, MAX_DEFAULT_ROWS))), 8
    else:
        default_per_class = 1
    bad = [y for y in class_labels if not 0 <= y < num_classes]
    if bad:
        raise UsageError(f"--class-labels {bad} outside [0, {num_classes}) for this {num_classes}-class model")
    per_class = samples_per_class or default_per_class
    if per_class < 1:
        raise UsageError(f"--samples-per-class must be >= 1, got {per_class}")
    labels = torch.tensor(class_labels, dtype=torch.long).repeat_interleave(per_class)  # (classes * per_class,)
    # one class per row when several per class, else official DiT's 4 columns
    return labels, per_class if per_class > 1 else 4


def read_prompts(prompts, prompts_file):
    """The --prompt values, then the non-empty lines of --prompts-file."""
    prompts = list(prompts or [])
    if prompts_file is not None:
        if not os.path.isfile(prompts_file):
            raise UsageError(f"--prompts-file not found: {prompts_file}")
        with open(prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    return prompts


def grid_captions(prompts, samples_per_prompt):
    """(captions (N,), images per grid row): each prompt repeated, one prompt per row when several per prompt."""
    if samples_per_prompt < 1:
        raise UsageError(f"--samples-per-prompt must be >= 1, got {samples_per_prompt}")
    return [p for p in prompts for _ in range(samples_per_prompt)], samples_per_prompt if samples_per_prompt > 1 else 4


@torch.no_grad()  # sampling only; a decorator, so callers' grad mode is left as it was
def main(args):
    """Sample the grid and save it as a PNG."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_sampling_flags(args)
    prompts = read_prompts(args.prompt, args.prompts_file)
    use_pretrained(args)  # released weights by name: downloaded once into the cache folder

    model, settings, cfg_scale, diffusion, vae = load_for_sampling(args, device, default_cfg_scale=GRID_CFG_SCALE)

    if settings.text_encoder is not None:  # a text-to-image model: a grid of prompts, captions under the images
        if not prompts or args.class_labels is not None:
            raise UsageError(f"{' '.join(args.ckpt)} is a text-to-image model: give --prompt TEXT (repeatable) or "
                             f"--prompts-file, not --class-labels")
        captions, nrow = grid_captions(prompts, args.samples_per_prompt)
        make_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
        condition = load_text_conditioning(settings, model, device).encode(captions)
        samples = generate(model, diffusion, args.sampler, list(range(len(captions))), condition, args.seed,
                           cfg_scale, args.guide_channels, args.mixed_precision, progress=True,
                           clip_denoised=vae is None)
        picture = captioned_grid(to_uint8(samples, vae, settings.latent_scale), captions, nrow)
        atomic_write(args.out, lambda f: picture.save(f, format="PNG"))
        print(args.out)
        return
    if prompts:
        raise UsageError(f"--prompt / --prompts-file need a text-to-image checkpoint; {' '.join(args.ckpt)} is class-conditional")
    labels, nrow = grid_labels(args.class_labels, args.samples_per_class, model.num_classes)
    make_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out")  # a folder we cannot write: before sampling
    samples = generate(model, diffusion, args.sampler, list(range(len(labels))), labels, args.seed, cfg_scale,
                       args.guide_channels, args.mixed_precision, progress=True, clip_denoised=vae is None)
    images = torch.from_numpy(to_uint8(samples, vae, settings.latent_scale)).permute(0, 3, 1, 2)  # (N, C, H, W)
    grid = make_grid(images, nrow=nrow, padding=2).permute(1, 2, 0).numpy()  # (H', W', 3) uint8
    # make_grid repeats one channel to three; 1-channel models (Fashion-MNIST) are saved as grayscale
    picture = Image.fromarray(np.ascontiguousarray(grid[..., 0] if images.shape[1] == 1 else grid))
    atomic_write(args.out, lambda f: picture.save(f, format="PNG"))
    print(args.out)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--sampler", type=str, choices=SAMPLERS, default="ddpm",
                        help="ddpm: the paper's protocol; dpm-solver++ (2M) tracks FID at 20-25 steps")
    parser.add_argument("--num-sampling-steps", type=int, default=250)
    parser.add_argument("--cfg-scale", type=finite_float, default=None,
                        help=f"default {GRID_CFG_SCALE} for conditional models (official grid), 1 for unconditional")
    parser.add_argument("--guide-channels", type=parse_guide_channels, default="all",
                        help="'all' latent channels, or 3 for official DiT's legacy 3-channel guidance")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="default: official DiT's 8 classes, or one row per class for few-class models")
    parser.add_argument("--samples-per-class", type=int, default=None,
                        help="images per class (one class per grid row); unconditional: number of images")
    parser.add_argument("--prompt", type=str, action="append", default=None,
                        help="text-to-image models: a caption to draw (repeatable)")
    parser.add_argument("--prompts-file", type=str, default=None, help="text-to-image models: one caption a line")
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="images per caption (one caption per row)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-precision", type=str, choices=["no", "bf16"], default="no")
    parser.add_argument("--out", type=str, default="sample.png")
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
