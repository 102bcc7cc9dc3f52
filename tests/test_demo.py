"""demo.py: the Fashion-MNIST quick start end to end at CI size (DTR beside vanilla), and its bad-input errors."""
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

import demo
from evaluations.inception import InceptionFeatures
from foundation.usage_error import UsageError
from imagedata.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist_files, read_idx
from launch.cli import run_command
from models.routing import active_channels

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_CONFIG = os.path.join(REPO_ROOT, "configs", "demo_fashion_mnist_ci.yaml")
NUM_SAMPLES, NUM_REFERENCE, CI_WIDTH = 10, 10, 32  # CI config: model_channels 32, beta 0.8
TILE, PAD = 28, 2  # Fashion-MNIST's native size, torchvision make_grid's padding


def demo_args(out, *flags):
    return demo.build_parser().parse_args(["--config", CI_CONFIG, "--out", str(out), *flags])


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """One CI-sized `demo.py --compare` (DTR, then vanilla), counting the Inception passes it makes."""
    if not os.path.isdir(demo.DEBIAN_FASHION_MNIST):
        pytest.skip(f"Fashion-MNIST is not installed in {demo.DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("demo")
    passes, extract = [], InceptionFeatures.extract
    patch = pytest.MonkeyPatch()
    patch.setattr(InceptionFeatures, "extract", lambda self, images, *a, **k: passes.append(len(images)) or
                  extract(self, images, *a, **k))
    try:
        demo.main(demo_args(out, "--compare", "--nproc", "1", "--num-fid-samples", str(NUM_SAMPLES), "--ref-images",
                            str(NUM_REFERENCE), "--grid-steps", "2", "--fid-steps", "2"))
    finally:
        patch.undo()
    return out, passes


def test_demo_compare_extracts_reference_features_once_for_both_runs(compare_run):
    out, passes = compare_run
    assert passes == [NUM_REFERENCE, NUM_SAMPLES, NUM_SAMPLES]  # reference, DTR's samples, vanilla's samples
    assert os.path.isfile(os.path.join(out, "reference", f"fashion-mnist-t10k-n{NUM_REFERENCE}-seed0.inception_cache.npz"))


def test_demo_reuses_a_finished_run_with_the_same_settings(compare_run, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(compare_run[0], out)
    passes = []
    monkeypatch.setattr(InceptionFeatures, "extract", lambda self, images, *a, **k: passes.append(len(images)))
    flags = ["--nproc", "1", "--num-fid-samples", str(NUM_SAMPLES), "--ref-images", str(NUM_REFERENCE),
             "--grid-steps", "2", "--fid-steps", "2"]
    demo.main(demo_args(out, "--routing", "none", *flags))
    assert passes == [] and len(os.listdir(out / "none" / "train")) == 1  # no training, no Inception pass
    with open(out / "report.md") as f:
        assert "# Fashion-MNIST quick start: vanilla\n" in f.read()
    with open(out / "none" / "metrics.json") as f:
        settings = json.load(f)["settings"]
    assert demo.finished_run(out / "none" / "metrics.json", settings) is not None
    for changed in ({**settings, "fid_steps": 3}, {**settings, "config": {**settings["config"], "max_steps": 3}}):
        assert demo.finished_run(out / "none" / "metrics.json", changed) is None  # another setting: train anew


def test_demo_report_opens_with_both_grids_and_the_scored_fids(compare_run):
    out, _ = compare_run
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    fids = {r: json.load(open(os.path.join(out, r, "metrics.json")))["FID"] for r in ("dtr", "none")}
    head = report.split("## ")[0]  # everything before the first section: the grids and the FID row
    assert "![DTR](dtr/grid.png)" in head and "![vanilla](none/grid.png)" in head
    match = re.search(r"^\| FID, 10 samples vs 10 t10k images \| \*\*([0-9.]+)\*\* \| \*\*([0-9.]+)\*\* \|$", head, re.M)
    assert match, head
    assert [float(v) for v in match.groups()] == [pytest.approx(fids["dtr"], abs=0.05), pytest.approx(fids["none"], abs=0.05)]
    assert f"DTR - vanilla = {fids['dtr'] - fids['none']:+.1f} FID" in head  # the honest reading states the gap
    assert "](loss.png)" in report and "](masks.png)" in report
    assert not re.search(r"(?<![\w.])/(usr|work|tmp|home|root)/", report)  # no machine-specific absolute paths


def test_demo_runs_share_seed_and_data_order_and_differ_in_routing(compare_run):
    out, _ = compare_run
    records = {}
    for routing in ("dtr", "none"):
        (experiment,) = os.listdir(os.path.join(out, routing, "train"))
        with open(os.path.join(out, routing, "train", experiment, "metrics.jsonl")) as f:
            records[routing] = [json.loads(line)["step"] for line in f]
        with open(os.path.join(out, routing, "logs", "train.log")) as f:
            assert f"routing {{'routing': '{routing}'" in f.read()
    assert records["dtr"] == records["none"] == [1, 2]  # every logged step of both runs is in the loss plot


def test_demo_grid_has_one_row_per_class_and_eight_columns(compare_run):
    grid = Image.open(os.path.join(compare_run[0], "dtr", "grid.png"))
    rows, cols = len(FASHION_MNIST_CLASSES), demo.GRID_SAMPLES_PER_CLASS
    assert grid.mode == "L"  # 1-channel model: saved as grayscale
    assert grid.size == (cols * (TILE + PAD) + PAD, rows * (TILE + PAD) + PAD)


def test_demo_fid_samples_are_balanced_and_reference_is_a_t10k_subset(compare_run):
    out, _ = compare_run
    (npz,) = [f for f in os.listdir(os.path.join(out, "dtr", "samples")) if f.endswith(".npz")]
    with np.load(os.path.join(out, "dtr", "samples", npz)) as batch:
        assert batch["arr_0"].shape == (NUM_SAMPLES, TILE, TILE, 3) and batch["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(batch["arr_1"], np.arange(NUM_SAMPLES) % len(FASHION_MNIST_CLASSES))
    with np.load(os.path.join(out, "reference", f"fashion-mnist-t10k-n{NUM_REFERENCE}-seed0.npz")) as batch:
        reference = batch["arr_0"]
    t10k = read_idx(fashion_mnist_files(demo.DEBIAN_FASHION_MNIST, "test")[0]).reshape(-1, TILE * TILE)
    rows = {image.tobytes(): i for i, image in enumerate(t10k)}
    assert reference.shape == (NUM_REFERENCE, TILE, TILE, 3) and (reference == reference[..., :1]).all()  # gray x 3
    found = [rows.get(np.ascontiguousarray(image[..., 0]).reshape(-1).tobytes()) for image in reference]
    assert None not in found and len(set(found)) == NUM_REFERENCE  # distinct test-split images


def test_demo_masks_are_the_models_width_with_beta_active(compare_run):
    with np.load(os.path.join(compare_run[0], "masks.npz")) as panels:
        (table,) = panels.values()
    assert table.shape == (1000, CI_WIDTH)
    np.testing.assert_array_equal(table.sum(1), active_channels(CI_WIDTH, 0.8))


def test_demo_bad_routing_and_missing_dataset_end_in_one_line_exit_2(tmp_path, monkeypatch, capsys):
    for argv, named in ((["--routing", "bogus"], "bogus"), (["--data-path", str(tmp_path / "nowhere")], "nowhere")):
        monkeypatch.setattr(sys, "argv", ["demo.py", "--out", str(tmp_path / "out"), *argv])
        with pytest.raises(SystemExit) as stop:
            run_command(demo.main, demo.build_parser())
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and named in err, err
    assert not os.path.exists(tmp_path / "out")  # nothing written for a rejected command


def test_demo_rejects_non_positive_counts(tmp_path):
    with pytest.raises(UsageError, match="--num-fid-samples must be >= 1"):
        demo.main(demo_args(tmp_path, "--num-fid-samples", "0"))
    with pytest.raises(UsageError, match="--fid-cfg-scale must be >= 0, got -1.0"):
        demo.main(demo_args(tmp_path, "--fid-cfg-scale", "-1"))


def test_demo_stage_progress_reads_rank_0s_share_of_the_samples_as_the_whole():
    """sample_ddp.py's rank 0 draws its own share (250 of 500 on 2 ranks): its bar's end is the stage's end."""
    log = ("samples:  40%|####      | 100/250 [00:25<00:38,  3.88it/s]\r"
           "samples: 100%|##########| 250/250 [01:05<00:00,  3.79it/s]\n")
    assert [demo.stage_count(m.groups(), 500) for m in demo.BAR_COUNT.finditer(log)] == [200, 500]
    assert demo.stage_count(demo.TRAIN_STEP.search("(step=0001200) Train Loss: 0.05").groups(), 2400) == 1200
    assert demo.stage_count(demo.TRAIN_STEP.search("(step=0002500)").groups(), 2400) == 2400  # never past the end
