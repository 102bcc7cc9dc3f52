"""Offline test fixture: a generated MS-COCO-style captioned folder (<root>/<split>/*.jpg, annotations/captions_<split>.json)."""
import json
import os

import numpy as np
from PIL import Image

WORDS = ("a red bus", "two dogs", "a cat", "a plate of food", "a man on a horse", "a green field", "a kite")


def write_tiny_coco(root, split="train2014", num_images=6, captions_per_image=(5, 4, 6), seed=0, size=(20, 14)):
    """Random images with COCO file names and a captions file in COCO's format; returns (image dir, annotation path).

    Image ids are sparse and unordered in the file, as in COCO; image k gets captions_per_image[k % len] captions.
    """
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, annotations = [], []
    ids = rng.permutation(np.arange(1, 10 * num_images))[:num_images].tolist()
    for k, image_id in enumerate(ids):
        name = f"COCO_{split}_{image_id:012d}.jpg"
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(image_dir, name), quality=95)
        images.append({"id": image_id, "file_name": name, "height": size[1], "width": size[0]})
        for j in range(captions_per_image[k % len(captions_per_image)]):
            annotations.append({"id": 1000 * image_id + j, "image_id": image_id,
                                "caption": f"{WORDS[(k + j) % len(WORDS)]} number {image_id} {j} "})
    rng.shuffle(annotations)
    path = os.path.join(root, "annotations", f"captions_{split}.json")
    with open(path, "w") as f:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": annotations}, f)
    return image_dir, path
