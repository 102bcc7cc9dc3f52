"""End-to-end tests of extract_features.py with a tiny random AutoencoderKL: shards, flips, bad images, resume, DDP."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import extract_features
from foundation.usage_error import UsageError
from imagedata import build_dataset, read_manifest
from models.vae import vae_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 0.18215


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A randomly initialised 2-level AutoencoderKL (16 px -> 4x8x8 latents) saved to a local folder."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=16)
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path)
    return path, vae.eval()


def make_images(root, per_class=6, classes=("cat", "dog")):
    """Random 16x16 RGB images in class folders; returns the uint8 arrays in dataset order."""
    rng = np.random.default_rng(0)
    arrays = []
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, c, f"{i:02d}.png"))
            arrays.append(arr)
    return arrays


def run_args(data, feat, vae, **overrides):
    args = dict(data_path=str(data), features_path=str(feat), data_kind="auto", image_size=16, vae=vae, batch_size=4,
                num_workers=0, shard_size=5, skip_bad_images=False, global_seed=0, device="auto", dist_timeout=30,
                latent_stat="posterior")
    args.update(overrides)
    return argparse.Namespace(**args)


def load_all(feat, key="latents"):
    manifest = read_manifest(str(feat))
    latents = np.concatenate([np.load(os.path.join(feat, s[key])) for s in manifest["shards"]])
    labels = np.concatenate([np.load(os.path.join(feat, s["labels"])) for s in manifest["shards"]])
    return manifest, latents, labels


def shard_stamps(feat):
    return {f: (os.stat(feat / f).st_ino, os.stat(feat / f).st_mtime_ns) for f in sorted(os.listdir(feat))
            if f.startswith("shard-")}


def subprocess_env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def test_latents_equal_direct_encoding_of_image_and_its_flip(tmp_path, tiny_vae):
    vae_path, vae = tiny_vae
    arrays = make_images(tmp_path / "imgs")
    feat = tmp_path / "feat"
    extract_features.main(run_args(tmp_path / "imgs", feat, vae_path, num_workers=1))
    manifest, latents, labels = load_all(feat)
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 2]
    assert manifest["latent_scale"] == SCALE and manifest["latent_shape"] == [4, 8, 8] and manifest["num_classes"] == 2
    assert manifest["count"] == 12 and latents.shape == (12, 2, 4, 8, 8) and latents.dtype == np.float32
    assert labels.tolist() == [0] * 6 + [1] * 6
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (12, 3, 16, 16)
    with torch.no_grad():
        plain, plain_flip = vae.encode(x).latent_dist, vae.encode(x.flip(-1)).latent_dist
    # One batch of 12 here, extract_features' batches of 4 and 1 with their flips there: fp32 blockings differ.
    # This VAE's fp32 rounding is <= 2e-7 at |latent| <= 0.22 (its gap to a float64 encode, AVX2 and AVX-512),
    # so two batchings agree to 4e-7 and atol=1e-5 has 25x margin (std = exp(logvar / 2): relative error of
    # the same size, far inside rtol=1e-4); a wrong flip axis, scale or pixel range moves latents by > 1e-3.
    assert torch.allclose(torch.from_numpy(latents[:, 0]), plain.mean * SCALE, atol=1e-5)
    assert torch.allclose(torch.from_numpy(latents[:, 1]), plain_flip.mean * SCALE, atol=1e-5)
    assert not torch.allclose(plain.mean, plain_flip.mean, atol=1e-3)
    # the default keeps the posterior: std = exp(logvar / 2), scaled like the mean
    assert manifest["latent_stat"] == "posterior" and manifest["version"] == 2
    _, stds, _ = load_all(feat, "stds")
    assert torch.allclose(torch.from_numpy(stds[:, 0]), plain.std * SCALE, rtol=1e-4)
    assert torch.allclose(torch.from_numpy(stds[:, 1]), plain_flip.std * SCALE, rtol=1e-4)
    assert not [f for f in os.listdir(feat) if ".tmp-" in f]  # atomic writes leave no temp files

    means_only = tmp_path / "means"
    extract_features.main(run_args(tmp_path / "imgs", means_only, vae_path, latent_stat="mean"))
    manifest, mean_latents, _ = load_all(means_only)
    assert manifest["latent_stat"] == "mean" and "stds" not in manifest["shards"][0]
    assert not [f for f in os.listdir(means_only) if f.endswith(".stds.npy")]
    np.testing.assert_array_equal(mean_latents, latents)
    with pytest.raises(UsageError, match="different configuration"):  # a means-only folder is not resumed as posterior
        extract_features.main(run_args(tmp_path / "imgs", means_only, vae_path, latent_stat="posterior", shard_size=5))


def test_bad_image_fails_naming_it_and_count_then_skip_resumes_only_unfinished_shards(tmp_path, tiny_vae, monkeypatch):
    vae_path, _ = tiny_vae
    make_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "03.png").write_bytes(b"garbage")  # index 9 -> shard 1 of [0,5) [5,10) [10,12)
    feat = tmp_path / "feat"
    encoded = []
    real_encode = extract_features.encode_with_flip
    monkeypatch.setattr(extract_features, "encode_with_flip",
                        lambda vae, x, scale: encoded.append(len(x)) or real_encode(vae, x, scale))
    with pytest.raises(UsageError) as failure:
        extract_features.main(run_args(tmp_path / "imgs", feat, vae_path))
    assert "1 unreadable image" in str(failure.value) and "dog/03.png" in str(failure.value)
    assert sorted(f for f in os.listdir(feat) if f.endswith(".json")) == ["shard-00000.json", "shard-00002.json"]
    before = shard_stamps(feat)

    encoded.clear()
    extract_features.main(run_args(tmp_path / "imgs", feat, vae_path, skip_bad_images=True))
    assert sum(encoded) == 4  # only shard 1's readable images are encoded again
    after = shard_stamps(feat)
    assert all(after[f] == stamp for f, stamp in before.items())  # finished shards untouched
    manifest, latents, labels = load_all(feat)
    assert manifest["count"] == 11 and len(manifest["skipped"]) == 1 and manifest["skipped"][0].endswith("dog/03.png")
    assert labels.tolist() == [0] * 6 + [1] * 5

    encoded.clear()
    extract_features.main(run_args(tmp_path / "imgs", feat, vae_path, skip_bad_images=True))
    assert encoded == [] and shard_stamps(feat) == after
    with pytest.raises(UsageError, match="different configuration"):
        extract_features.main(run_args(tmp_path / "imgs", feat, vae_path, skip_bad_images=True, image_size=8))


def test_offline_without_the_vae_weights_says_so_in_one_line_before_creating_anything(tmp_path):
    make_images(tmp_path / "imgs", per_class=1)
    env = dict(subprocess_env(), HF_HOME=str(tmp_path / "empty_hf_home"))  # nothing cached, offline
    feat = tmp_path / "feat"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "extract_features.py"), "--data-path",
                             str(tmp_path / "imgs"), "--features-path", str(feat), "--vae", "ema", "--image-size", "16"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert result.returncode == 2
    assert result.stderr == ("extract_features.py: error: the VAE weights stabilityai/sd-vae-ft-ema are not available "
                             "offline (HF_HUB_OFFLINE is set and they are not in the Hugging Face cache); pass --vae "
                             "with a local folder holding a diffusers AutoencoderKL (AutoencoderKL.save_pretrained "
                             "writes one)\n")
    assert not feat.exists()
    with pytest.raises(UsageError, match=f"^the folder {tmp_path} does not hold a diffusers AutoencoderKL"):
        extract_features.main(run_args(tmp_path / "imgs", feat, str(tmp_path)))
    with pytest.raises(UsageError, match="^--shard-size must be >= 1, got 0$"):
        extract_features.main(run_args(tmp_path / "imgs", feat, str(tmp_path), shard_size=0))
    with pytest.raises(UsageError, match=f"^--data-path: .*{tmp_path / 'missing'}"):
        extract_features.main(run_args(tmp_path / "missing", feat, str(tmp_path)))
    assert not feat.exists()


def test_vae_shorthands_map_to_official_dit_vaes():
    assert vae_name("ema") == "stabilityai/sd-vae-ft-ema"
    assert vae_name("mse") == "stabilityai/sd-vae-ft-mse"
    assert vae_name("/some/local/vae") == "/some/local/vae"


def test_two_process_torchrun_matches_one_process_and_latent_dataset_reads_both_flips(tmp_path, tiny_vae):
    vae_path, _ = tiny_vae
    make_images(tmp_path / "imgs")
    single, multi = tmp_path / "single", tmp_path / "multi"
    extract_features.main(run_args(tmp_path / "imgs", single, vae_path, shard_size=3))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "extract_features.py"), "--data-path", str(tmp_path / "imgs"),
           "--feature-path", str(multi), "--image-size", "16", "--vae", vae_path, "--batch-size", "2",
           "--num-workers", "0", "--shard-size", "3"]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    m1, lat1, lab1 = load_all(single)
    m2, lat2, lab2 = load_all(multi)
    std2 = load_all(multi, "stds")[1]
    assert m2["count"] == m1["count"] == 12 and len(m2["shards"]) == 4
    # batches of 3 here, of 2 and 1 on the ranks: fp32 rounding only, <= 4e-7 (see the test above)
    assert np.allclose(lat1, lat2, atol=1e-5) and np.array_equal(lab1, lab2)
    ranks = [json.load(open(multi / f"shard-{k:05d}.json"))["rank"] for k in range(4)]
    assert ranks == [0, 1, 0, 1]  # each shard written by exactly its own rank, none overwritten
    assert not [f for f in os.listdir(multi) if ".tmp-" in f]

    ds = build_dataset(feature_path=str(multi), seed=0)
    assert ds.num_classes == 2 and ds.channels == 4 and ds.resolution == 8 and len(ds) == 12
    seen = set()
    for i in range(12):
        x, y = ds[i]
        f = int(ds.is_flipped(i))
        seen.add(f)
        assert x.shape == (2, 4, 8, 8) and int(y) == lab2[i]  # the posterior's moments: mean, std
        assert torch.equal(x[0], torch.from_numpy(lat2[i, f])) and torch.equal(x[1], torch.from_numpy(std2[i, f]))
    assert seen == {0, 1}
