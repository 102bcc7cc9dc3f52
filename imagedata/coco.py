"""MS-COCO captions in the standard layout, and the per-step choice of one caption per image (paper Sec. 5.1).

    <root>/train2014/COCO_train2014_000000000009.jpg ...     (or train2017/000000000009.jpg ...)
    <root>/val2014/...
    <root>/annotations/captions_train2014.json               {"images": [{"id", "file_name"}, ...],
    <root>/annotations/captions_val2014.json                  "annotations": [{"id", "image_id", "caption"}, ...]}

The paper trains on the 82,783 train2014 images and evaluates against val2014, each image with about 5
captions. A COCO image dataset yields (image, image id): the label slot carries the image id, and the
training step draws which of that image's captions it uses (draw_captions), so precomputed latents stay
one pair per image and the caption choice, like t and the noise, is a pure function of (seed, step).
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .image_folder import ImageFileDataset

LABEL_KIND = "coco_image_id"  # the label slot of a COCO dataset (and of its latents) holds the image id
CAPTION_STREAM = 1  # the per-step caption draw's stream; step_generator's (seed, step) has none


@dataclass(frozen=True)
class CocoCaptions:
    """One annotation file: image ids with at least one caption (sorted), their files and captions."""
    path: str
    image_ids: list  # sorted ints
    file_names: dict  # image id -> file name inside the split's image folder
    captions: dict  # image id -> list of captions, in annotation id order

    def __len__(self):
        return len(self.image_ids)

    @property
    def num_captions(self):
        return sum(len(c) for c in self.captions.values())


def default_annotation_path(image_dir):
    """<root>/annotations/captions_<split>.json for an image folder <root>/<split> (the standard layout)."""
    image_dir = os.path.normpath(image_dir)
    return os.path.join(os.path.dirname(image_dir), "annotations", f"captions_{os.path.basename(image_dir)}.json")


def read_coco_captions(path):
    """Parse a captions_*.json file; one clear error for a missing, corrupt or inconsistent file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO caption annotations not found: {path} (expected the standard layout "
                                f"<root>/annotations/captions_train2014.json)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt COCO annotation file {path}: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{path} is not a COCO captions file: it needs 'images' and 'annotations' lists")
    try:
        file_names = {int(image["id"]): str(image["file_name"]) for image in data["images"]}
        annotations = sorted((int(a["id"]), int(a["image_id"]), a["caption"]) for a in data["annotations"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed image or annotation entry ({err!r}); COCO needs images "
                         f"{{id, file_name}} and annotations {{id, image_id, caption}}") from err
    captions = {}
    for annotation_id, image_id, caption in annotations:
        if image_id not in file_names:
            raise ValueError(f"{path}: annotation {annotation_id} refers to image {image_id}, which is not in 'images'")
        if not isinstance(caption, str):
            raise ValueError(f"{path}: annotation {annotation_id} has a caption that is not a string: {caption!r}")
        captions.setdefault(image_id, []).append(caption.strip())
    if not captions:
        raise ValueError(f"{path} holds no captions")
    image_ids = sorted(captions)
    return CocoCaptions(path=path, image_ids=image_ids, file_names={i: file_names[i] for i in image_ids},
                        captions=captions)


def coco_image_dataset(image_dir, annotation_path=None, image_size=256, flip=True, seed=0):
    """COCO images that have captions -> ImageFileDataset yielding (x (3, S, S), image id); ADM center crop."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"COCO image folder does not exist: {image_dir}")
    coco = read_coco_captions(annotation_path or default_annotation_path(image_dir))
    paths = [os.path.join(image_dir, coco.file_names[i]) for i in coco.image_ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {coco.path} are not in {image_dir}, first: "
                                f"{missing[0]} (images and annotations of different splits?)")
    return ImageFileDataset(paths, coco.image_ids, image_size, num_classes=1, flip=flip, seed=seed,
                            label_kind=LABEL_KIND)


#################################################################################
#                         One caption per sample and step                       #
#################################################################################

def caption_uniforms(global_seed, step, global_batch_size):
    """(G,) uniforms in [0, 1) choosing the captions of a whole global batch; a CPU stream of (seed, step).

    A stream of its own (not train.py's device step_generator) so that the choice needs no device
    sync, is the same on any device, and leaves t, noise and label drops exactly as for class models.
    """
    seed = int(np.random.SeedSequence([global_seed, step, CAPTION_STREAM]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.rand(global_batch_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def draw_captions(coco, image_ids, uniforms):
    """Caption floor(u * n) of each image's n captions (uniform over them); image_ids and uniforms are (B,)."""
    image_ids = [int(i) for i in image_ids]
    if len(image_ids) != len(uniforms):
        raise ValueError(f"{len(image_ids)} image ids but {len(uniforms)} uniforms")
    unknown = [i for i in image_ids if i not in coco.captions]
    if unknown:
        raise KeyError(f"image id {unknown[0]} has no caption in {coco.path}")
    picked = []
    for image_id, u in zip(image_ids, uniforms.tolist()):
        options = coco.captions[image_id]
        picked.append(options[min(int(u * len(options)), len(options) - 1)])
    return picked


def check_captions_cover(coco, image_ids, source):
    """Every image id of the training data must have captions in the annotation file; name the first that does not."""
    missing = sorted(set(int(i) for i in image_ids) - set(coco.captions))
    if missing:
        raise ValueError(f"{len(missing)} image(s) of {source} have no caption in {coco.path}, first image id "
                         f"{missing[0]} (latents and annotations of different splits?)")
