"""Sample N images (50K for FID) over torchrun processes into one .npz for the ADM evaluator (App. C: 50K samples).

    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py --ckpt results/000-DiT-L-2/checkpoints/0400000.pt
    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py --ckpt results/001-TextDiT-B-2/checkpoints/0400000.pt \
        --captions coco/annotations/captions_val2014.json      # text-to-image: N captions drawn from the file

Differences from official DiT's sample_ddp.py, on purpose:
  * sample i's label and noise (start and every step) come from generators seeded by (--global-seed, i),
    so the output does not depend on the number of processes: bitwise identical across world sizes with
    the same --per-proc-batch-size, identical up to float rounding across batch sizes;
  * exactly --num-fid-samples images are written (no overshoot to trim);
  * the missing samples are cut into batches on a fixed grid and split so that ranks differ by at most
    one batch (sampling/work_split.py): nobody idles at the final barrier for a whole shard, a wait that
    outlasts NCCL's timeout at paper scale; each rank saves its batches as shards of up to --shard-size
    samples (shard_<start>_<stop>.npz, written atomically); re-running the same command after a
    pre-emption, on any number of processes, samples only what is missing: the byte-identical .npz;
  * <shard dir>/config.json records what the shards were sampled with; a directory holding shards of
    another configuration is an error, and no finished shard is ever deleted.
Output: <sample-dir>/<run-name>.npz with arr_0 = uint8 (N, H, W, 3) and arr_1 = int64 labels; its path
is the last line printed. Text-to-image models: sample i's caption is drawn uniformly from every (image, caption)
pair of --captions with a generator seeded by (--global-seed, i) (sampling.seeded.validation_captions); arr_1
holds the caption's COCO image id and <run-name>.captions.json beside the .npz lists
[{"index", "image_id", "caption"}] for every sample.
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from foundation.atomic_file import atomic_write
from foundation.flag_types import check_at_least, finite_float
from foundation.usage_error import UsageError
from launch.cli import check_on_every_rank, make_output_dir, run_command
from launch.process_group import add_launch_arguments, describe_distributed, setup_distributed
from sampling.checkpoint_flags import add_checkpoint_arguments
from sampling.sample_shards import (check_shard_dir, checkpoint_paths, finished_shards, run_name, sampling_config,
                                    save_pngs, shard_path, write_npz, write_samples)
from sampling.seeded import (FID_CFG_SCALE, SAMPLERS, check_sampling_flags, class_labels, generate, load_for_sampling,
                             load_text_conditioning, model_function, parse_guide_channels, to_uint8,
                             validation_captions)
from sampling.work_split import missing_intervals, rank_shards
from storage.pretrained import use_pretrained
from storage.run_folder import remove_stale_temp_files

#################################################################################
#                                  Sampling                                     #
#################################################################################

@torch.no_grad()  # sampling only; a decorator, so callers' grad mode is left as it was
def main(args):
    """Sample the shards this process owns, then (rank 0) join all shards into one .npz."""
    check_at_least(args, 1, "num_fid_samples", "shard_size", "per_proc_batch_size", "max_shards")
    check_sampling_flags(args)
    rank, world_size, device = setup_distributed(args.device, args.dist_timeout)
    distributed = dist.is_initialized()  # under torchrun; a plain process runs alone
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32  # official DiT: True, fast, tiny differences
        torch.backends.cudnn.allow_tf32 = args.tf32

    use_pretrained(args)  # released weights by name: fetched once (ranks take turns on the cache folder)
    model, settings, cfg_scale, diffusion, vae = load_for_sampling(args, device, default_cfg_scale=FID_CFG_SCALE)
    conditioning = None
    if settings.text_encoder is not None:  # text-to-image: captions from the validation annotations
        if args.captions is None:
            raise UsageError(f"{' '.join(checkpoint_paths(args))} is a text-to-image model: give --captions (e.g. "
                             f"coco/annotations/captions_val2014.json), the captions to draw the samples' prompts from")
        conditioning = load_text_conditioning(settings, model, device, args.captions)
    elif args.captions is not None:
        raise UsageError(f"--captions needs a text-to-image checkpoint; {' '.join(checkpoint_paths(args))} is not one")

    # one model function for every batch, so --compile compiles it once (a last, smaller batch adds one more)
    model_fn = model_function(model, cfg_scale, args.guide_channels, args.mixed_precision, compile=args.compile)
    name = run_name(args, settings, cfg_scale)
    shard_dir = os.path.join(args.sample_dir, f"{name}.shards")
    config = sampling_config(args, settings, cfg_scale)
    check_shard_dir(shard_dir, config)  # every rank checks, so every rank stops on a mismatch
    check_on_every_rank(lambda: make_output_dir(shard_dir, "--sample-dir") if rank == 0 else None)
    if rank == 0:
        for path in remove_stale_temp_files(shard_dir):  # before any rank writes: none of them is live
            print(f"removed {path}, left by a shard write that was killed")
        if not os.path.exists(os.path.join(shard_dir, "config.json")):
            atomic_write(os.path.join(shard_dir, "config.json"),
                         lambda f: f.write(json.dumps(config, indent=2, sort_keys=True).encode()))
    if distributed:
        dist.barrier()

    # Every rank lists the same finished shards (rank 0 writes nothing until the barrier below), so all
    # compute the same split of the missing samples: floor or ceil(batches / world size) batches each.
    n = args.num_fid_samples
    finished = finished_shards(shard_dir)
    todo = rank_shards(n, finished, args.per_proc_batch_size, args.shard_size, world_size, rank)
    if args.max_shards is not None:
        todo = todo[: args.max_shards]
    if rank == 0:
        print(describe_distributed(world_size, device))
        print(f"{name}: {sum(b - a for a, b in finished)}/{n} samples already finished, {world_size} process(es), "
              f"{args.per_proc_batch_size} samples per batch, shards of up to {args.shard_size}")
    if distributed:
        dist.barrier()  # nobody writes a shard before every rank has listed the finished ones
    bar = tqdm(total=sum(stop - start for shard in todo for start, stop in shard), disable=rank != 0,
               desc="samples")
    for batches in todo:
        images, labels, captions = [], [], []
        for first, stop in batches:
            indices = list(range(first, stop))
            if conditioning is None:
                y = condition = class_labels(indices, model.num_classes, args.global_seed, args.balanced_classes)
            else:
                picks = validation_captions(indices, conditioning.coco, args.global_seed)
                captions += [p["caption"] for p in picks]
                condition = conditioning.encode([p["caption"] for p in picks])
                y = torch.tensor([p["image_id"] for p in picks], dtype=torch.long)
            samples = generate(model, diffusion, args.sampler, indices, condition, args.global_seed, cfg_scale,
                               args.guide_channels, args.mixed_precision, clip_denoised=vae is None,
                               model_fn=model_fn)
            images.append(to_uint8(samples, vae, settings.latent_scale))  # (B, H, W, C)
            labels.append(y.numpy())
            bar.update(len(indices))
        shard = {"images": np.concatenate(images), "labels": np.concatenate(labels)}
        if conditioning is not None:
            shard["captions"] = np.array(captions, dtype=str)  # fixed-width unicode: np.load needs no pickle
        start, stop = batches[0][0], batches[-1][1]
        atomic_write(shard_path(shard_dir, start, stop), lambda f: write_npz(f, shard))
        if args.save_png:
            save_pngs(shard_dir, start, shard["images"])
    bar.close()
    if distributed:
        dist.barrier()

    if rank == 0:
        finished = finished_shards(shard_dir)
        done = sum(stop - start for start, stop in finished)
        if missing_intervals(n, finished):
            print(f"stopped with {done}/{n} samples finished (--max-shards); re-run the same command to continue")
        else:
            out = write_samples(shard_dir, finished, os.path.join(args.sample_dir, f"{name}.npz"))
            print(out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_arguments(parser)
    parser.add_argument("--sample-dir", type=str, default="samples")
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--sampler", type=str, choices=SAMPLERS, default="ddpm",
                        help="ddpm: the paper's protocol; dpm-solver++ (2M) tracks FID at 20-25 steps")
    parser.add_argument("--num-sampling-steps", type=int, default=250)
    parser.add_argument("--cfg-scale", type=finite_float, default=None,
                        help=f"default {FID_CFG_SCALE} for conditional models (the paper's FID setting), "
                             "1 for unconditional")
    parser.add_argument("--guide-channels", type=parse_guide_channels, default="all",
                        help="'all' latent channels, or 3 for official DiT's legacy 3-channel guidance")
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--captions", type=str, default=None,
                        help="text-to-image models: COCO captions_val2014.json; sample i's caption is drawn from it")
    parser.add_argument("--balanced-classes", action="store_true",
                        help="label i = i mod num_classes (N / num_classes per class) instead of uniform at random")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="samples per saved shard (the resume unit), in whole batches: at least one batch")
    parser.add_argument("--max-shards", type=int, default=None,
                        help="stop after this many shards per process (time-limited jobs); re-run to continue")
    parser.add_argument("--mixed-precision", type=str, choices=["no", "bf16"], default="no",
                        help="bf16: the model runs under bf16 autocast, the sampler's math stays fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the model call of a sampling step (CFG's doubled batch included)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 matmuls on GPU (official DiT: on)")
    parser.add_argument("--save-png", action="store_true", help="also write <index>.png per sample")
    add_launch_arguments(parser)
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
