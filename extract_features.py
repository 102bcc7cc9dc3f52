"""Encode an image dataset into VAE latents (image and its horizontal flip) stored as mmap-able shards.

Latent models train on precomputed SD-VAE latents (App. C: Stable Diffusion's VAE; 256x256x3 -> 32x32x4, scale 0.18215).
Each image is stored with the latent of its mirror image so that the paper's random horizontal flip
survives precomputation; imagedata.LatentFeatureDataset picks one of the two per sample and epoch.
By default (--latent-stat posterior) the VAE posterior's mean AND standard deviation are stored, times
the scale, so that training draws a fresh latent mean + std * eps every step from that step's seeded
generator, as official DiT and the DTR release draw latent_dist.sample() every step. Disk: two float32
(C, h, w) arrays per image and flip, 2 * 2 * 4 * 32 * 32 * 4 B = 64 KiB per 256px image (78 GiB for
ImageNet's 1.28M). --latent-stat mean stores the means only (32 KiB per image; deterministic latents,
a deviation from the release). Shards are float32 (n, 2, C, h, w); see imagedata/latents.py.

Single process:  python extract_features.py --data-path /data/imagenet/train --features-path features
MS-COCO:         python extract_features.py --data-kind coco --data-path coco/train2014 --features-path features/coco256
                 (captions from coco/annotations/captions_train2014.json, or --captions; labels are image ids)
Many GPUs:       torchrun --nproc_per_node=8 extract_features.py --data-path ... --features-path ...
Shard k is encoded by rank k % world_size; finished shards are skipped on re-run (resume).
"""
import argparse
import math
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from foundation.flag_types import check_at_least
from foundation.usage_error import UsageError
from imagedata import BadImageError, ImageFileDataset, build_dataset
from imagedata.latents import ShardCollector, read_shard_record, shard_is_finished, shard_range, write_manifest
from launch.cli import check_on_every_rank, make_output_dir, run_command
from launch.process_group import add_launch_arguments, default_num_workers, describe_distributed, setup_distributed
from models.vae import LATENT_SCALE, encode_with_flip, load_vae, vae_name


#################################################################################
#                                  Helpers                                      #
#################################################################################

