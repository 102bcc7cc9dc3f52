"""training/lr_schedule.py: warmup and cosine in closed form, and train.py taking that lr at every step, resumed too."""
import json
import math

import pytest

import train
from foundation.usage_error import UsageError
from test_train import TINY, images  # noqa: F401  (the module-scoped image folder fixture)
from training.lr_schedule import learning_rate


def test_constant_is_the_base_lr_at_every_step():
    assert {learning_rate(s, 3e-4) for s in range(0, 10_000, 97)} == {3e-4}


def test_warmup_rises_linearly_from_the_first_update_and_reaches_the_base_lr():
    lrs = [learning_rate(s, 1e-3, "cosine", warmup_steps=4, total_steps=10) for s in range(4)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-15)
    assert learning_rate(3, 2.0, "constant", warmup_steps=4) == 2.0 == learning_rate(4, 2.0, "constant", 4)


def test_cosine_halves_at_mid_decay_falls_monotonically_and_ends_near_zero():
    base, warmup, total = 1e-3, 10, 110
    lrs = [learning_rate(s, base, "cosine", warmup, total) for s in range(total)]
    assert lrs[warmup] == base  # the decay starts from the base lr
    assert lrs[warmup + 50] == pytest.approx(base / 2, rel=1e-12)  # cos(pi / 2) = 0
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert lrs[-1] == pytest.approx(base * (1 - math.cos(math.pi / 100)) / 2, rel=1e-12)  # the last update's lr
    assert learning_rate(total + 5, base, "cosine", warmup, total) == 0.0  # past the end: stays at zero


def test_bad_schedules_are_errors():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        learning_rate(0, 1e-3, "step")
    with pytest.raises(ValueError, match="total_steps > warmup_steps"):
        learning_rate(5, 1e-3, "cosine", warmup_steps=5, total_steps=5)


def run(*argv):
    return train.main(train.parse_args(["--config", TINY, *map(str, argv)]))


def logged_lrs(exp):
    return {row["step"]: row["lr"] for row in map(json.loads, open(f"{exp}/metrics.jsonl"))}


def test_train_takes_the_scheduled_lr_at_every_step_and_a_resume_continues_it(tmp_path, images):
    common = ["--data-path", images, "--results-dir", tmp_path, "--ckpt-every", 100, "--log-every", 1]
    schedule = ["--lr", "1e-3", "--lr-schedule", "cosine", "--warmup-steps", 2]
    straight = run(*common, *schedule, "--max-steps", 6, "--exp-name", "straight")
    # the lr logged after step k is the lr its update used: learning_rate(k - 1)
    expected = {k: learning_rate(k - 1, 1e-3, "cosine", 2, 6) for k in range(1, 7)}
    assert logged_lrs(straight) == pytest.approx(expected, rel=1e-15)
    # a run of 3 steps (its own 3-step schedule) resumed for 6 takes the 6-step schedule's lr from step 4 on
    run(*common, *schedule, "--max-steps", 3, "--exp-name", "resumed", "--resume", "auto")
    resumed = run(*common, *schedule, "--max-steps", 6, "--exp-name", "resumed", "--resume", "auto")
    assert {k: v for k, v in logged_lrs(resumed).items() if k > 3} == {k: v for k, v in expected.items() if k > 3}
    with pytest.raises(UsageError, match="--lr-schedule cosine in the checkpoint, constant now"):
        run(*common, "--max-steps", 7, "--exp-name", "resumed", "--resume", "auto")
    with pytest.raises(UsageError, match="--max-steps 2 must exceed --warmup-steps 2"):
        run(*common, *schedule, "--max-steps", 2)
