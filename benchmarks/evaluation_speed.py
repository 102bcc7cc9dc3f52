"""Evaluation cost on this machine: Inception images/s against a matmul peak measured in the same run, FID time,
and precision/recall memory at 10K x 10K.

    python -m benchmarks.evaluation_speed                       # this machine's best kernels (AVX-512 here)
    ATEN_CPU_CAPABILITY=avx2 python -m benchmarks.evaluation_speed   # force the AVX2 kernels

The machine may be shared: every speed is a ratio measured in this run, with the plain torch-fidelity network
(NCHW, BatchNorm unfolded: the evaluator before) and the evaluator's network (BatchNorm folded, channels-last)
timed in alternating rounds, each next to a fresh fp32 matmul measurement; medians over rounds.
"""
import argparse
import resource
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from evaluations.inception import InceptionFeatures
from evaluations.metrics import feature_statistics, frechet_distance, frechet_distance_of_features, precision_recall


def seconds(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def peak_rss_mib():
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_gflops(function, flop, repeats=3):
    """GFLOP/s of the fastest of `repeats` calls (after one warm-up call)."""
    function()
    return flop / min(seconds(function) for _ in range(repeats)) / 1e9


def matmul_peak_gflops(n=2048):
    """fp32 matmul GFLOP/s on this process's threads: (BLAS sgemm, oneDNN's GEMM as a 1x1 convolution).

    Both count: the BLAS torch links may not use every unit of a CPU it was not tuned for (MKL on AMD), and
    oneDNN's JIT kernels are the ones the convolutions run on, so the larger is the peak we hold them to.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    x = torch.randn(1, n, 32, 32).to(memory_format=torch.channels_last)  # (1, C, H, W): H W = 1024 rows
    w = torch.randn(n, n, 1, 1).to(memory_format=torch.channels_last)
    with torch.no_grad():
        return (best_gflops(lambda: torch.mm(a, b), 2 * n ** 3),
                best_gflops(lambda: torch.nn.functional.conv2d(x, w), 2 * 1024 * n * n))


def inception_flops_per_image(inception, size):
    """FLOPs of one image's forward (convolutions and matmuls, as FlopCounterMode counts them)."""
    image = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        inception(image)
    return counter.get_total_flops()


def main(args):
    """Print the Inception throughput table, then FID and precision/recall costs."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, device {device}")
    networks = {"before (NCHW, BatchNorm)": InceptionFeatures(args.inception_weights, device=device, fast=False),
                "evaluator (folded, channels-last)": InceptionFeatures(args.inception_weights, device=device)}
    images = np.random.default_rng(0).integers(0, 256, (args.num_images, args.size, args.size, 3), dtype=np.uint8)
    flops = inception_flops_per_image(networks["evaluator (folded, channels-last)"], args.size)
    outputs = {name: net.extract(images[:args.batch_size], args.batch_size, desc="warm-up")
               for name, net in networks.items()}
    reference, fast = outputs.values()
    drift = np.abs(fast["pool_3"] - reference["pool_3"]).max() / np.abs(reference["pool_3"]).max()

    rates, fractions, peaks = {name: [] for name in networks}, {name: [] for name in networks}, []
    for _ in range(args.rounds):
        for name, net in networks.items():
            peaks.append(matmul_peak_gflops() if device == "cpu" else (float("nan"),) * 2)
            peak = max(peaks[-1])
            elapsed = seconds(lambda: net.extract(images, args.batch_size, desc=name))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            rates[name].append(args.num_images / elapsed)
            fractions[name].append(rates[name][-1] * flops / 1e9 / peak)
    blas, onednn = np.array(peaks).T
    print(f"\nInception-v3 at {args.size}px: {flops / 1e9:.2f} GFLOP per image; batch {args.batch_size}, "
          f"{args.num_images} images x {args.rounds} rounds; fp32 matmul peak (2048^3, best of 3 next to each "
          f"timing): BLAS median {np.median(blas):.1f} GFLOP/s (range {blas.min():.1f}-{blas.max():.1f}), oneDNN "
          f"median {np.median(onednn):.1f} (range {onednn.min():.1f}-{onednn.max():.1f}); each timing is held "
          f"to the larger one measured next to it")
    print(f"{'network':<36} {'images/s':>9} {'GFLOP/s':>8} {'of matmul peak':>15}")
    for name in networks:
        rate = np.median(rates[name])
        print(f"{name:<36} {rate:>9.2f} {rate * flops / 1e9:>8.1f} {np.median(fractions[name]):>14.0%}")
    before, after = (np.median(r) for r in rates.values())
    print(f"speed-up {after / before:.2f}x; pool_3 features differ by {drift:.1e} of their largest value")

    # FID: the evaluator's exact (n, n) route for n <= 2048 against ADM's 2048 x 2048 sqrtm (whose singular
    # S1 S2 needs an eps retry)
    rng = np.random.default_rng(1)
    ref_mu, ref_sigma = feature_statistics(rng.standard_normal((4096, 2048)))
    samples = rng.standard_normal((args.fid_samples, 2048)) + 0.1
    start = time.perf_counter()
    exact = frechet_distance_of_features(samples, ref_mu, ref_sigma)
    exact_seconds = time.perf_counter() - start
    line = f"\nFID of {args.fid_samples} samples: (n, n) route {exact_seconds:.2f} s"
    if args.fid_sqrtm:
        start = time.perf_counter()
        adm = frechet_distance(*feature_statistics(samples), ref_mu, ref_sigma)
        sqrtm_seconds = time.perf_counter() - start
        line += (f", 2048 x 2048 sqrtm {sqrtm_seconds:.1f} s ({sqrtm_seconds / exact_seconds:.0f}x); "
                 f"relative gap {abs(adm - exact) / exact:.1e}")
    print(line)

    real = torch.from_numpy(rng.standard_normal((args.pr_points, 2048), dtype=np.float32)).to(device)
    fake = torch.from_numpy(rng.standard_normal((args.pr_points, 2048), dtype=np.float32)).to(device)
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    precision, recall = precision_recall(real, fake, k=3, batch_size=args.pr_batch_size)
    pr_seconds = time.perf_counter() - start
    print(f"Precision/recall {args.pr_points} x {args.pr_points} (batch {args.pr_batch_size}): {pr_seconds:.1f} s, "
          f"peak RSS {peak_rss_mib():.0f} MiB (was {rss_before:.0f} MiB before; one distance block "
          f"{args.pr_batch_size ** 2 * 4 / 2**20:.0f} MiB); precision {precision:.3f}, recall {recall:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=50, help="the evaluator's default")
    parser.add_argument("--size", type=int, default=256, help="image side before the resize to 299")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fid-samples", type=int, default=500)
    parser.add_argument("--fid-sqrtm", action="store_true", help="also time ADM's sqrtm route (minutes on CPU)")
    parser.add_argument("--pr-points", type=int, default=2000)
    parser.add_argument("--pr-batch-size", type=int, default=5000)
    parser.add_argument("--inception-weights", type=str, default=None)
    parser.add_argument("--device", type=str, default=None)
    main(parser.parse_args())
