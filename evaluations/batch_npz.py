"""ADM-format batch files: `arr_0` uint8 NHWC images and/or precomputed `mu`, `sigma`, `mu_s`, `sigma_s`."""
import os
import zipfile

import numpy as np

from foundation.atomic_file import atomic_write

POOL_DIM, SPATIAL_DIM = 2048, 2023  # pool_3 and sFID features (17 * 17 * 7)
STATISTIC_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM),
                    "mu_s": (SPATIAL_DIM,), "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}


def as_rgb_images(images, name="images"):
    """Validate uint8 images (N, H, W[, C]) with C in {1, 3}; grayscale is repeated to 3 channels for Inception."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{name}: images must be uint8 in [0, 255] (ADM format), got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]  # (N, H, W) -> (N, H, W, 1)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"{name}: images must be NHWC with 1 or 3 channels and N > 0, got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)  # (N, H, W, 1) -> (N, H, W, 3)
    return images


def read_batch(path):
    """Read and validate a batch npz: dict with 'images' (or None) and any of mu/sigma/mu_s/sigma_s (float64)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"batch file {path} does not exist")
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npz file: {error}") from error
    batch = {"images": as_rgb_images(arrays["arr_0"], f"{path}: arr_0") if "arr_0" in arrays else None}
    for key, shape in STATISTIC_SHAPES.items():
        if key in arrays:
            value = arrays[key]
            if value.shape != shape or not np.issubdtype(value.dtype, np.floating):
                raise ValueError(f"{path}: {key} must be a float array of shape {shape}, "
                                 f"got {value.dtype} {value.shape}")
            batch[key] = value.astype(np.float64)
    if ("mu" in batch) != ("sigma" in batch) or ("mu_s" in batch) != ("sigma_s" in batch):
        raise ValueError(f"{path}: mu/sigma and mu_s/sigma_s must come in pairs, found {sorted(arrays)}")
    if batch["images"] is None and "mu" not in batch:
        raise ValueError(f"{path}: needs images under arr_0 or statistics mu/sigma, found keys {sorted(arrays)}")
    return batch


def image_size_of(path):
    """(H, W) of a batch's arr_0 images read from the array's header alone (no pixels loaded), or None without
    arr_0; raises ValueError for a file that is not a readable .npz."""
    try:
        with zipfile.ZipFile(path) as archive:
            if "arr_0.npy" not in archive.namelist():
                return None
            with archive.open("arr_0.npy") as member:
                version = np.lib.format.read_magic(member)
                if version not in ((1, 0), (2, 0)):  # 3.0 (utf-8 field names) never holds plain uint8 images
                    return None
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(member)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npz file: {error}") from error
    return tuple(shape[1:3]) if len(shape) >= 3 else None


def write_npz_atomic(path, **arrays):
    """np.savez through a temporary file and os.replace, so a crash never leaves a half-written file."""
    atomic_write(path, lambda f: np.savez(f, **arrays))
