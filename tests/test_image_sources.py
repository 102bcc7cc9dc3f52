"""Pins evaluations/image_sources.py: ADM's center crop, image folders and the IDX reader."""
import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from evaluations.image_sources import center_crop_arr, list_image_files, load_image, read_idx


def write_idx(path, array):
    """Independent IDX writer: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, raw bytes."""
    payload = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("name", ["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"])
def test_idx_reader_round_trips(tmp_path, name):
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / name, array)
    assert (read_idx(str(tmp_path / name)) == array).all()


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / "x-idx3-ubyte", np.zeros((2, 4, 4), np.uint8))
    data = (tmp_path / "x-idx3-ubyte").read_bytes()
    (tmp_path / "short").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(str(tmp_path / "short"))
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(tmp_path / "png"))


@pytest.mark.skipif(not os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_test_split_reads_as_10000_images():
    images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and images.max() > 200


def test_center_crop_keeps_the_middle_of_the_short_side():
    # 40x20 image whose middle 20x20 is white: after a crop to 10 only white remains
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = 255
    cropped = center_crop_arr(Image.fromarray(arr), 10)
    assert cropped.shape == (10, 10, 3) and cropped.min() == 255


def test_image_folder_is_listed_recursively_and_corrupt_images_are_named(tmp_path):
    (tmp_path / "n01").mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "n01" / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    files = list_image_files(str(tmp_path))
    assert [os.path.relpath(f, tmp_path) for f in files] == ["b.jpg", "n01/a.png"]
    assert load_image(files[1], 8).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="cannot read image .*b.jpg"):
        load_image(files[0], 8)
    with pytest.raises(ValueError, match="no images"):
        list_image_files(str(empty))

