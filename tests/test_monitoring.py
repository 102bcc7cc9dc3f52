"""monitoring/: TensorBoard scalars equal metrics.jsonl, per-t-bucket losses, EMA grids, plain log.txt, bar on a tty."""
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train
from monitoring import progress
from monitoring.tensorboard_log import NUM_BUCKETS, TimestepBucketLoss, tensorboard_available
from test_train import TINY, images, load  # noqa: F401  (the module-scoped image folder fixture)


def run(*argv):
    return train.main(train.parse_args(["--config", TINY, *map(str, argv)]))


def test_bucket_means_equal_a_direct_average():
    rng = np.random.default_rng(0)
    t, losses = rng.integers(0, 1000, 64), rng.random(64)
    buckets = TimestepBucketLoss(1000, torch.device("cpu"))
    for part in (slice(0, 40), slice(40, 64)):  # two steps
        buckets.add(torch.from_numpy(t[part]), torch.from_numpy(losses[part]).float())
    means = buckets.means(world_size=1)
    for k in range(NUM_BUCKETS):
        inside = (t // 100) == k
        name = f"loss_t{k * 100:03d}-{k * 100 + 99:03d}"
        if inside.any():
            assert means[name] == pytest.approx(losses[inside].astype(np.float32).mean(), rel=1e-6)
        else:
            assert name not in means
    assert buckets.means(world_size=1) == {}  # reset after each log line


@pytest.mark.skipif(not tensorboard_available(), reason="the tensorboard extra is not installed")
def test_tensorboard_and_sample_grids_leave_training_bit_for_bit_unchanged(tmp_path, images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    common = ["--data-path", images, "--results-dir", tmp_path, "--max-steps", 4, "--ckpt-every", 4]
    plain = run(*common, "--exp-name", "plain")
    watched = run(*common, "--exp-name", "watched", "--tensorboard", "--sample-every", 2)
    events = EventAccumulator(os.path.join(watched, "tensorboard")).Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    logged = [(m["step"], m["loss"]) for m in map(json.loads, open(f"{watched}/metrics.jsonl"))]
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in loss], [v for _, v in logged], rtol=1e-6)  # TB stores float32
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-4] * 4)
    tags = events.Tags()["scalars"]
    assert {"train/steps_per_sec", "train/images_per_sec", "train/peak_mem_gb"} <= set(tags)
    assert any(tag.startswith("train/loss_t") for tag in tags)
    assert sorted(os.listdir(f"{watched}/samples")) == ["0000002.png", "0000004.png"]
    grid = np.asarray(Image.open(f"{watched}/samples/0000004.png"))
    assert grid.shape == (32, 32, 3)  # 4 x 4 samples of 8 x 8
    assert len(np.unique(grid.reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1), axis=0)) == 16
    # the grids and the summaries draw on no training randomness: the same weights as the unmonitored run
    a, b = load(f"{plain}/checkpoints/0000004.pt"), load(f"{watched}/checkpoints/0000004.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_log_file_is_plain_and_the_bar_shows_only_on_a_terminal(tmp_path, images, monkeypatch):
    exp = run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 2)
    text = open(f"{exp}/log.txt").read()
    assert "Train Loss" in text and "\033" not in text
    assert progress.progress_bar(10, 0, rank=0).disable  # pytest's stdout is not a terminal
    screen = io.StringIO()
    monkeypatch.setattr(progress, "console_is_terminal", lambda: True)
    monkeypatch.setattr(progress.sys, "stdout", screen)
    bar = progress.progress_bar(10, 4, rank=0)
    assert not bar.disable and progress.progress_bar(10, 4, rank=1).disable
    logger = logging.getLogger("test_monitoring")
    logger.addHandler(progress.console_handler())
    logger.warning("a log line")
    bar.update(1)
    bar.close()
    assert "a log line" in screen.getvalue() and "5/10" in screen.getvalue()
