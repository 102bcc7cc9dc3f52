"""Pins evaluations/batch_npz.py: ADM batch files are validated with errors that name the problem."""
import numpy as np
import pytest

from evaluations.batch_npz import as_rgb_images, read_batch, write_npz_atomic


def test_grayscale_images_are_repeated_to_three_channels():
    gray = np.random.default_rng(0).integers(0, 256, (4, 8, 8), dtype=np.uint8)
    rgb = as_rgb_images(gray)
    assert rgb.shape == (4, 8, 8, 3) and all((rgb[..., c] == gray).all() for c in range(3))
    assert as_rgb_images(gray[..., None]).shape == (4, 8, 8, 3)


@pytest.mark.parametrize("arrays, message", [
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "must be uint8"),
    ({"arr_0": np.zeros((2, 3, 8, 8), np.uint8)}, "must be NHWC"),
    ({"mu": np.zeros(2048), "sigma": np.zeros((2048, 2047))}, r"sigma must be a float array of shape \(2048, 2048\)"),
    ({"mu": np.zeros(2048)}, "must come in pairs"),
    ({"labels": np.zeros(3)}, "needs images under arr_0 or statistics"),
])
def test_bad_batches_are_rejected_naming_the_problem(tmp_path, arrays, message):
    np.savez(tmp_path / "batch.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        read_batch(str(tmp_path / "batch.npz"))


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz does not exist"):
        read_batch(str(tmp_path / "nothere.npz"))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable .npz"):
        read_batch(str(tmp_path / "corrupt.npz"))


def test_written_batch_reads_back_and_leaves_no_temporary_files(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    write_npz_atomic(str(tmp_path / "ref.npz"), arr_0=images, mu=np.ones(2048), sigma=np.eye(2048))
    batch = read_batch(str(tmp_path / "ref.npz"))
    assert (batch["images"] == images).all() and (batch["mu"] == 1).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]
