"""analysis.study: a toy study end to end (table, plot, resume), the paired gaps' arithmetic, bad flags."""
import json
import os

import numpy as np
import pytest

from analysis import study
from imagedata.fashion_mnist import DEBIAN_FASHION_MNIST

FASHION_MNIST = DEBIAN_FASHION_MNIST


def toy_args(out, *extra):
    # ema-decay 0: the EMA is the model itself, so 4 steps at lr 1e-2 already move the output away from the
    # adaLN-zero init (whose samples would be identical for every routing).
    return study.build_parser().parse_args([
        "--out", str(out), "--size", "toy", "--seeds", "0", "--routings", "none", "dtr", "--steps", "4",
        "--eval-every", "4", "--batch-size", "8", "--lr", "1e-2", "--ema-decay", "0", "--num-fid-samples", "10",
        "--ref-images", "10", "--sampling-steps", "2", "--data-path", FASHION_MNIST, *extra])


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_toy_study_writes_table_and_plot_and_resumes_without_new_work(tmp_path):
    pytest.importorskip("matplotlib")
    try:
        from evaluations.inception import find_inception_weights
        find_inception_weights()
    except FileNotFoundError as error:
        pytest.skip(f"no Inception weights on this machine: {error}")
    results = study.main(toy_args(tmp_path))
    runs = results["runs"]
    assert sorted(runs) == ["dtr/seed0", "none/seed0"]
    fid = {key: run["evals"]["4"]["FID"] for key, run in runs.items()}
    assert all(np.isfinite(v) and v > 0 for v in fid.values())
    assert fid["dtr/seed0"] != fid["none/seed0"]  # two different models were sampled
    table = (tmp_path / "table.md").read_text()
    assert f"| vanilla | {fid['none/seed0']:.2f} (n=1)" in table and f"| DTR | {fid['dtr/seed0']:.2f} (n=1)" in table
    assert f"| 4 | {fid['dtr/seed0'] - fid['none/seed0']:.2f} (n=1) |" in table
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["runs"] == runs

    # Resume: everything is done, so nothing trains, samples or evaluates again.
    logs = sorted(p for p in tmp_path.rglob("*.log"))
    stamps = {p: p.stat().st_mtime_ns for p in logs}
    again = study.main(toy_args(tmp_path))
    assert again["runs"] == runs and again["seconds"] == results["seconds"]
    assert sorted(tmp_path.rglob("*.log")) == logs and all(p.stat().st_mtime_ns == stamps[p] for p in logs)

    # Other settings in the same folder are refused before anything runs.
    with pytest.raises(ValueError, match="steps"):
        study.main(toy_args(tmp_path, "--steps", "8"))


def synthetic_results(fids):
    """results.json content from {(routing, seed): {step: FID}}."""
    runs = {}
    for (routing, seed), curve in fids.items():
        runs[study.run_key(routing, seed)] = {"evals": {str(s): {"FID": v} for s, v in curve.items()}}
    settings = {"routings": ["none", "random", "dtr"], "steps": 20, "size": "small", "num_fid_samples": 100,
                "sampler": "ddim", "sampling_steps": 25, "cfg_scale": 1.5, "ref_images": 500, "threads": 1}
    return {"settings": settings, "runs": runs, "seconds": {"train": 10.0}}


def test_paired_gaps_and_table_follow_the_seeds():
    results = synthetic_results({
        ("none", 0): {10: 50.0, 20: 40.0}, ("none", 1): {10: 52.0, 20: 44.0},
        ("dtr", 0): {10: 48.0, 20: 41.0}, ("dtr", 1): {10: 49.0, 20: 42.0},
        ("random", 0): {10: 60.0},  # a run cut short: no final value, no gap at step 20
    })
    gaps = study.paired_gaps(results, "dtr")
    assert gaps == {10: [-2.0, -3.0], 20: [1.0, -2.0]}
    assert study.paired_gaps(results, "random") == {10: [10.0]}
    steps, fid, seeds = study.curves(results, "none")
    assert steps == [10, 20] and seeds == [0, 1] and fid.tolist() == [[50.0, 40.0], [52.0, 44.0]]
    assert study.mean_std([1.0, -2.0]) == f"-0.50 ± {np.std([1.0, -2.0], ddof=1):.2f} (n=2)"


def test_bad_flags_fail_before_any_work(tmp_path):
    cases = [("--eval-every", "3"), ("--seeds", "0", "0"), ("--num-fid-samples", "5"), ("--data-path", str(tmp_path))]
    for flags in cases:
        args = toy_args(tmp_path / "out", *flags)
        with pytest.raises(ValueError):
            study.main(args)
        assert not (tmp_path / "out").exists()
