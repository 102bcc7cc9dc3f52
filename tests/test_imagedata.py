"""Tests pinning imagedata: dataset kinds, ADM center crop, seeded flips, IDX reader, latent shards, errors."""
import gzip
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from imagedata import (BadImageError, build_dataset, center_crop_arr, detect_kind, flip_decision, read_idx,
                       read_manifest)
from imagedata.fashion_mnist import DEBIAN_FASHION_MNIST
from imagedata.latents import LatentFeatureDataset, sample_posterior, write_manifest, write_shard

FASHION_MNIST_SYSTEM = DEBIAN_FASHION_MNIST


def save_rgb(path, color, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def random_image(path, rng, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_idx(path, arr, dtype_code=0x08):
    header = bytes([0, 0, dtype_code, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


# ----------------------------------------------------------------------------- image folders

def test_imagefolder_labels_follow_sorted_class_names_and_pixels_map_to_minus1_1(tmp_path):
    save_rgb(str(tmp_path / "zebra" / "a.png"), (255, 0, 0))
    save_rgb(str(tmp_path / "zebra" / "sub" / "b.jpg"), (255, 0, 0), size=(30, 9))
    save_rgb(str(tmp_path / "apple" / "c.png"), (0, 255, 51), size=(8, 8))
    ds = build_dataset(data_path=str(tmp_path), image_size=8, flip=False)
    assert detect_kind(str(tmp_path)) == "imagefolder"
    assert ds.num_classes == 2 and ds.channels == 3 and ds.resolution == 8 and len(ds) == 3
    assert ds.class_names == ["apple", "zebra"]
    items = [ds[i] for i in range(len(ds))]
    assert [int(y) for _, y in items] == [0, 1, 1]
    for x, y in items:
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
    x_apple = items[0][0]
    expected = torch.tensor([0, 255, 51], dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(x_apple, expected[:, None, None].expand(3, 8, 8))
    batch = torch.utils.data.default_collate(items)
    assert batch[0].shape == (3, 3, 8, 8) and batch[1].dtype == torch.int64


def test_flat_folder_is_unconditional_with_label_zero_and_recurses(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("00000/1.png", "00000/2.png", "01000/3.png"):
        random_image(str(tmp_path / name), rng)
    ds = build_dataset(data_path=str(tmp_path), image_size=8, kind="flat")
    assert len(ds) == 3 and ds.num_classes == 1
    assert all(int(ds[i][1]) == 0 for i in range(3))
    flat = tmp_path / "flat"
    random_image(str(flat / "x.png"), rng)
    assert detect_kind(str(flat)) == "flat"
    assert build_dataset(data_path=str(flat), image_size=8).num_classes == 1


def test_center_crop_box_halves_then_crops_the_middle_hand_computed():
    # W=8, H=4, size 2: min side 4 >= 2*2 -> BOX halves to 4x2 (means of 2x2 blocks), then the
    # BICUBIC step is to the same size (scale 1), then columns 1..2 of the 4 are kept.
    arr = np.zeros((4, 8, 3), dtype=np.uint8)
    for col in range(8):
        arr[:2, col] = 10 * col  # top rows
        arr[2:, col] = 10 * col + 100  # bottom rows
    out = center_crop_arr(Image.fromarray(arr), 2)
    block_means = [(10 * 2 * j + 10 * (2 * j + 1)) / 2 for j in range(4)]  # 5, 25, 45, 65
    expected = np.array([[block_means[1], block_means[2]], [block_means[1] + 100, block_means[2] + 100]])
    assert out.shape == (2, 2, 3)
    assert np.array_equal(out[..., 0], expected.astype(np.uint8))


def test_center_crop_upscales_short_side_to_size_and_keeps_constant_images_constant():
    img = Image.new("RGB", (7, 3), (40, 80, 120))
    out = center_crop_arr(img, 8)
    assert out.shape == (8, 8, 3)
    assert np.array_equal(out, np.broadcast_to(np.array([40, 80, 120], np.uint8), (8, 8, 3)))


# ----------------------------------------------------------------------------- flips

def test_flip_is_reproducible_from_seed_epoch_index_and_really_mirrors(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(16):
        random_image(str(tmp_path / "c" / f"{i:02d}.png"), rng, size=(8, 8))
    a = build_dataset(data_path=str(tmp_path), image_size=8, seed=3)
    b = build_dataset(data_path=str(tmp_path), image_size=8, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    flips = [a.is_flipped(i) for i in range(16)]
    assert any(flips) and not all(flips)
    for i in range(16):
        assert torch.equal(a[i][0], b[i][0])
        plain = a.load(i)[0]
        assert torch.equal(a[i][0], plain.flip(-1) if flips[i] else plain)
        assert not torch.equal(plain, plain.flip(-1))  # random images are not symmetric
    a.set_epoch(3)
    assert [a.is_flipped(i) for i in range(16)] != flips
    no_flip = build_dataset(data_path=str(tmp_path), image_size=8, flip=False)
    assert not any(no_flip.is_flipped(i) for i in range(16))


def test_flip_decision_is_a_pure_function_balanced_over_indices():
    torch.manual_seed(0)
    first = [flip_decision(7, 1, i) for i in range(2000)]
    torch.manual_seed(123)
    np.random.seed(5)
    assert first == [flip_decision(7, 1, i) for i in range(2000)]
    assert 900 < sum(first) < 1100
    assert first != [flip_decision(8, 1, i) for i in range(2000)]


# ----------------------------------------------------------------------------- Fashion-MNIST

def test_idx_reader_reads_gz_and_plain_files_and_fashion_mnist_pads_to_32(tmp_path):
    rng = np.random.default_rng(2)
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's download layout
    raw.mkdir(parents=True)
    train_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    train_y = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    test_x = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    write_idx(str(raw / "train-images-idx3-ubyte.gz"), train_x)
    write_idx(str(raw / "train-labels-idx1-ubyte.gz"), train_y)
    write_idx(str(raw / "t10k-images-idx3-ubyte"), test_x)
    write_idx(str(raw / "t10k-labels-idx1-ubyte"), np.array([9, 0], dtype=np.uint8))
    assert np.array_equal(read_idx(str(raw / "train-images-idx3-ubyte.gz")), train_x)
    floats = np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3)
    write_idx(str(tmp_path / "f.idx"), floats, dtype_code=0x0D)
    assert np.array_equal(read_idx(str(tmp_path / "f.idx")), floats)

    ds = build_dataset(data_path=str(tmp_path), image_size=32, flip=False)
    assert detect_kind(str(tmp_path)) == "fashion-mnist"
    assert len(ds) == 5 and ds.channels == 1 and ds.num_classes == 10 and ds.resolution == 32
    x, y = ds[2]
    assert x.shape == (1, 32, 32) and int(y) == 4
    assert torch.equal(x[0, 2:30, 2:30], torch.from_numpy(train_x[2]).float() / 127.5 - 1)
    assert torch.all(x[0, :2] == -1) and torch.all(x[0, :, 30:] == -1)  # zero padding is black
    test = build_dataset(data_path=str(tmp_path), image_size=28, split="test", flip=False)
    assert len(test) == 2 and [int(test[i][1]) for i in range(2)] == [9, 0]
    assert build_dataset(data_path=str(tmp_path), image_size=16)[0][0].shape == (1, 16, 16)


def test_idx_reader_rejects_bad_magic_and_truncated_data(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="bad-idx"):
        read_idx(str(bad))
    short = tmp_path / "short-idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + np.array([10], ">u4").tobytes() + b"\x00" * 3)
    with pytest.raises(ValueError, match="short-idx"):
        read_idx(str(short))
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        build_dataset(data_path=str(tmp_path), kind="fashion-mnist", split="test")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_SYSTEM), reason="Debian dataset-fashion-mnist not installed")
def test_system_fashion_mnist_has_balanced_60k_train_10k_test_splits():
    train = build_dataset(data_path=FASHION_MNIST_SYSTEM, image_size=32)
    test = build_dataset(data_path=FASHION_MNIST_SYSTEM, image_size=32, split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(train.labels).tolist() == [6000] * 10  # Fashion-MNIST is class balanced
    assert np.bincount(test.labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- bad input

def test_corrupt_image_raises_error_naming_the_file(tmp_path):
    save_rgb(str(tmp_path / "c" / "good.png"), (1, 2, 3))
    (tmp_path / "c" / "broken.png").write_bytes(b"not a png at all")
    ds = build_dataset(data_path=str(tmp_path), image_size=8)
    idx = [os.path.basename(p) for p in ds.paths].index("broken.png")
    with pytest.raises(BadImageError, match="broken.png"):
        ds[idx]


def test_missing_path_empty_folder_and_unknown_kind_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(data_path=str(tmp_path / "nope"), image_size=8)
    with pytest.raises(FileNotFoundError, match="cannot tell"):
        build_dataset(data_path=str(tmp_path), image_size=8)
    with pytest.raises(FileNotFoundError, match="no images"):
        build_dataset(data_path=str(tmp_path), image_size=8, kind="flat")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_class"):
        build_dataset(data_path=str(tmp_path), image_size=8, kind="imagefolder")
    with pytest.raises(ValueError, match="valid"):
        build_dataset(data_path=str(tmp_path), kind="cifar")


# ----------------------------------------------------------------------------- latents

def make_latent_dir(path, rng, counts=(3, 2), latent_stat="mean"):
    """A features folder as extract_features.py writes it; returns (means, labels), plus stds for "posterior"."""
    path.mkdir(exist_ok=True)
    all_latents, all_stds, all_labels, start = [], [], [], 0
    for k, n in enumerate(counts):
        latents = rng.standard_normal((n, 2, 4, 2, 2)).astype(np.float32)
        stds = rng.uniform(0.01, 0.2, (n, 2, 4, 2, 2)).astype(np.float32)
        labels = rng.integers(0, 5, n)
        write_shard(str(path), k, latents, labels, {"start": start, "stop": start + n, "skipped": []},
                    stds=stds if latent_stat == "posterior" else None)
        all_latents.append(latents)
        all_stds.append(stds)
        all_labels.append(labels)
        start += n
    write_manifest(str(path), len(counts), latent_stat=latent_stat, vae="tiny", latent_scale=0.18215,
                   latent_shape=[4, 2, 2], image_size=16, num_classes=5, shard_size=3)
    if latent_stat == "posterior":
        return np.concatenate(all_latents), np.concatenate(all_labels), np.concatenate(all_stds)
    return np.concatenate(all_latents), np.concatenate(all_labels)


def test_latent_dataset_returns_the_seeded_choice_of_plain_or_flipped_latent(tmp_path):
    latents, labels = make_latent_dir(tmp_path / "feat", np.random.default_rng(4))
    ds = build_dataset(feature_path=str(tmp_path / "feat"), seed=11)
    assert len(ds) == 5 and ds.num_classes == 5 and ds.channels == 4 and ds.resolution == 2
    assert ds.latent_scale == 0.18215
    picked = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(5):
            x, y = ds[i]
            f = int(ds.is_flipped(i))
            picked.add(f)
            assert torch.equal(x, torch.from_numpy(latents[i, f])) and int(y) == labels[i]
    assert picked == {0, 1}
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1)
    x, y = next(iter(loader))
    assert x.shape == (5, 4, 2, 2) and torch.equal(y, torch.from_numpy(labels))


def test_posterior_folder_yields_mean_and_std_and_sample_posterior_draws_from_them(tmp_path):
    latents, labels, stds = make_latent_dir(tmp_path / "feat", np.random.default_rng(6), latent_stat="posterior")
    ds = build_dataset(feature_path=str(tmp_path / "feat"), seed=3)
    assert ds.latent_stat == "posterior" and ds.channels == 4
    for i in range(5):
        x, y = ds[i]
        f = int(ds.is_flipped(i))
        assert x.shape == (2, 4, 2, 2) and int(y) == labels[i]
        assert torch.equal(x[0], torch.from_numpy(latents[i, f])) and torch.equal(x[1], torch.from_numpy(stds[i, f]))
    moments = torch.stack([ds[i][0] for i in range(5)])  # (5, 2, 4, 2, 2)
    eps = torch.randn(5, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    z = sample_posterior(moments, eps)
    torch.testing.assert_close(z, moments[:, 0] + moments[:, 1] * eps, rtol=0, atol=0)
    means = LatentFeatureDataset(str(tmp_path / "feat"), seed=3, latent_stat="mean")  # means of the same folder
    assert all(torch.equal(means[i][0], ds[i][0][0]) for i in range(5))


def test_version_1_means_only_folders_still_load(tmp_path):
    feat = tmp_path / "feat"
    latents, labels = make_latent_dir(feat, np.random.default_rng(7))
    manifest = json.loads((feat / "manifest.json").read_text())
    manifest["version"] = 1
    manifest.pop("latent_stat")  # written before the posterior was stored
    (feat / "manifest.json").write_text(json.dumps(manifest))
    ds = build_dataset(feature_path=str(feat), seed=0)
    assert ds.latent_stat == "mean" and ds[0][0].shape == (4, 2, 2)
    assert torch.equal(ds[0][0], torch.from_numpy(latents[0, int(ds.is_flipped(0))]))
    with pytest.raises(ValueError, match="posterior means only.*--latent-stat posterior"):
        LatentFeatureDataset(str(feat), latent_stat="posterior")
    manifest["version"] = 3
    (feat / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="v3, expected 'dtr-vae-latents' v1 or v2"):
        read_manifest(str(feat))


def test_latents_with_missing_or_corrupt_manifest_or_shard_fail_clearly(tmp_path):
    feat = tmp_path / "feat"
    make_latent_dir(feat, np.random.default_rng(5))
    manifest = feat / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt manifest"):
        build_dataset(feature_path=str(feat))
    manifest.write_text(json.dumps({"format": "dtr-vae-latents"}))
    with pytest.raises(ValueError, match="lacks keys"):
        read_manifest(str(feat))
    manifest.write_text(good)
    os.remove(feat / "shard-00001.labels.npy")
    with pytest.raises(FileNotFoundError, match="shard-00001.labels.npy"):
        build_dataset(feature_path=str(feat))
    os.remove(manifest)
    with pytest.raises(FileNotFoundError, match="extract_features"):
        build_dataset(feature_path=str(feat))
