"""sample_ddp.py / sampling/seeded.py: world-size invariance, exact resume, CFG, formats, bad input."""
import argparse
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample_ddp
from diffusion import create_diffusion
from foundation.usage_error import UsageError
from models import DiT, create_model
from sampling.model_from_checkpoint import load_checkpoint
from sampling.seeded import (PerSampleNoise, class_labels, generate, model_function,
                             to_uint8)
from float_comparison import intra_op_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2)


def tiny_model(num_classes=10, in_channels=1, routing="dtr", seed=0):
    """A tiny DiT with random (not zero-initialised) output layers, so samples depend on the weights."""
    torch.manual_seed(seed)
    model = DiT(in_channels=in_channels, num_classes=num_classes, routing=routing, **TINY)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return model.eval()


def save_ours(path, model, ema=None, vae="none", image_size=8):
    """A checkpoint in train.py's format (the project contract)."""
    ema = model if ema is None else ema
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "step": 7, "args": {},
                "model_config": {"model": "DiT-S/2", **model.config},
                "diffusion_config": {"noise_schedule": "linear", "learn_sigma": True},
                "vae": vae, "image_size": image_size, "latent_scale": 0.18215}, path)
    return str(path)


def run(ckpt, sample_dir, *flags):
    """sample_ddp.main in this process, on one thread like the torchrun ranks it is compared with; the .npz path."""
    argv = ["--ckpt", ckpt, "--sample-dir", str(sample_dir), "--num-fid-samples", "10", "--shard-size", "4",
            "--per-proc-batch-size", "3", "--num-sampling-steps", "4", *flags]
    with intra_op_threads(1):  # bitwise comparisons need the same thread count as well as the same batches
        sample_ddp.main(sample_ddp.build_parser().parse_args(argv))
    npz = [f for f in os.listdir(sample_dir) if f.endswith(".npz")]
    return os.path.join(sample_dir, npz[0]) if npz else None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_ours(tmp_path_factory.mktemp("ckpt") / "0000007.pt", tiny_model())


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """The uninterrupted single-process run every other run must reproduce."""
    return run(ckpt, tmp_path_factory.mktemp("reference"))


def test_npz_holds_exactly_n_rgb_uint8_images_and_labels(reference):
    with np.load(reference) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (10, 8, 8, 3) and images.dtype == np.uint8  # NHWC, grayscale repeated to RGB
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    assert labels.shape == (10,) and labels.dtype == np.int64 and labels.max() < 10
    assert len(np.unique(images.reshape(10, -1), axis=0)) == 10  # every sample has its own noise
    assert labels.tolist() == class_labels(range(10), 10, 0, balanced=False).tolist()


def test_two_ranks_finishing_a_one_rank_start_give_the_identical_file(ckpt, reference, tmp_path):
    assert run(ckpt, tmp_path, "--max-shards", "1") is None  # one process did batch [0, 3), then was stopped
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "sample_ddp.py"), "--ckpt", ckpt, "--sample-dir", str(tmp_path),
           "--num-fid-samples", "10", "--shard-size", "4", "--per-proc-batch-size", "3", "--num-sampling-steps", "4"]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.strip().splitlines()[-1]  # the path is the last line printed
    assert os.path.basename(out) == os.path.basename(reference)
    with open(out, "rb") as a, open(reference, "rb") as b:
        assert a.read() == b.read()  # bitwise: same per-sample noise, same batch composition
    shard_dir = out[: -len(".npz")] + ".shards"
    assert sorted(f for f in os.listdir(shard_dir) if f.startswith("shard_")) == [
        "shard_000000_000003.npz", "shard_000003_000006.npz", "shard_000006_000009.npz", "shard_000009_000010.npz"]
    assert "3/10 samples already finished" in result.stdout


def test_resume_after_stop_gives_the_identical_file(ckpt, reference, tmp_path):
    assert run(ckpt, tmp_path, "--max-shards", "1") is None  # "pre-empted" after one of three shards
    shard_dir = next(os.path.join(tmp_path, d) for d in os.listdir(tmp_path) if d.endswith(".shards"))
    shards = sorted(f for f in os.listdir(shard_dir) if f.startswith("shard_"))
    assert shards == ["shard_000000_000003.npz"]  # --shard-size 4 holds one whole batch of 3
    first = os.path.join(shard_dir, shards[0])
    stamp = os.stat(first).st_mtime_ns
    stale = os.path.join(shard_dir, ".shard_000003_000006.npz.x.tmp")
    open(stale, "wb").write(b"partial")  # what a kill during a shard's write leaves
    out = run(ckpt, tmp_path)
    assert not os.path.exists(stale)
    assert os.stat(first).st_mtime_ns == stamp  # the finished shard was kept, not recomputed
    with open(out, "rb") as a, open(reference, "rb") as b:
        assert a.read() == b.read()


