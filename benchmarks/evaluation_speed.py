"""Evaluation cost on this machine: Inception feature throughput and precision/recall memory at 10K x 10K.

python -m benchmarks.evaluation_speed --num-images 32 --pr-points 10000
"""
import argparse
import resource
import time

import numpy as np
import torch

from evaluations.inception import InceptionFeatures
from evaluations.metrics import precision_recall


def peak_rss_mib():
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(args):
    """Time and memory of precision/recall (first, so peak RSS is its own), then Inception images/s."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(1)
    real = torch.from_numpy(rng.standard_normal((args.pr_points, 2048), dtype=np.float32)).to(device)
    fake = torch.from_numpy(rng.standard_normal((args.pr_points, 2048), dtype=np.float32)).to(device)
    rss_before = peak_rss_mib()  # torch's CPU allocations are invisible to tracemalloc; peak RSS sees them
    start = time.perf_counter()
    precision, recall = precision_recall(real, fake, k=3, batch_size=args.pr_batch_size)
    seconds = time.perf_counter() - start
    inputs_mib = 2 * real.numel() * 4 / 2**20
    print(f"Precision/recall {args.pr_points} x {args.pr_points} (batch {args.pr_batch_size}): {seconds:.1f} s, "
          f"peak RSS {peak_rss_mib():.0f} MiB (was {rss_before:.0f} MiB before; inputs {inputs_mib:.0f} MiB; "
          f"one distance block {args.pr_batch_size ** 2 * 4 / 2**20:.0f} MiB); precision {precision:.3f}, recall {recall:.3f}")

    inception = InceptionFeatures(args.inception_weights, device=device)
    images = np.random.default_rng(0).integers(0, 256, (args.num_images, 256, 256, 3), dtype=np.uint8)
    inception.extract(images[:args.batch_size], args.batch_size, desc="warm-up")
    start = time.perf_counter()
    inception.extract(images, args.batch_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"Inception features ({device}, {torch.get_num_threads()} threads, batch {args.batch_size}, 256px): "
          f"{args.num_images / seconds:.2f} images/s")
    if device.startswith("cuda"):
        print(f"CUDA peak memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pr-points", type=int, default=10_000)
    parser.add_argument("--pr-batch-size", type=int, default=5000)
    parser.add_argument("--inception-weights", type=str, default=None)
    parser.add_argument("--device", type=str, default=None)
    main(parser.parse_args())
