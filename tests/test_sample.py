"""sample.py: grid layout and labels, agreement with sample_ddp.py, settings from the checkpoint, bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sample_ddp
from command_line import run_cli
from diffusion import create_diffusion
from diffusion.dpm_solver import dpm_solver_pp_sample_loop
from diffusion.guidance import ClassifierFreeGuidance
from foundation.usage_error import UsageError
from models import DiT
from sampling.seeded import PerSampleNoise

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2)


def save_tiny(path, num_classes=10, in_channels=1):
    """A tiny DiT (random output layers) saved in train.py's checkpoint format."""
    torch.manual_seed(0)
    model = DiT(in_channels=in_channels, num_classes=num_classes, routing="dtr", **TINY)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "args": {},
                "model_config": {"model": "DiT-S/2", **model.config},
                "diffusion_config": {"noise_schedule": "linear", "learn_sigma": True},
                "vae": "none", "image_size": 8, "latent_scale": 0.18215}, path)
    return str(path)


def draw(ckpt, out, *flags):
    sample.main(sample.build_parser().parse_args(
        ["--ckpt", ckpt, "--out", str(out), "--num-sampling-steps", "3", *flags]))
    return np.asarray(Image.open(out))


def tile(grid, row, col, size=8, pad=2):
    """Image (row, col) of a torchvision make_grid picture."""
    top, left = pad + row * (size + pad), pad + col * (size + pad)
    return grid[top:top + size, left:left + size]


def test_few_class_model_defaults_to_one_grayscale_row_per_class(tmp_path):
    grid = draw(save_tiny(tmp_path / "c.pt"), tmp_path / "grid.png")
    assert grid.dtype == np.uint8 and grid.ndim == 2  # 1-channel model: a grayscale PNG
    assert grid.shape == (2 + 10 * 10, 2 + 8 * 10)  # 10 classes x 8 samples, 8 px tiles, 2 px padding


def test_grid_labels_default_to_official_classes_and_rows_per_class():
    labels, nrow = sample.grid_labels(None, None, 1000)
    assert labels.tolist() == [207, 360, 387, 974, 88, 979, 417, 279] and nrow == 4  # official DiT grid
    labels, nrow = sample.grid_labels([3, 1], 2, 10)
    assert labels.tolist() == [3, 3, 1, 1] and nrow == 2


