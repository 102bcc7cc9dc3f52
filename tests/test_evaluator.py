"""Pins evaluations/evaluator.py end to end on tiny batches: output lines, JSON, reference cache, statistics.

The Frechet distance is pinned in test_metrics.py; with 10 images it takes the exact (n, n) route, so it is cheap.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch_fidelity", reason="torch-fidelity (eval extra) is not installed")

from evaluations import evaluator  # noqa: E402
from evaluations.inception import InceptionFeatures  # noqa: E402
from evaluations.metrics import frechet_distance_of_features  # noqa: E402
from foundation.usage_error import UsageError  # noqa: E402
from launch.cli import run_command  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N_IMAGES = 10


@pytest.fixture(scope="module")
def inception():
    try:
        return InceptionFeatures()
    except FileNotFoundError as error:
        pytest.skip(f"no Inception weights on this machine: {error}")


def write_images(path, seed, n=N_IMAGES, size=16):
    np.savez(path, arr_0=np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return str(path)


def test_main_prints_five_metrics_and_writes_json_then_reuses_the_reference_cache(tmp_path, monkeypatch,
                                                                                  capsys, inception):
    ref, sample = write_images(tmp_path / "ref.npz", 0), write_images(tmp_path / "sample.npz", 1)
    monkeypatch.setattr(evaluator, "InceptionFeatures", lambda *args, **kwargs: inception)
    evaluator.main(argparse.Namespace(ref_batch=ref, sample_batch=sample, inception_weights=None,
                                      batch_size=5, device="cpu", output=None))
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == list(evaluator.METRIC_NAMES)
    saved = json.loads((tmp_path / "sample.metrics.json").read_text())
    for line in lines:
        name, value = line.split(": ", 1)
        if name == "Inception Score" and not inception.has_logits:
            assert value.startswith("unavailable (") and saved[name] is None and "logits" in saved["unavailable"][name]
        else:
            assert float(value) == saved[name]
    assert saved["FID"] > 0 and saved["sFID"] > 0
    assert 0 <= saved["Precision"] <= 1 and 0 <= saved["Recall"] <= 1
    if inception.has_logits:
        assert 1 <= saved["Inception Score"] <= 1008

    # The reference's features are cached beside it: a second run only looks at the sample.
    assert os.path.isfile(evaluator.reference_cache_path(ref))
    calls = []
    extract = inception.extract
    monkeypatch.setattr(inception, "extract", lambda images, *a, **k: calls.append(len(images)) or extract(images, *a, **k))
    metrics, _ = evaluator.evaluate(ref, sample, inception, batch_size=5)
    assert calls == [N_IMAGES] and all(metrics[k] == saved[k] for k in evaluator.METRIC_NAMES)


class StandInFeatures:
    """Inception's interface with features that are a fixed function of the images; counts extracted images."""

    def __init__(self, weights_id="stand-in-1"):
        self.weights_id, self.extracted = weights_id, []

    def extract(self, images, batch_size=50, desc=""):
        self.extracted.append(len(images))
        pixels = images.reshape(len(images), -1).astype(np.float64)
        return {"pool_3": pixels[:, :64], "spatial": pixels[:, 64:96], "logits": None}


def test_reference_cache_is_keyed_by_image_content_and_weights(tmp_path):
    ref = write_images(tmp_path / "ref.npz", 0)
    images = np.load(ref)["arr_0"]
    net = StandInFeatures()
    first = evaluator.reference_features(ref, images, net, batch_size=5)
    os.utime(ref, ns=(0, 0))  # touched, same content: still cached
    np.savez(ref, arr_0=images)  # rewritten with the same images: still cached
    again = evaluator.reference_features(ref, images, net, batch_size=5)
    assert net.extracted == [N_IMAGES] and all(np.array_equal(first[k], again[k]) for k in first)
    other_weights = StandInFeatures("other-weights")
    evaluator.reference_features(ref, images, other_weights, batch_size=5)
    assert other_weights.extracted == [N_IMAGES]
    other = images.copy()
    other[0, 0, 0, 0] ^= 1  # one bit of one pixel
    np.savez(ref, arr_0=other)
    evaluator.reference_features(ref, other, net, batch_size=5)
    assert net.extracted == [N_IMAGES, N_IMAGES]


