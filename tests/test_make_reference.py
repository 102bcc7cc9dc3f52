"""Pins evaluations/make_reference.py: Fashion-MNIST and image-folder reference batches in ADM format."""
import argparse
import gzip
import importlib.util
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from evaluations import make_reference
from evaluations.batch_npz import read_batch
from foundation.usage_error import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(path, array):
    """gzipped uint8 IDX file: magic (0, 0, 0x08, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def args_for(**overrides):
    defaults = dict(data_kind="fashion-mnist", data_path=None, output=None, image_size=None, num_images=None,
                    split="t10k", seed=0, captions=None, no_statistics=True, inception_weights=None, batch_size=50, device="cpu")
    return argparse.Namespace(**{**defaults, **overrides})


def test_fashion_mnist_reference_is_a_seeded_rgb_subset(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", gray)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(20, dtype=np.uint8) % 10)
    make_reference.main(args_for(data_path=str(tmp_path), output=str(tmp_path / "ref.npz"), num_images=6))
    images = read_batch(str(tmp_path / "ref.npz"))["images"]
    assert images.shape == (6, 28, 28, 3) and (images[..., 0] == images[..., 2]).all()
    rows = [int(np.flatnonzero((gray == img[..., 0]).all(axis=(1, 2)))[0]) for img in images]
    assert rows == sorted(rows) and len(set(rows)) == 6  # a sorted subset without repeats
    make_reference.main(args_for(data_path=str(tmp_path), output=str(tmp_path / "again.npz"), num_images=6))
    assert (read_batch(str(tmp_path / "again.npz"))["images"] == images).all()  # same seed, same subset


def test_missing_fashion_mnist_split_names_the_expected_file(tmp_path):
    with pytest.raises(UsageError, match="^--data-path: .*t10k-images-idx3-ubyte"):
        make_reference.main(args_for(data_path=str(tmp_path), output=str(tmp_path / "ref.npz")))


def test_command_line_mistakes_exit_2_with_one_line_and_write_nothing(tmp_path):
    gray = np.zeros((4, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", gray)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    common = [sys.executable, "-m", "evaluations.make_reference", "--dataset", "fashion-mnist", "--split", "t10k",
              "--no-statistics", "--data-path", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run([*common, "--output", str(blocker / "ref.npz")], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stderr == (
        f"make_reference.py: error: --output {blocker}/ref.npz cannot be created: {blocker} is not a directory\n")
    with pytest.raises(UsageError, match="^--num-images must be >= 1, got 0$"):
        make_reference.main(args_for(data_path=str(tmp_path), output=str(tmp_path / "out" / "ref.npz"), num_images=0))
    with pytest.raises(UsageError, match=f"^--data-path: image folder {tmp_path}/missing does not exist$"):
        make_reference.main(args_for(data_kind="flat", data_path=str(tmp_path / "missing"),
                                     output=str(tmp_path / "out" / "ref.npz")))
    with pytest.raises(UsageError, match="^--inception-weights .*none.pth: no such file$"):
        make_reference.main(args_for(data_path=str(tmp_path), output=str(tmp_path / "out" / "ref.npz"),
                                     no_statistics=False, inception_weights=str(tmp_path / "none.pth")))
    assert sorted(os.listdir(tmp_path)) == ["a_file", "t10k-images-idx3-ubyte.gz"]  # nothing written


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity is not installed")
def test_folder_reference_with_statistics_matches_evaluator_statistics(tmp_path):
    from evaluations.evaluator import reference_features
    from evaluations.inception import InceptionFeatures
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    try:
        inception = InceptionFeatures()
    except FileNotFoundError as error:
        pytest.skip(f"no Inception weights: {error}")
    make_reference.main(args_for(data_kind="flat", data_path=str(tmp_path / "images"), image_size=16,
                                 output=str(tmp_path / "ref.npz"), no_statistics=False))
    batch = read_batch(str(tmp_path / "ref.npz"))
    assert batch["images"].shape == (5, 16, 16, 3)
    computed = reference_features(str(tmp_path / "ref.npz"), batch["images"], inception, batch_size=5)
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_allclose(batch[key], computed[key], rtol=1e-5, atol=1e-6)


def test_coco_reference_is_the_captioned_validation_images_center_cropped_in_image_id_order(tmp_path):
    from imagedata.center_crop import center_crop_arr
    from imagedata.coco import read_coco_captions
    from tiny_coco import write_tiny_coco
    image_dir, path = write_tiny_coco(str(tmp_path / "coco"), split="val2014", num_images=4, size=(24, 18))
    out = str(tmp_path / "ref.npz")
    make_reference.main(args_for(data_kind="coco", data_path=image_dir, output=out, image_size=16))
    coco = read_coco_captions(path)
    expected = [center_crop_arr(Image.open(f"{image_dir}/{coco.file_names[i]}").convert("RGB"), 16)
                for i in coco.image_ids]
    np.testing.assert_array_equal(read_batch(out)["images"], np.stack(expected))


def test_data_kind_is_one_flag_across_scripts_and_the_old_names_still_parse():
    import extract_features
    ref = make_reference.build_parser()
    common = ["--data-path", "d", "--output", "o.npz"]
    assert ref.parse_args(["--data-kind", "flat", *common]).data_kind == "flat"
    for old, kind in (("imagenet", "imagefolder"), ("ffhq", "flat"), ("folder", "flat"), ("coco", "coco")):
        assert ref.parse_args(["--dataset", old, *common]).data_kind == kind  # make_reference's old flag and names
    features = extract_features.build_parser()
    assert features.parse_args(["--data-path", "d", "--kind", "flat"]).data_kind == "flat"  # its old flag
    assert features.parse_args(["--data-path", "d", "--data-kind", "coco"]).data_kind == "coco"