def test_shard_dir_of_another_configuration_is_an_error_and_keeps_its_shards(ckpt, tmp_path):
    run(ckpt, tmp_path, "--max-shards", "1")
    shard_dir = next(os.path.join(tmp_path, d) for d in os.listdir(tmp_path) if d.endswith(".shards"))
    before = sorted(os.listdir(shard_dir))
    other = tmp_path / "other-run" / os.path.basename(ckpt)  # same file name, so the same run name
    other.parent.mkdir()
    shutil.copy(ckpt, other)
    with pytest.raises(ValueError, match="another configuration.*ckpt: the folder's .* vs now .*other-run"):
        run(str(other), tmp_path)
    assert sorted(os.listdir(shard_dir)) == before


def test_batch_size_changes_samples_only_by_float_rounding(ckpt):
    model, settings = load_checkpoint(ckpt)
    diffusion = create_diffusion("4", **settings.diffusion_config)
    y = class_labels(range(6), 10, 0, balanced=False)
    whole = generate(model, diffusion, "ddpm", list(range(6)), y, 0, cfg_scale=1.5)
    parts = torch.cat([generate(model, diffusion, "ddpm", [0, 1], y[:2], 0, cfg_scale=1.5),
                       generate(model, diffusion, "ddpm", [2, 3, 4, 5], y[2:], 0, cfg_scale=1.5)])
    # Batches of 2 and 4 block the matmuls differently from a batch of 6: a forward then differs by up to ~50 ulp
    # of its largest activation (1.2e-4 at |out| ~ 20 in test_dit's CFG check on AVX-512). The samples grow to
    # |x| ~ 500 along the chain, so the bound is relative to that scale, not per element: 1e-4 * max |x| is
    # 800 ulp of it. Per-sample noise, labels or null labels mixed up across the batch move samples by O(|x|).
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-4 * whole.abs().max().item())


def test_labels_change_the_samples(ckpt):
    model, settings = load_checkpoint(ckpt)
    diffusion = create_diffusion("ddim3", **settings.diffusion_config)
    a = generate(model, diffusion, "ddim", [0, 1], torch.tensor([2, 2]), 0, cfg_scale=4.0)
    b = generate(model, diffusion, "ddim", [0, 1], torch.tensor([2, 5]), 0, cfg_scale=4.0)
    # bitwise: sample 0 has the same (seed, index, label) in a batch of the same composition
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_cfg_scale_one_equals_the_unguided_model(ckpt, tmp_path):
    model, settings = load_checkpoint(ckpt)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([999, 500, 3, 0]), torch.tensor([0, 1, 2, 9])
    with torch.no_grad():  # scale 1 skips the doubled batch: the very forward of the unguided model, bitwise
        torch.testing.assert_close(model_function(model, 1.0, "all", "no")(x, t, y=y), model(x, t, y), rtol=0, atol=0)
    # end to end: DDIM is deterministic given x_T, so --cfg-scale 1 must equal plain ddim_sample_loop, run on
    # run()'s batches (sample_ddp's fixed grid [3k, 3k + 3) for --per-proc-batch-size 3) and thread count:
    # uint8 rounding turns any fp32 difference into a one-level flip of some pixel
    out = run(ckpt, tmp_path, "--cfg-scale", "1", "--sampler", "ddim")
    diffusion = create_diffusion("ddim4", **settings.diffusion_config)
    y = class_labels(range(10), 10, 0, balanced=False)
    x_T = PerSampleNoise(range(10), 0)((10, 1, 8, 8))
    plain = []
    for batch in ([0, 1, 2], [3, 4, 5], [6, 7, 8], [9]):
        with torch.no_grad(), intra_op_threads(1):
            plain.append(diffusion.ddim_sample_loop(model, (len(batch), 1, 8, 8), noise=x_T[batch],
                                                    model_kwargs={"y": y[batch]}))
    plain = torch.cat(plain)
    with np.load(out) as f:
        np.testing.assert_array_equal(f["arr_0"][..., :1], to_uint8(plain))
    guided_run = run(ckpt, tmp_path / "cfg4", "--cfg-scale", "4", "--sampler", "ddim")
    with np.load(out) as a, np.load(guided_run) as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])  # guidance does change the samples


