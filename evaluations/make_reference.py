"""Build an ADM-format reference batch (arr_0 images, mu, sigma, mu_s, sigma_s) from a dataset.

python -m evaluations.make_reference --data-kind imagefolder --data-path /data/imagenet/train --image-size 256 \
    --num-images 10000 --output VIRTUAL_imagenet256.npz
python -m evaluations.make_reference --data-kind coco --data-path coco/val2014 --output coco256_val2014.npz

MS-COCO (Table 1): the captioned validation images of the annotation file (--captions, default the standard
layout's annotations/captions_val2014.json; all 40,504 for val2014), in image id order, ADM center crop 256.
"""
import argparse
import os

import numpy as np
from tqdm import tqdm
from PIL import Image

from evaluations.batch_npz import as_rgb_images, write_npz_atomic
from evaluations.evaluator import inference_device, load_inception
from evaluations.metrics import feature_statistics
from foundation.flag_types import check_at_least
from foundation.usage_error import UsageError
from imagedata import kind_name
from imagedata.center_crop import center_crop_arr
from imagedata.coco import coco_image_dataset
from imagedata.fashion_mnist import fashion_mnist_files, read_idx
from imagedata.image_folder import list_images, load_rgb
from launch.cli import check_writable, make_output_dir, run_command


def load_reference_images(data_kind, data_path, image_size, num_images, seed, split="train", captions=None):
    """uint8 (N, H, W, 3) reference images; a seeded random subset when num_images is smaller than the dataset."""
    rng = np.random.default_rng(seed)
    if data_kind == "fashion-mnist":
        split = "test" if split == "t10k" else split  # the IDX files name the test split t10k
        path = data_path if os.path.isfile(data_path) else fashion_mnist_files(data_path, split)[0]
        images = read_idx(path)  # (N, 28, 28) uint8
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"Fashion-MNIST images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}")
        if num_images and num_images < len(images):
            images = images[np.sort(rng.choice(len(images), num_images, replace=False))]
        if image_size and image_size != images.shape[1]:
            images = np.stack([np.array(Image.fromarray(x).resize((image_size,) * 2, Image.BICUBIC)) for x in images])
        return as_rgb_images(images, data_path)  # grayscale repeated to 3 channels for Inception
    # imagefolder, flat: every image under data_path, ADM's center crop; coco: its captioned images
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"image folder {data_path} does not exist")
    if data_kind == "coco":
        files = coco_image_dataset(data_path, captions, image_size, flip=False).paths
    else:
        files = list_images(data_path)
    if not files:
        raise ValueError(f"no images found under {data_path}")
    if num_images and num_images < len(files):
        files = [files[i] for i in np.sort(rng.choice(len(files), num_images, replace=False))]
    return np.stack([center_crop_arr(load_rgb(f), image_size) for f in tqdm(files, desc="Loading images")])


def main(args):
    """Write the reference npz, with Inception statistics unless --no-statistics."""
    check_at_least(args, 1, "image_size", "num_images", "batch_size")
    image_size = args.image_size or (None if args.data_kind == "fashion-mnist" else 256)
    check_writable(args.output, "--output")
    inception = None if args.no_statistics else load_inception(args.inception_weights, inference_device(args.device))
    try:
        images = load_reference_images(args.data_kind, args.data_path, image_size, args.num_images, args.seed,
                                       args.split, captions=args.captions)
    except (OSError, ValueError) as error:  # a missing folder or split file, no images, unreadable captions
        raise UsageError(f"--data-path: {' '.join(str(error).split())}") from None
    arrays = {"arr_0": images}
    if inception is not None:
        features = inception.extract(images, args.batch_size, desc="Reference features")
        arrays["mu"], arrays["sigma"] = feature_statistics(features["pool_3"])
        arrays["mu_s"], arrays["sigma_s"] = feature_statistics(features["spatial"])
    make_output_dir(os.path.dirname(os.path.abspath(args.output)), "--output")
    write_npz_atomic(args.output, **arrays)
    print(f"Saved {images.shape} reference batch to {args.output}")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-kind", "--dataset", dest="data_kind", type=kind_name,
                        choices=["imagefolder", "flat", "fashion-mnist", "coco"], required=True,
                        help="how --data-path is laid out, as train.py's --data-kind (imagefolder and flat: every "
                             "image under it); --dataset imagenet / ffhq / folder still work")
    parser.add_argument("--data-path", type=str, required=True,
                        help="image folder, or Fashion-MNIST folder / IDX file (e.g. /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--output", type=str, required=True)
    parser.add_argument("--captions", type=str, default=None,
                        help="coco: captions_val2014.json (default <data-path>/../annotations/captions_<split>.json)")
    parser.add_argument("--image-size", type=int, default=None, help="default 256 (folders), native 28 (fashion-mnist)")
    parser.add_argument("--num-images", type=int, default=None, help="random subset size (default: all)")
    parser.add_argument("--split", type=str, choices=["train", "test", "t10k"], default="train",
                        help="Fashion-MNIST split (t10k = test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-statistics", action="store_true", help="write arr_0 only (no Inception weights needed)")
    parser.add_argument("--inception-weights", type=str, default=None)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
