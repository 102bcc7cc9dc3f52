"""demo.py: the Fashion-MNIST quick start end to end at CI size, and its bad-input errors."""
import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

import demo
from foundation.usage_error import UsageError
from imagedata.fashion_mnist import FASHION_MNIST_CLASSES
from models.routing import active_channels

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_CONFIG = os.path.join(REPO_ROOT, "configs", "demo_fashion_mnist_ci.yaml")
NUM_SAMPLES, NUM_REFERENCE, STEPS = 10, 10, 3
TILE, PAD = 28, 2  # Fashion-MNIST's native size, torchvision make_grid's padding


def demo_args(tmp_path, *flags):
    return demo.build_parser().parse_args(["--config", CI_CONFIG, "--results-dir", str(tmp_path), *flags])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One CI-sized run of the whole pipeline (skipped when Fashion-MNIST is neither installed nor downloadable)."""
    if not demo.has_fashion_mnist(demo.DEBIAN_FASHION_MNIST):
        pytest.skip(f"Fashion-MNIST is not installed in {demo.DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    tmp_path = tmp_path_factory.mktemp("demo")
    args = demo_args(tmp_path, "--steps", str(STEPS), "--num-fid-samples", str(NUM_SAMPLES), "--ref-images",
                     str(NUM_REFERENCE), "--grid-sampling-steps", "2", "--fid-sampling-steps", "2")
    return demo.main(args)


def test_demo_writes_run_folder_named_after_routing(run_dir):
    assert os.path.basename(run_dir) == "demo-fashion-mnist-dtr"
    for name in ("report.md", "grid.png", "loss.png", "masks.png", "metrics.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name


def test_demo_report_states_the_evaluators_finite_fid(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        fid = json.load(f)["FID"]
    with open(os.path.join(run_dir, "report.md")) as f:
        report = f.read()
    match = re.search(r"^\| FID \| ([0-9.]+) \|$", report, re.MULTILINE)
    assert match, report
    assert math.isfinite(float(match.group(1))) and float(match.group(1)) == pytest.approx(fid, abs=0.005)
    for picture in ("grid.png", "loss.png", "masks.png"):
        assert f"]({picture})" in report


def test_demo_grid_has_one_row_per_class_and_eight_columns(run_dir):
    grid = Image.open(os.path.join(run_dir, "grid.png"))
    rows, cols = len(FASHION_MNIST_CLASSES), demo.GRID_SAMPLES_PER_CLASS
    assert grid.mode == "L"  # 1-channel model: saved as grayscale
    assert grid.size == (cols * (TILE + PAD) + PAD, rows * (TILE + PAD) + PAD)


def test_demo_fid_samples_are_balanced_rgb_uint8(run_dir):
    sample_dirs = [os.path.join(root) for root, _, files in os.walk(run_dir) if any(f.endswith(".npz") for f in files)
                   and root.endswith("samples")]
    assert len(sample_dirs) == 1
    npz = [f for f in os.listdir(sample_dirs[0]) if f.endswith(".npz")]
    with np.load(os.path.join(sample_dirs[0], npz[0])) as batch:
        images, labels = batch["arr_0"], batch["arr_1"]
    assert images.shape == (NUM_SAMPLES, TILE, TILE, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(NUM_SAMPLES) % len(FASHION_MNIST_CLASSES))


def test_demo_reference_is_a_t10k_subset_of_the_requested_size(run_dir):
    reference = os.path.join(os.path.dirname(run_dir), "demo-reference", f"fashion-mnist-t10k-n{NUM_REFERENCE}-seed0.npz")
    with np.load(reference) as batch:
        assert batch["arr_0"].shape == (NUM_REFERENCE, TILE, TILE, 3)


def test_demo_masks_picture_shows_beta_share_of_active_channels(run_dir):
    picture = np.asarray(Image.open(os.path.join(run_dir, "masks.png")).convert("RGB")).reshape(-1, 3)
    active = np.all(picture == demo.ACTIVE_RGB, axis=1).sum()
    inactive = np.all(picture == demo.INACTIVE_RGB, axis=1).sum()
    # every DTR row activates floor(beta * C) of C = 32 channels (CI config: width 32, beta 0.8)
    assert active / (active + inactive) == pytest.approx(active_channels(32, 0.8) / 32, abs=1e-9)


def test_demo_loss_curve_covers_every_logged_step(run_dir):
    metrics = [os.path.join(root, "metrics.jsonl") for root, _, files in os.walk(run_dir) if "metrics.jsonl" in files]
    with open(metrics[0]) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, STEPS + 1))
    loss = Image.open(os.path.join(run_dir, "loss.png"))
    assert loss.size == (640, 400)
    colours = np.unique(np.asarray(loss.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 2  # axes, ticks and a curve were drawn on the white canvas


def test_demo_rejects_a_data_path_without_fashion_mnist(tmp_path):
    with pytest.raises(UsageError, match="does not hold the Fashion-MNIST"):
        demo.main(demo_args(tmp_path, "--data-path", str(tmp_path), "--results-dir", str(tmp_path / "results")))
    assert not os.path.exists(tmp_path / "results")  # nothing written for a rejected command


def test_demo_rejects_non_positive_counts(tmp_path):
    with pytest.raises(UsageError, match="--num-fid-samples must be >= 1"):
        demo.main(demo_args(tmp_path, "--num-fid-samples", "0"))
    with pytest.raises(UsageError, match="--fid-cfg-scale must be a finite number >= 0, got -1.0"):
        demo.main(demo_args(tmp_path, "--fid-cfg-scale", "-1"))
    with pytest.raises(SystemExit):  # argparse: expected a finite number
        demo_args(tmp_path, "--grid-cfg-scale", "nan")
