"""Sampling throughput (images/s) of DDPM-250 and DDIM-50, with and without CFG, for a tiny DiT and DiT-S/2.

    python -m benchmarks.sampling_throughput --models tiny DiT-S/2 --batch-size 8 --measure-steps 3

Runs the real sampling path (sampling.seeded.generate: per-sample noise, CFG wrapper, DDPM/DDIM step)
for --measure-steps steps and extrapolates to the full step count (model cost per step is the same
at every step); the printed numbers are labelled "extrapolated". The VAE decode (once per image)
is not included. Random weights: speed does not depend on them.
"""
import argparse
import time

import torch

from diffusion import create_diffusion
from models import DiT, create_model
from sampling.seeded import FID_CFG_SCALE, class_labels, generate


def build(name):
    """The tiny test DiT (1-channel 8x8 pixels, 10 classes) or a zoo model on 256px latents (32x32x4)."""
    if name == "tiny":
        return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                   routing="dtr")
    return create_model(name, input_size=32, num_classes=1000, routing="dtr")


def seconds_per_step(model, sampler, batch_size, steps, cfg_scale, repeats):
    """Best-of-`repeats` wall time of one sampling step on a batch (warm-up run first)."""
    diffusion = create_diffusion(f"ddim{steps}" if sampler == "ddim" else str(steps))
    indices = list(range(batch_size))
    y = class_labels(indices, model.num_classes, 0, balanced=False)
    generate(model, diffusion, sampler, indices[:1], y[:1], 0, cfg_scale)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(model, diffusion, sampler, indices, y, 0, cfg_scale)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best / steps


def main(args):
    """Print one row per (model, sampler, cfg): seconds per step and extrapolated images/s."""
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"timed {args.measure_steps} steps, best of {args.repeats}; full step counts extrapolated")
    print(f"{'model':<10} {'sampler':<9} {'cfg':>4} {'s/step':>9} {'images/s (extrapolated)':>24}")
    for name in args.models:
        model = build(name).to(device).eval()
        for sampler, full_steps in [("ddpm", 250), ("ddim", 50)]:
            for cfg_scale in (1.0, FID_CFG_SCALE):
                per_step = seconds_per_step(model, sampler, args.batch_size, args.measure_steps, cfg_scale,
                                            args.repeats)
                images_per_s = args.batch_size / (per_step * full_steps)
                print(f"{name:<10} {sampler}-{full_steps:<4} {cfg_scale:>4} {per_step:>9.4f} {images_per_s:>24.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "DiT-S/2"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--measure-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    main(parser.parse_args())