def test_balanced_classes_give_n_over_num_classes_per_class_extra_to_the_first():
    labels = class_labels(range(23), 10, 0, balanced=True)
    assert np.bincount(labels.numpy(), minlength=10).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    random = class_labels(range(5, 9), 10, 0, balanced=False)
    assert random.tolist() == class_labels(range(9), 10, 0, balanced=False)[5:].tolist()  # only (seed, i)
    assert random.tolist() != class_labels(range(5, 9), 10, 1, balanced=False).tolist()


def test_official_state_dict_and_namespace_dict_sample(tmp_path):
    from diffusers.models import AutoencoderKL
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae.save_pretrained(tmp_path / "vae")  # 64x64x3 <-> 8x8x4, as SD's VAE at 1/4 the size
    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=8, num_classes=1000)  # official layout, routing none
    for p in model.final_layer.parameters():
        p.data.normal_(0, 0.02)
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    args = argparse.Namespace(model="DiT-S/8", image_size=64, num_classes=1000, vae="ema")
    # official train.py's layout; "model" and "ema" share storage here, so the file stays small
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args},
               tmp_path / "official.pt")

    raw, settings = load_checkpoint(str(tmp_path / "raw.pt"), {"model": "DiT-S/8", "image_size": 64})
    assert settings.weights == "state_dict" and settings.diffusion_config["noise_schedule"] == "linear"
    assert settings.vae == "stabilityai/sd-vae-ft-ema" and raw.input_size == 8 and raw.num_classes == 1000
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in model.state_dict().items())

    argv = ["--ckpt", str(tmp_path / "official.pt"), "--sample-dir", str(tmp_path), "--num-fid-samples", "2",
            "--sampler", "ddim", "--num-sampling-steps", "2", "--vae", str(tmp_path / "vae")]
    sample_ddp.main(sample_ddp.build_parser().parse_args(argv))  # model, size, classes from args
    (npz,) = [f for f in os.listdir(tmp_path) if f.endswith(".npz")]
    assert npz == "DiT-S-8-official-size-64-vae-vae-cfg-1.5-seed-0-ddim2-n2.npz"
    with np.load(tmp_path / npz) as f:
        assert f["arr_0"].shape == (2, 64, 64, 3) and f["arr_0"].dtype == np.uint8


def test_ema_weights_by_default_and_raw_weights_on_request(tmp_path):
    model, ema = tiny_model(seed=0), tiny_model(seed=1)
    path = save_ours(tmp_path / "ckpt.pt", model, ema=ema)
    for flag, expected in [(False, ema), (True, model)]:
        loaded, settings = load_checkpoint(path, use_model_weights=flag)
        assert settings.weights == ("model" if flag else "ema")
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.state_dict().items())


def test_bad_inputs_give_clear_errors(ckpt, tmp_path):
    with pytest.raises(UsageError, match="checkpoint not found: .*missing.pt"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save(tiny_model().state_dict(), tmp_path / "tiny_raw.pt")
    with pytest.raises(UsageError, match=r"^checkpoint does not fit DiT-S/2: .*shape mismatches.*x_embedder.proj.weight"):
        load_checkpoint(str(tmp_path / "tiny_raw.pt"), {"model": "DiT-S/2", "image_size": 64})
    with pytest.raises(ValueError, match="--num-classes 5 conflicts with the checkpoint's num_classes 10"):
        load_checkpoint(ckpt, {"num_classes": 5})
    with pytest.raises(ValueError, match="--routing none conflicts with the checkpoint's routing 'dtr'"):
        load_checkpoint(ckpt, {"routing": "none"})
    with pytest.raises(ValueError, match="--num-fid-samples must be >= 1, got 0"):
        run(ckpt, tmp_path, "--num-fid-samples", "0")
    with pytest.raises(ValueError, match="--per-proc-batch-size must be >= 1, got 0"):
        run(ckpt, tmp_path, "--per-proc-batch-size", "0")
    uncond = save_ours(tmp_path / "uncond.pt", tiny_model(num_classes=1))
    with pytest.raises(ValueError, match="--cfg-scale 1.5 given, but the model is unconditional"):
        run(uncond, tmp_path, "--cfg-scale", "1.5")
    assert not any(f.endswith(".npz") for f in os.listdir(tmp_path))


def test_save_png_writes_every_sample_as_in_the_npz(ckpt, tmp_path):
    from PIL import Image
    out = run(ckpt, tmp_path, "--save-png", "--mixed-precision", "bf16")
    with np.load(out) as f:
        images = f["arr_0"]
    png_dir = os.path.join(out[: -len(".npz")] + ".shards", "png")
    assert sorted(os.listdir(png_dir)) == [f"{i:06d}.png" for i in range(10)]
    for i in range(10):
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(png_dir, f"{i:06d}.png"))), images[i, ..., 0])
