"""build_dataset: one entry point that picks the dataset kind for train.py and extract_features.py."""
import os

from .coco import coco_image_dataset
from .fashion_mnist import FashionMNISTDataset, find_idx_file
from .image_folder import flat_image_dataset, image_folder_dataset, is_image_file
from .latents import MANIFEST_NAME, LatentFeatureDataset

KINDS = ("auto", "imagefolder", "flat", "fashion-mnist", "latents", "coco")  # --data-kind of every script
# make_reference's old --dataset values: ImageNet's class folders, FFHQ and any folder read as every image in it
OLD_KIND_NAMES = {"imagenet": "imagefolder", "ffhq": "flat", "folder": "flat"}


def kind_name(text):
    """A --data-kind value, with make_reference's old --dataset names mapped to their kind."""
    return OLD_KIND_NAMES.get(text, text)


def detect_kind(data_path, feature_path=None):
    """Guess the dataset kind from what is on disk (explicit kind= is clearer; FFHQ's nested folders need 'flat')."""
    if feature_path is not None:
        return "latents"
    if data_path is None:
        raise ValueError("give data_path (images / Fashion-MNIST) or feature_path (latents)")
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"data path does not exist or is not a directory: {data_path}")
    if os.path.isfile(os.path.join(data_path, MANIFEST_NAME)):
        return "latents"
    if find_idx_file(data_path, "train-images-idx3-ubyte") or find_idx_file(data_path, "t10k-images-idx3-ubyte"):
        return "fashion-mnist"
    entries = list(os.scandir(data_path))
    if any(e.is_file() and is_image_file(e.name) for e in entries):
        return "flat"
    if any(e.is_dir() for e in entries):
        return "imagefolder"
    raise FileNotFoundError(f"cannot tell the dataset kind of {data_path}: no images, class subfolders, "
                            f"Fashion-MNIST IDX files or {MANIFEST_NAME}")


def build_dataset(data_path=None, feature_path=None, image_size=256, kind="auto", flip=True, seed=0, split="train",
                  captions=None):
    """Dataset yielding (x float tensor (C, H, W), y int64); has num_classes, channels, resolution, set_epoch.

    kind "coco": data_path is a COCO image folder (train2014/), captions its captions_*.json (default: the
    standard layout's annotations/captions_<folder>.json); y is the image id (imagedata/coco.py).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "auto":
        kind = "coco" if captions is not None and feature_path is None else detect_kind(data_path, feature_path)
    if split != "train" and kind != "fashion-mnist":
        raise ValueError(f"split={split!r} applies to fashion-mnist only; point data_path at the split's folder instead")
    if kind == "latents":
        path = feature_path if feature_path is not None else data_path
        if path is None:
            raise ValueError("kind='latents' needs feature_path (the extract_features.py output directory)")
        return LatentFeatureDataset(path, flip=flip, seed=seed)
    if data_path is None:
        raise ValueError(f"kind={kind!r} needs data_path")
    if kind == "coco":
        return coco_image_dataset(data_path, captions, image_size, flip=flip, seed=seed)
    if kind == "imagefolder":
        return image_folder_dataset(data_path, image_size, flip=flip, seed=seed)
    if kind == "flat":
        return flat_image_dataset(data_path, image_size, flip=flip, seed=seed)
    return FashionMNISTDataset(data_path, image_size=image_size, split=split, flip=flip, seed=seed)
