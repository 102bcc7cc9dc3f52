"""Image-file datasets: class subfolders (ImageNet layout) and one flat folder (FFHQ, unconditional)."""
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .center_crop import center_crop_arr, to_model_range
from .flip import SeededFlip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(ValueError):
    """An image file that PIL cannot decode; the message names the file."""

    def __init__(self, path, reason):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = path, reason


def is_image_file(name):
    """True for file names with a known image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root):
    """All image files under root (recursive), sorted so indices are stable across machines."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return sorted(found)


def load_rgb(path):
    """Decode an image file to RGB, raising BadImageError naming the file on any decode failure."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(path, err) from err


JPEG_END, PNG_END = b"\xff\xd9", b"IEND"  # end-of-image marker / last chunk; a file cut short lacks them
TAIL_BYTES = 4096                             # encoders may pad after the end marker; look this far back


def image_file_problem(path):
    """Why an image file cannot be decoded, or None; cheap: its size, first and last bytes.

    Catches what copies and downloads leave behind (empty files, files cut short, other data under an image
    name) without decoding: a whole dataset is checked in seconds to minutes before training. A file that
    looks cut short is decoded to be sure (JPEGs may carry data after their end marker).
    """
    size = os.path.getsize(path)
    if size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()
    if head.startswith(b"\xff\xd8"):
        suspect = JPEG_END not in tail and "truncated JPEG (no end-of-image marker)"
    elif head.startswith(b"\x89PNG"):
        suspect = PNG_END not in tail and "truncated PNG (no IEND chunk)"
    else:
        suspect = "unrecognised or damaged image"  # other formats: let PIL judge
    if not suspect:
        return None
    try:
        load_rgb(path)
        return None
    except BadImageError:
        return suspect


def find_damaged_images(paths):
    """[(path, reason)] for the image files image_file_problem rejects, in the order given."""
    found = []
    for path in paths:
        problem = image_file_problem(path)
        if problem is not None:
            found.append((path, problem))
    return found


def _check_dir(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path does not exist: {path}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"data path is not a directory: {path}")


class ImageFileDataset(SeededFlip, Dataset):
    """Image files with given labels -> (x (3, S, S) in [-1, 1], y int64); ADM center crop, seeded hflip."""

    def __init__(self, paths, labels, image_size, num_classes, flip=True, seed=0, class_names=None, label_kind="class"):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.paths = list(paths)
        self.labels = list(labels)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.label_kind = label_kind  # "class", or "coco_image_id" (imagedata/coco.py): what y means
        self.channels = 3
        self.resolution = self.image_size
        self._init_flip(flip, seed)

    def __len__(self):
        return len(self.paths)

    def label_array(self):
        """Every sample's label (N,) int64, in index order."""
        return np.asarray(self.labels, dtype=np.int64)

    def load(self, index):
        """Unflipped sample `index`: (x (3, S, S) float in [-1, 1], y int64 scalar)."""
        arr = center_crop_arr(load_rgb(self.paths[index]), self.image_size)
        return to_model_range(arr), torch.tensor(self.labels[index], dtype=torch.int64)

    def __getitem__(self, index):
        x, y = self.load(index)
        if self.is_flipped(index):
            x = x.flip(-1)
        return x, y


def image_folder_dataset(root, image_size, flip=True, seed=0):
    """ImageNet layout root/<class>/**/*.jpg; labels are indices of the sorted class folder names."""
    _check_dir(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))  # skip .cache etc.
    if not classes:
        raise FileNotFoundError(f"no class subfolders in {root} (for a flat folder of images use kind='flat')")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = list_images(os.path.join(root, name))
        if not files:
            raise FileNotFoundError(f"class folder has no images ({', '.join(IMAGE_EXTENSIONS)}): {os.path.join(root, name)}")
        paths += files
        labels += [label] * len(files)
    return ImageFileDataset(paths, labels, image_size, len(classes), flip, seed, class_names=classes)


def flat_image_dataset(root, image_size, flip=True, seed=0):
    """All images under root (recursive, e.g. FFHQ's 00000/ ... 69000/ folders), label 0: unconditional."""
    _check_dir(root)
    paths = list_images(root)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return ImageFileDataset(paths, [0] * len(paths), image_size, 1, flip, seed)
