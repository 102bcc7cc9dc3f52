"""Reference images for make_reference: image folders with ADM's center crop, and Fashion-MNIST IDX files."""
import gzip
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".jpeg2000", ".ppm", ".tif", ".tiff")


def center_crop_arr(pil_image, image_size):
    """ADM / DiT preprocessing: BOX-halve while >= 2x, BICUBIC-resize the short side, center crop (uint8 HWC)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y, crop_x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def list_image_files(root):
    """All image files under root (recursively, e.g. ImageNet's class folders), sorted for reproducibility."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def load_image(path, image_size):
    """One RGB image, center-cropped to image_size: uint8 (image_size, image_size, 3)."""
    try:
        with Image.open(path) as image:
            image.load()
            return center_crop_arr(image.convert("RGB"), image_size)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


#################################################################################
#                           IDX files (Fashion-MNIST)                           #
#################################################################################

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """IDX array (LeCun's MNIST format: 0, 0, dtype code, ndim, big-endian int32 dims, data); .gz allowed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file {path} does not exist")
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + dtype.itemsize * int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header says shape {dims} ({expected} bytes) but the file has {len(data)} bytes")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims)


def find_fashion_mnist_images(data_path, split):
    """The IDX images file of a split ('train' or 't10k') in a folder such as /usr/share/datasets/fashion-mnist."""
    if os.path.isfile(data_path):
        return data_path
    for name in (f"{split}-images-idx3-ubyte", f"{split}-images-idx3-ubyte.gz"):
        if os.path.isfile(os.path.join(data_path, name)):
            return os.path.join(data_path, name)
    raise FileNotFoundError(f"no {split}-images-idx3-ubyte(.gz) in {data_path} "
                            "(Debian: apt-get install dataset-fashion-mnist)")