class FlaggedImages(Dataset):
    """Unflipped images with a readable flag, so one bad file is reported instead of killing the loader."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        try:
            x, y = self.images.load(index)
            return x, y, index, True
        except BadImageError:
            size = self.images.image_size
            return torch.zeros(3, size, size), torch.tensor(-1), index, False


#################################################################################
#                                  Main                                         #
#################################################################################

def main(args):
    """Encode every image of --data-path and its flip; write this rank's shards, then rank 0 the manifest."""
    torch.manual_seed(args.global_seed)  # outputs are posterior moments, so they do not depend on it
    check_at_least(args, 1, "shard_size", "batch_size", "image_size")
    check_at_least(args, 0, "num_workers")
    rank, world_size, device = setup_distributed(args.device, args.dist_timeout)
    if rank == 0:
        print(describe_distributed(world_size, device))
    try:
        images = build_dataset(data_path=args.data_path, image_size=args.image_size, kind=args.data_kind, flip=False,
                               captions=getattr(args, "captions", None))
    except (OSError, ValueError) as error:  # a missing or empty folder, no images, unreadable captions
        raise UsageError(f"--data-path: {error}") from None
    if not isinstance(images, ImageFileDataset):
        raise UsageError(f"extract_features.py encodes RGB image folders (kind imagefolder, flat or coco); "
                         f"{args.data_path} is a {type(images).__name__}")
    # The VAE before anything is written: offline without its weights is a one-line error, not an empty folder
    vae = check_on_every_rank(load_vae, args.vae, device)
    down = 2 ** (len(vae.config.block_out_channels) - 1)  # the encoder halves the size at each extra level
    if args.image_size % down:
        raise UsageError(f"--image-size {args.image_size} is not divisible by the VAE's downsampling factor {down}")
    latent_shape = [vae.config.latent_channels, args.image_size // down, args.image_size // down]
    n = len(images)
    num_shards = math.ceil(n / args.shard_size)
    vae_path = vae_name(args.vae)
    run_config = {"vae": vae_path, "image_size": args.image_size, "shard_size": args.shard_size, "num_images": n,
                  "data_path": os.path.abspath(args.data_path), "latent_stat": args.latent_stat}

    # Resume: skip finished shards, but only if they came from the same run configuration.
    def unfinished_shards():
        mine = []
        for k in range(rank, num_shards, world_size):
            # the record comes last (after the stds too), and names the run's latent_stat in its config
            if not shard_is_finished(args.features_path, k):
                mine.append(k)
            elif read_shard_record(args.features_path, k).get("config") != run_config:
                raise UsageError(f"shard {k} in {args.features_path} was written with a different configuration; "
                                 f"use a fresh --features-path")
        return mine
    mine = check_on_every_rank(unfinished_shards)  # every rank stops if any rank's shards do not match
    done = len(range(rank, num_shards, world_size)) - len(mine)
    check_on_every_rank(make_output_dir, args.features_path, "--features-path")
    if rank == 0:
        print(f"{n} images -> {num_shards} shards over {world_size} rank(s); rank 0 resumes past {done} finished")

    indices = [i for k in mine for i in range(*shard_range(k, args.shard_size, n))]
    loader = DataLoader(Subset(FlaggedImages(images), indices), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")

    shards = ShardCollector(args.features_path, args.shard_size, n, latent_shape, {"rank": rank, "config": run_config},
                            with_stds=args.latent_stat == "posterior", skip_bad_images=args.skip_bad_images)
    for x, y, idx, ok in tqdm(loader, disable=rank != 0, desc="encoding"):
        if ok.any():
            means, stds = (z.float().cpu() for z in encode_with_flip(vae, x[ok].to(device), LATENT_SCALE))
            good = zip(means, stds)  # (2, C, h, w) each: the image and its flip
        for i, label, readable in zip(idx.tolist(), y.tolist(), ok.tolist()):
            shards.add(i, label, next(good) if readable else None, None if readable else images.paths[i])
    bad_paths = shards.bad_paths

    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, bad_paths)
        bad_paths = sorted(p for paths in gathered for p in paths)
    if bad_paths and not args.skip_bad_images:
        if rank == 0:
            listing = "\n".join(f"  {p}" for p in bad_paths)
            print(f"unreadable images ({len(bad_paths)}):\n{listing}")
        raise UsageError(f"{len(bad_paths)} unreadable image(s), first: {bad_paths[0]}; shards holding them were not "
                         f"written. Fix or remove them, or re-run with --skip-bad-images (finished shards are kept).")

    if world_size > 1:
        dist.barrier()  # every rank's shards are on disk before rank 0 gathers them
    if rank == 0:
        manifest = write_manifest(args.features_path, num_shards, vae=vae_path, latent_scale=LATENT_SCALE,
                                  latent_stat=args.latent_stat, latent_shape=latent_shape, image_size=args.image_size,
                                  num_classes=images.num_classes, class_names=images.class_names,
                                  shard_size=args.shard_size, num_images=n, data_path=os.path.abspath(args.data_path),
                                  flip_layout="[:, 0] image, [:, 1] horizontal flip", label_kind=images.label_kind)
        print(f"wrote {manifest['count']} latent pairs in {num_shards} shards to {args.features_path}"
              + (f"; skipped {len(manifest['skipped'])} unreadable image(s)" if manifest["skipped"] else ""))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", type=str, required=True)
    parser.add_argument("--features-path", "--feature-path", dest="features_path", type=str, default="features")
    parser.add_argument("--data-kind", "--kind", dest="data_kind", type=str, default="auto",
                        choices=["auto", "imagefolder", "flat", "coco"],
                        help="flat: every image under --data-path, label 0 (FFHQ); coco: MS-COCO images with "
                             "captions, label = image id")
    parser.add_argument("--captions", type=str, default=None,
                        help="COCO captions_*.json (kind coco; default <data-path>/../annotations/captions_<split>.json)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--vae", type=str, default="stabilityai/sd-vae-ft-ema", help="ema | mse | Hub name | local AutoencoderKL path")
    parser.add_argument("--latent-stat", type=str, choices=["posterior", "mean"], default="posterior",
                        help="posterior (default, as official DiT): store mean and std, training samples a latent "
                             "every step (64 KiB per 256px image); mean: the posterior mean only (32 KiB)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=default_num_workers(),
                        help="data-loader processes per rank; default: 4 (official DiT), or the CPUs available if fewer")
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--skip-bad-images", action="store_true")
    add_launch_arguments(parser)
    parser.add_argument("--global-seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