def test_identical_batches_give_zero_distances_and_full_precision_recall(tmp_path, inception):
    ref, sample = write_images(tmp_path / "ref.npz", 2), write_images(tmp_path / "sample.npz", 2)
    metrics, _ = evaluator.evaluate(ref, sample, inception, batch_size=5)
    assert metrics["FID"] == pytest.approx(0, abs=1e-6) and metrics["sFID"] == pytest.approx(0, abs=1e-6)
    assert metrics["Precision"] == 1.0 and metrics["Recall"] == 1.0


def test_reference_statistics_are_read_as_they_are(tmp_path, inception):
    # An ADM reference batch with statistics only: FID and sFID use them; precision/recall need images.
    rng = np.random.default_rng(3)
    stats = {"mu": rng.standard_normal(2048), "sigma": np.eye(2048),
             "mu_s": rng.standard_normal(2023), "sigma_s": 2 * np.eye(2023)}
    np.savez(tmp_path / "ref.npz", **stats)
    sample = write_images(tmp_path / "sample.npz", 4)
    metrics, unavailable = evaluator.evaluate(str(tmp_path / "ref.npz"), sample, inception, batch_size=5)
    features = inception.extract(np.load(sample)["arr_0"], 5)
    expected = frechet_distance_of_features(features["pool_3"], stats["mu"], stats["sigma"])
    assert metrics["FID"] == pytest.approx(expected, rel=1e-9)
    assert metrics["Precision"] is None and "no images" in unavailable["Recall"]
    text = evaluator.format_metrics(metrics, unavailable)
    assert "Precision: unavailable (" in text and f"FID: {metrics['FID']}" in text


def test_command_line_mistakes_exit_2_with_one_line_and_write_nothing(tmp_path, monkeypatch, capsys):
    sample = write_images(tmp_path / "sample.npz", 1)
    command = [sys.executable, "-m", "evaluations.evaluator", str(tmp_path / "ref.npz"), sample]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run([*command, "--inception-weights", str(tmp_path / "none.pth")], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=120)
    assert (result.returncode, result.stderr) == (
        2, f"evaluator.py: error: --inception-weights {tmp_path}/none.pth: no such file\n")
    args = evaluator.build_parser().parse_args([str(tmp_path / "ref.npz"), sample])
    with pytest.raises(UsageError, match="^--batch-size must be >= 1, got 0$"):
        evaluator.main(argparse.Namespace(**{**vars(args), "batch_size": 0}))
    with pytest.raises(UsageError, match=f"^--output {tmp_path}/sample.npz/m.json cannot be created: {tmp_path}/"
                                         "sample.npz is not a directory$"):
        evaluator.main(argparse.Namespace(**{**vars(args), "output": str(tmp_path / "sample.npz" / "m.json")}))
    assert os.listdir(tmp_path) == ["sample.npz"]
    # 64x64 samples against a 32x32 reference: one line through the command-line entry, before Inception loads
    ref, large = write_images(tmp_path / "ref32.npz", 2, n=2, size=32), write_images(tmp_path / "s64.npz", 3, n=2, size=64)
    monkeypatch.setattr(sys, "argv", ["evaluator.py", ref, large, "--inception-weights", str(tmp_path / "none.pth")])
    with pytest.raises(SystemExit) as stop:
        run_command(evaluator.main, evaluator.build_parser())
    assert (stop.value.code, capsys.readouterr().err) == (2, (
        f"evaluator.py: error: the samples are 64x64 images ({large}) but the reference is 32x32 ({ref}): metrics "
        "compare batches of one resolution; use the reference batch of the samples' size\n"))
    assert sorted(os.listdir(tmp_path)) == ["ref32.npz", "s64.npz", "sample.npz"]


def test_missing_or_malformed_batches_are_usage_errors_naming_the_file(tmp_path):
    sample = write_images(tmp_path / "sample.npz", 1)
    with pytest.raises(UsageError, match=f"^batch file {tmp_path}/ref.npz does not exist$"):
        evaluator.read_batches(str(tmp_path / "ref.npz"), sample)
    (tmp_path / "garbage.npz").write_bytes(b"<html>not found</html>")
    with pytest.raises(UsageError, match="garbage.npz is not a readable .npz file"):
        evaluator.read_batches(str(tmp_path / "garbage.npz"), sample)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(UsageError, match="stats.npz: the sample batch needs its images under arr_0"):
        evaluator.read_batches(sample, str(tmp_path / "stats.npz"))
