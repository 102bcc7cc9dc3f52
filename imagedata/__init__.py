"""Datasets for DTR training: ImageNet-style class folders, flat folders (FFHQ), Fashion-MNIST, VAE latents.

    from imagedata import build_dataset
    ds = build_dataset(data_path=..., feature_path=None, image_size=256, kind="auto", flip=True, seed=0, split="train")
    x, y = ds[i]        # x float32 (C, H, W): images in [-1, 1] (3 ch; Fashion-MNIST 1 ch), latents already * 0.18215
                        # y int64 scalar; the default collate gives x (N, C, H, W), y (N,)
    ds.num_classes, ds.channels, ds.resolution   # latents: channels / resolution of the latent (4, 32 for 256 px)

Kinds: "imagefolder" (root/<class>/..., labels = index of sorted class folder names, ADM center crop),
"flat" (every image under root, recursive, label 0, num_classes 1: unconditional, e.g. FFHQ),
"fashion-mnist" (IDX files, optionally .gz, in data_path, data_path/raw or data_path/FashionMNIST/raw, e.g.
/usr/share/datasets/fashion-mnist; split "train" or "test"; 28 px zero-padded to 30/32, otherwise BICUBIC resized),
"latents" (feature_path written by extract_features.py; format in imagedata/latents.py),
"coco" (data_path = MS-COCO image folder such as train2014/, captions = its captions_*.json; y = image id,
the caption is drawn per training step by imagedata.coco.draw_captions).
"auto" picks latents if feature_path is given or data_path holds manifest.json, then Fashion-MNIST IDX files,
then flat if data_path holds images directly, else imagefolder. FFHQ's nested 00000/... layout needs kind="flat".

Reproducible flips, for exact resume (paper setting: random horizontal flip). Whether sample i is flipped
(images: mirrored; latents: the stored latent of the mirrored image) is a pure function of (seed, epoch, i),
see imagedata.flip.flip_decision; no global RNG is touched. In train.py:
    ds = build_dataset(..., flip=True, seed=args.global_seed)
    for epoch in range(start_epoch, ...):
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)          # BEFORE iterating the loader for this epoch
        for x, y in loader: ...
With a plain DataLoader use persistent_workers=False (the default): workers copy the dataset when the epoch's
iterator is created, so set_epoch must come before `iter(loader)`. train.py uses imagedata.epoch_loader.EpochLoader
instead, whose workers persist and are asked for (epoch, index). A resumed run calls ds.set_epoch(epoch) and skips the
sampler's first `position` indices; every remaining sample comes out identical. ds.is_flipped(i) tells
the current epoch's coin for sample i.
"""
from .build import KINDS, build_dataset, detect_kind, kind_name
from .center_crop import center_crop_arr
from .coco import CocoCaptions, coco_image_dataset, draw_captions, read_coco_captions
from .fashion_mnist import FashionMNISTDataset, read_idx
from .flip import flip_decision
from .image_folder import BadImageError, ImageFileDataset, flat_image_dataset, image_folder_dataset
from .latents import LatentFeatureDataset, read_manifest

__all__ = ["KINDS", "build_dataset", "detect_kind", "kind_name", "center_crop_arr", "CocoCaptions", "coco_image_dataset",
           "draw_captions", "read_coco_captions", "FashionMNISTDataset", "read_idx",
           "flip_decision", "BadImageError", "ImageFileDataset", "flat_image_dataset", "image_folder_dataset",
           "LatentFeatureDataset", "read_manifest"]
