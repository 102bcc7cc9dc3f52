"""Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist or torchvision's download layout)."""
import gzip
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .center_crop import to_model_range
from .flip import SeededFlip

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data is big-endian.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist (the Makefile installs it)
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path):
    """Read an IDX file (optionally .gz) into a numpy array of its declared shape and dtype."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"not an IDX file (bad magic {raw[:4].hex()}): {path}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"truncated IDX header in {path}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"IDX file {path} holds {len(raw) - header} data bytes, header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(root, name):
    """Locate `name` (or name.gz) in root, root/raw or root/FashionMNIST/raw (torchvision layout)."""
    for folder in (root, os.path.join(root, "raw"), os.path.join(root, "FashionMNIST", "raw")):
        for candidate in (name, name + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def fashion_mnist_files(root, split):
    """(images path, labels path) for split 'train' or 'test'; clear error when absent."""
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(SPLIT_PREFIX)}, got {split!r}")
    names = [f"{SPLIT_PREFIX[split]}-images-idx3-ubyte", f"{SPLIT_PREFIX[split]}-labels-idx1-ubyte"]
    paths = [find_idx_file(root, n) for n in names]
    missing = [n for n, p in zip(names, paths) if p is None]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST {split} files {missing} (optionally .gz) not found in {root}, "
                                f"{root}/raw or {root}/FashionMNIST/raw")
    return paths


def fit_to_size(img, image_size):
    """28x28 uint8 -> (S, S): zero-pad (black) when 28 <= S <= 32 and S - 28 is even, else BICUBIC resize."""
    h = img.shape[0]
    if image_size >= h and image_size - h <= 4 and (image_size - h) % 2 == 0:
        pad = (image_size - h) // 2
        return np.pad(img, pad)
    return np.array(Image.fromarray(img).resize((image_size, image_size), resample=Image.BICUBIC))


class FashionMNISTDataset(SeededFlip, Dataset):
    """Fashion-MNIST -> (x (1, S, S) in [-1, 1], y int64 in 0..9); seeded hflip; train split by default."""

    def __init__(self, root, image_size=32, split="train", flip=True, seed=0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data path does not exist or is not a directory: {root}")
        images_path, labels_path = fashion_mnist_files(root, split)
        self.images = read_idx(images_path)  # (N, 28, 28) uint8
        self.labels = read_idx(labels_path)  # (N,) uint8
        if self.images.ndim != 3 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(f"inconsistent Fashion-MNIST files: images {self.images.shape} in {images_path}, "
                             f"labels {self.labels.shape} in {labels_path}")
        self.image_size = int(image_size)
        self.split = split
        self.num_classes = len(FASHION_MNIST_CLASSES)
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.channels = 1
        self.resolution = self.image_size
        self._init_flip(flip, seed)

    def __len__(self):
        return len(self.labels)

    def load(self, index):
        """Unflipped sample `index`: (x (1, S, S) float in [-1, 1], y int64 scalar)."""
        x = to_model_range(fit_to_size(self.images[index], self.image_size))
        return x, torch.tensor(int(self.labels[index]), dtype=torch.int64)

    def __getitem__(self, index):
        x, y = self.load(index)
        if self.is_flipped(index):
            x = x.flip(-1)
        return x, y
