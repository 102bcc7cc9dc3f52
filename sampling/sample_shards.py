"""sample_ddp.py's files: shards of samples written as they finish, and the evaluator's .npz joined from them.

shard_<start>_<stop>.npz holds samples [start, stop) ("images" uint8 NHWC, "labels", text models' "captions");
<shard dir>/config.json records what they were sampled with. The joined .npz is byte for byte a function of
the samples (fixed zip timestamps), whatever the number of processes or shards that produced them. The folder is
<sample dir>/<run_name>.shards; config.json holds sampling_config, the settings that decide the samples' values.
"""
import json
import os
import re
import zipfile

import numpy as np

from foundation.atomic_file import atomic_write
from foundation.settings_diff import describe_differences
from foundation.usage_error import UsageError

SHARD_NAME = re.compile(r"^shard_(\d{6,})_(\d{6,})\.npz$")  # shard_<start>_<stop>.npz


#################################################################################
#               What names a shard folder and what its samples depend on        #
#################################################################################

def short_name(path_or_name):
    """The last path component without extension: 'results/.../0400000.pt' -> '0400000'."""
    return os.path.splitext(os.path.basename(os.path.normpath(path_or_name)))[0]


def checkpoint_paths(args):
    """--ckpt as a list (several = multi-experts)."""
    return [args.ckpt] if isinstance(args.ckpt, str) else list(args.ckpt)


def checkpoint_record(args):
    """What config.json stores: one absolute path, or [[path, expert range or None], ...] for multi-experts."""
    paths = [os.path.abspath(p) for p in checkpoint_paths(args)]
    ranges = getattr(args, "expert_range", None)
    if len(paths) == 1 and ranges is None:
        return paths[0]  # one checkpoint: a plain path, as shard folders of one model have always stored it
    return [[p, list(r) if r is not None else None] for p, r in zip(paths, ranges or [None] * len(paths))]


def run_name(args, settings, cfg_scale):
    """As official DiT (model-ckpt-size-vae-cfg-seed) plus sampler/steps and every non-default setting."""
    checkpoints = "+".join(short_name(p) for p in checkpoint_paths(args))  # experts joined by '+'
    name = (f"{settings.model_name.replace('/', '-')}-{checkpoints}-size-{settings.image_size}"
            f"-vae-{short_name(settings.vae).replace('sd-vae-ft-', '')}-cfg-{cfg_scale}-seed-{args.global_seed}"
            f"-{args.sampler}{args.num_sampling_steps}")
    if args.num_fid_samples != 50_000:
        name += f"-n{args.num_fid_samples}"
    if args.use_model_weights:
        name += "-model-weights"
    if cfg_scale != 1.0 and args.guide_channels != "all":
        name += f"-guide{args.guide_channels}"
    if args.balanced_classes:
        name += "-balanced"
    if args.mixed_precision != "no":
        name += f"-{args.mixed_precision}"
    return name


def sampling_config(args, settings, cfg_scale):
    """Everything that decides the samples' values; shards of another configuration must not be mixed in."""
    text = {} if settings.text_encoder is None else {"captions": os.path.abspath(args.captions),
                                                     "text_encoder": settings.text_encoder}
    return {**text,
        "ckpt": checkpoint_record(args), "weights": settings.weights, "model": settings.model_name,
        "image_size": settings.image_size, "vae": settings.vae, "sampler": args.sampler,
        "num_sampling_steps": args.num_sampling_steps, "cfg_scale": cfg_scale,
        "guide_channels": args.guide_channels if cfg_scale != 1.0 else "all",
        "global_seed": args.global_seed, "num_fid_samples": args.num_fid_samples,
        "balanced_classes": args.balanced_classes,
        "mixed_precision": args.mixed_precision,
        # compiled kernels round differently: recorded, so shards of both kinds are not mixed (absent = eager,
        # as in folders written before the flag existed)
        **({"compile": True} if getattr(args, "compile", False) else {}),
    }


#################################################################################
#                                Shards on disk                                 #
#################################################################################