def test_unconditional_grid_tiles_equal_sample_ddp_samples(tmp_path):
    ckpt = save_tiny(tmp_path / "u.pt", num_classes=1)
    grid = draw(ckpt, tmp_path / "grid.png", "--samples-per-class", "4", "--seed", "3")
    sample_ddp.main(sample_ddp.build_parser().parse_args(
        ["--ckpt", ckpt, "--sample-dir", str(tmp_path), "--num-fid-samples", "4", "--num-sampling-steps", "3",
         "--global-seed", "3"]))
    (npz,) = [f for f in os.listdir(tmp_path) if f.endswith(".npz")]
    with np.load(tmp_path / npz) as f:
        images = f["arr_0"]
    # image i depends only on (seed, i): the grid's 2x2 tiles are sample_ddp's samples 0..3, bitwise since both
    # run the 4 samples as one batch on the same threads
    for i in range(4):
        np.testing.assert_array_equal(tile(grid, i // 2, i % 2), images[i, ..., 0])


def test_grid_tiles_equal_balanced_sample_ddp_samples_and_cfg_changes_them(tmp_path):
    ckpt = save_tiny(tmp_path / "c.pt")
    guided = draw(ckpt, tmp_path / "a.png", "--class-labels", "0", "1", "2", "3", "--cfg-scale", "4")
    plain = draw(ckpt, tmp_path / "b.png", "--class-labels", "0", "1", "2", "3", "--cfg-scale", "1")
    assert not np.array_equal(guided, plain)
    sample_ddp.main(sample_ddp.build_parser().parse_args(
        ["--ckpt", ckpt, "--sample-dir", str(tmp_path), "--num-fid-samples", "4", "--num-sampling-steps", "3",
         "--cfg-scale", "4", "--balanced-classes"]))
    (npz,) = [f for f in os.listdir(tmp_path) if f.endswith(".npz")]
    with np.load(tmp_path / npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert labels.tolist() == [0, 1, 2, 3]  # balanced: label i = i mod num_classes
    for i in range(4):  # grid tile i: class i, noise of (seed 0, i), 4 tiles in one official-width row
        np.testing.assert_array_equal(tile(guided, 0, i), images[i, ..., 0])


def test_dpm_solver_grid_equals_sample_ddp_and_the_solver_with_guidance_called_directly(tmp_path):
    ckpt = save_tiny(tmp_path / "c.pt")
    grid = draw(ckpt, tmp_path / "a.png", "--class-labels", "0", "1", "2", "3", "--cfg-scale", "4",
                "--sampler", "dpm-solver++")
    sample_ddp.main(sample_ddp.build_parser().parse_args(
        ["--ckpt", ckpt, "--sample-dir", str(tmp_path), "--num-fid-samples", "4", "--num-sampling-steps", "3",
         "--cfg-scale", "4", "--balanced-classes", "--sampler", "dpm-solver++"]))
    (npz,) = [f for f in os.listdir(tmp_path) if f.endswith(".npz")]
    assert "dpm-solver++3" in npz
    with np.load(tmp_path / npz) as f:
        images = f["arr_0"]
    # independently: the same x_T (sample i's generator), CFG through the guidance wrapper, 3 trailing steps
    model = DiT(in_channels=1, num_classes=10, routing="dtr", **TINY)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["ema"])
    model.eval()
    guided = ClassifierFreeGuidance(model, 4.0, {"y": torch.tensor(10)})
    noise = PerSampleNoise(range(4), 0)((4, 1, 8, 8))
    x = dpm_solver_pp_sample_loop(create_diffusion("trailing3"), guided, noise.shape, noise=noise,
                                  clip_denoised=True, model_kwargs={"y": torch.arange(4)})
    expected = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)[:, 0].numpy()
    for i in range(4):
        np.testing.assert_array_equal(tile(grid, 0, i), images[i, ..., 0])
        np.testing.assert_array_equal(images[i, ..., 0], expected[i])


def test_bad_inputs_give_clear_errors(tmp_path):
    ckpt = save_tiny(tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"--class-labels \[10, 12\] outside \[0, 10\)"):
        draw(ckpt, tmp_path / "x.png", "--class-labels", "1", "10", "12")
    with pytest.raises(ValueError, match="--model DiT-XL/2 conflicts with the checkpoint's model 'DiT-S/2'"):
        draw(ckpt, tmp_path / "x.png", "--model", "DiT-XL/2")
    with pytest.raises(ValueError, match="--vae ema conflicts with the checkpoint's vae 'none'"):
        draw(ckpt, tmp_path / "x.png", "--vae", "ema")
    uncond = save_tiny(tmp_path / "u.pt", num_classes=1)
    with pytest.raises(ValueError, match="--cfg-scale 4.0 given, but the model is unconditional"):
        draw(uncond, tmp_path / "x.png", "--cfg-scale", "4")
    with pytest.raises(UsageError, match="checkpoint not found"):
        draw(str(tmp_path / "nope.pt"), tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")


@pytest.mark.parametrize("steps, message", [
    (["--sampler", "ddim", "--num-sampling-steps", "1"], "--sampler ddim --num-sampling-steps 1: timestep_respacing "
                                                         "'ddim1': no integer stride gives exactly 1 steps out of 1000"),
    (["--num-sampling-steps", "1001"], "--sampler ddpm --num-sampling-steps 1001: timestep_respacing '1001' asks for "
                                       "1001 steps from a section of 1000 timesteps (diffusion has 1000)"),
    (["--num-sampling-steps", "0"], "--num-sampling-steps must be >= 1, got 0"),
])
def test_step_counts_official_dit_refuses_are_one_line_before_the_checkpoint_is_read(tmp_path, steps, message):
    code, stderr = run_cli(sample.main, sample.build_parser(), ["--ckpt", tmp_path / "never-read.pt", *steps,
                                                                "--out", tmp_path / "x.png"], "sample.py")
    assert (code, stderr) == (2, f"sample.py: error: {message}\n")
    assert os.listdir(tmp_path) == []


def sample_cli(script, *argv):
    """sample.py / sample_ddp.py as a user runs them; returns the CompletedProcess."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(root, script), *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=240)


def test_cfg_scale_nan_or_negative_exits_2_in_both_samplers_and_writes_nothing(tmp_path):
    ckpt = save_tiny(tmp_path / "c.pt")
    for script, out_flags in (("sample.py", ["--out", tmp_path / "out" / "x.png"]),
                              ("sample_ddp.py", ["--sample-dir", tmp_path / "out"])):
        module = {"sample.py": sample, "sample_ddp.py": sample_ddp}[script]
        with pytest.raises(SystemExit) as stop:  # nan would draw black images: argparse refuses it
            module.build_parser().parse_args(["--ckpt", ckpt, "--cfg-scale", "nan"])
        assert stop.value.code == 2
        result = sample_cli(script, "--ckpt", ckpt, *out_flags, "--cfg-scale", "-1")
        assert result.returncode == 2 and result.stderr == (
            f"{script}: error: --cfg-scale must be a finite number >= 0 (1 = no guidance, 0 = unconditional), "
            "got -1.0\n")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_checkpoint_is_one_line_naming_it(tmp_path, damage):
    ckpt = save_tiny(tmp_path / "c.pt")
    whole = open(ckpt, "rb").read()
    with open(ckpt, "wb") as f:
        f.write({"empty": b"", "truncated": whole[:1000], "garbage": b"\x00\x01garbage" * 100}[damage])
    reason = {"empty": "empty", "truncated": "truncated", "garbage": "not a checkpoint file"}[damage]
    with pytest.raises(UsageError, match=f"^cannot read checkpoint {ckpt}: {reason}"):
        draw(ckpt, tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")
