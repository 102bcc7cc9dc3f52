"""Multi-experts (Table 6): train.py --timestep-range, and samplers that send every step to the expert owning t."""
import os

import numpy as np
import pytest
import torch

import sample
import sample_ddp
import train
from command_line import run_cli
from diffusion import create_diffusion
from diffusion.gaussian_diffusion import GaussianDiffusion
from models import DiT
from sampling.experts import TimestepExperts, check_expert_ranges, load_experts
from sampling.seeded import generate
from test_train import TINY, images  # noqa: F401  (the module-scoped image folder fixture)

RANGES = [(0, 299), (300, 649), (650, 999)]


def tiny_dit(seed):
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    for p in model.parameters():  # random weights everywhere, so that experts differ in what they output
        p.data.normal_(0, 0.1)
    return model.eval()


def record_timesteps(model, calls):
    """Forward hook appending the timesteps each call receives (the model runs unchanged)."""
    return model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[1].clone()))


def test_each_sample_goes_to_the_expert_owning_its_timestep_and_gets_its_output():
    experts = [tiny_dit(seed) for seed in range(3)]
    model = TimestepExperts(experts, RANGES)
    calls = [[] for _ in experts]
    for expert, seen in zip(experts, calls):
        record_timesteps(expert, seen)
    t = torch.tensor([0, 299, 300, 999, 650, 649, 10, 700])
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    with torch.no_grad():
        out = model(x, t, y)
    for k, (lo, hi) in enumerate(RANGES):
        mine = (t >= lo) & (t <= hi)
        assert len(calls[k]) == 1 and torch.equal(calls[k][0], t[mine])  # called once, with its samples only
        with torch.no_grad():
            torch.testing.assert_close(out[mine], experts[k](x[mine], t[mine], y[mine]), rtol=0, atol=0)


def test_respaced_ddim_sampling_calls_the_owner_of_every_original_timestep():
    experts = [tiny_dit(seed) for seed in range(3)]
    model = TimestepExperts(experts, RANGES)
    calls = [[] for _ in experts]
    for expert, seen in zip(experts, calls):
        record_timesteps(expert, seen)
    diffusion = create_diffusion("ddim10", noise_schedule="linear")
    generate(model, diffusion, "ddim", [0, 1, 2], torch.tensor([1, 2, 3]), global_seed=0, cfg_scale=1.5)
    seen = {k: sorted({int(v) for c in calls[k] for v in c}) for k in range(3)}
    for k, (lo, hi) in enumerate(RANGES):
        assert seen[k] and all(lo <= v <= hi for v in seen[k])
    assert sorted(sum(seen.values(), [])) == sorted(int(v) for v in diffusion.timestep_map)
    assert sum(len(c) for c in calls) == 10  # one expert call per step (CFG's doubled batch goes in one call)


def test_expert_ranges_must_tile_every_timestep():
    check_expert_ranges([(500, 999), (0, 499)])  # any order
    for ranges, message in [([(0, 499), (501, 999)], "t = 500..500 to no expert"), ([(0, 500), (500, 999)], "overlaps"),
                            ([(0, 998)], "belong to no expert"), ([(0, 10), (20, 11)], "empty")]:
        with pytest.raises(ValueError, match=message):
            check_expert_ranges(ranges)


def test_timestep_range_trains_only_its_tasks_and_sample_ddp_joins_the_experts(tmp_path, images, monkeypatch):
    drawn = []
    losses = GaussianDiffusion.training_losses
    monkeypatch.setattr(GaussianDiffusion, "training_losses",
                        lambda self, model, x, t, *a, **k: drawn.append(t.clone()) or losses(self, model, x, t, *a, **k))
    checkpoints = []
    for lo, hi in [(0, 499), (500, 999)]:
        drawn.clear()
        exp = train.main(train.parse_args(["--config", TINY, "--data-path", images, "--results-dir", str(tmp_path / "r"),
                                           "--max-steps", "2", "--timestep-range", str(lo), str(hi)]))
        t = torch.cat(drawn)
        assert len(t) == 8 and int(t.min()) >= lo and int(t.max()) <= hi
        checkpoints.append(f"{exp}/checkpoints/0000002.pt")
    monkeypatch.undo()
    model, settings = load_experts(checkpoints)
    assert model.ranges == [(0, 499), (500, 999)] and settings.timestep_range == (0, 499)
    sample_ddp.main(sample_ddp.build_parser().parse_args([
        "--ckpt", *checkpoints, "--sample-dir", str(tmp_path / "s"), "--num-fid-samples", "4",
        "--sampler", "ddim", "--num-sampling-steps", "3", "--per-proc-batch-size", "4", "--shard-size", "4"]))
    [npz] = [p for p in os.listdir(tmp_path / "s") if p.endswith(".npz")]
    with np.load(tmp_path / "s" / npz) as f:
        assert f["arr_0"].shape == (4, 8, 8, 3)
    with pytest.raises(ValueError, match="no --timestep-range"):
        load_experts([checkpoints[0], _full_range(tmp_path, images)])
    # one expert alone would sample t = 500..999 with a model that never saw them: refused, unless asked for
    lone = ["--ckpt", checkpoints[0], "--num-sampling-steps", "2", "--samples-per-class", "1", "--class-labels", "0"]
    code, stderr = run_cli(sample.main, sample.build_parser(), [*lone, "--out", tmp_path / "a.png"], "sample.py")
    assert (code, stderr) == (2, f"sample.py: error: {checkpoints[0]} is one expert, trained only on t = 0..499 "
                                 "(--timestep-range), but sampling visits every t in 0..999: give every expert "
                                 "(--ckpt A.pt B.pt ...), or --allow-partial-expert to sample with this one alone\n")
    assert not os.path.exists(tmp_path / "a.png")
    code, _ = run_cli(sample.main, sample.build_parser(), [*lone, "--out", tmp_path / "b.png", "--allow-partial-expert"],
                      "sample.py")
    assert code == 0 and os.path.isfile(tmp_path / "b.png")


def _full_range(tmp_path, images):
    exp = train.main(train.parse_args(["--config", TINY, "--data-path", images, "--results-dir", str(tmp_path / "f"),
                                       "--max-steps", "2"]))
    return f"{exp}/checkpoints/0000002.pt"


def test_bad_timestep_range_is_refused(images):
    for flags, message in [(["--timestep-range", "10", "5"], "0 <= LO <= HI < 1000"),
                           (["--timestep-range", "0", "1000"], "0 <= LO <= HI < 1000"),
                           (["--timestep-range", "0", "9", "--loss-weighting", "ant-uw"], "ant-uw")]:
        with pytest.raises(ValueError, match=message):
            train.validate_args(train.parse_args(["--config", TINY, "--data-path", images, *flags]))