def check_shard_dir(shard_dir, config):
    """Raise if shard_dir was started with another configuration (nothing in it is touched)."""
    path = os.path.join(shard_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        stored = json.load(f)
    differ = describe_differences(stored, config, "the folder's", "now")
    if differ:
        raise UsageError(f"{shard_dir} holds shards of another configuration ({differ}); "
                         "use another --sample-dir or restore the original settings (no shard was deleted)")


def shard_path(shard_dir, start, stop):
    """The shard of sample indices [start, stop)."""
    return os.path.join(shard_dir, f"shard_{start:06d}_{stop:06d}.npz")


def finished_shards(shard_dir):
    """Sorted (start, stop) of the shards on disk (atomic writes: a file with a shard's name is whole)."""
    if not os.path.isdir(shard_dir):
        return []
    return sorted((int(m.group(1)), int(m.group(2))) for m in map(SHARD_NAME.match, os.listdir(shard_dir)) if m)


def write_npz(f, arrays, chunks=None):
    """An .npz byte for byte determined by its arrays (fixed zip timestamps); arrays may be streamed.

    arrays: {name: array}; chunks: {name: (dtype, shape, iterable of C-ordered pieces)} for arrays
    too large to hold in memory (the 50K-image arr_0).
    """
    entries = [(name, a.dtype, a.shape, [a]) for name, a in arrays.items()]
    entries += [(name, dtype, shape, pieces) for name, (dtype, shape, pieces) in (chunks or {}).items()]
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, dtype, shape, pieces in sorted(entries, key=lambda e: e[0]):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as entry:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": tuple(shape)}
                np.lib.format.write_array_header_1_0(entry, header)
                for piece in pieces:
                    entry.write(np.ascontiguousarray(piece, dtype=dtype).tobytes())


def read_shard(path, start, stop):
    """(images, labels, captions or None) of a finished shard, checked against the sample indices it must hold."""
    with np.load(path) as shard:
        images, labels = shard["images"], shard["labels"]
        captions = shard["captions"].tolist() if "captions" in shard.files else None
    if len(images) != stop - start or len(labels) != stop - start:
        raise UsageError(f"{path} holds {len(images)} samples, expected {stop - start} (indices {start}..{stop - 1})")
    return images, labels, captions


def rgb(images):
    """(N, H, W, 1) grayscale -> (N, H, W, 3): the ADM evaluator expects RGB."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def save_pngs(shard_dir, start, images):
    """Optional per-sample PNGs <index:06d>.png, as official DiT writes them."""
    from PIL import Image
    png_dir = os.path.join(shard_dir, "png")
    os.makedirs(png_dir, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            os.path.join(png_dir, f"{start + i:06d}.png"))


def write_samples(shard_dir, bounds, out):
    """Join the shards, in index order and one at a time, into <out>: arr_0 uint8 NHWC RGB, arr_1 labels.

    Shards with captions (text-to-image) also give <out minus .npz>.captions.json, written first.
    """
    for (_, stop), (start, _) in zip(bounds, bounds[1:]):
        if stop != start:  # two runs wrote into one folder at once
            raise UsageError(f"shards in {shard_dir} overlap or leave a gap at sample {min(stop, start)}; "
                             "remove the overlapping ones and re-run")
    first = read_shard(shard_path(shard_dir, *bounds[0]), *bounds[0])[0]
    n = bounds[-1][1]
    shape = (n,) + rgb(first[:1]).shape[1:]  # (N, H, W, 3)
    records = [read_shard(shard_path(shard_dir, *b), *b)[1:] for b in bounds]
    labels = np.concatenate([labels for labels, _ in records])
    if records[0][1] is not None:
        captions = [c for _, shard_captions in records for c in shard_captions]
        listing = [{"index": i, "image_id": int(image_id), "caption": caption}
                   for i, (image_id, caption) in enumerate(zip(labels.tolist(), captions))]
        atomic_write(out[:-len(".npz")] + ".captions.json",
                     lambda f: f.write(json.dumps(listing, indent=0, ensure_ascii=False).encode()))
    pieces = (rgb(read_shard(shard_path(shard_dir, *b), *b)[0]) for b in bounds)
    atomic_write(out, lambda f: write_npz(f, {"arr_1": labels.astype(np.int64)},
                                          chunks={"arr_0": (np.uint8, shape, pieces)}))
    return out
