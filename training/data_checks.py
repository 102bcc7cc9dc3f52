"""The training data against train.py's flags: readable, large enough, the size and channels the model is built for."""
from tqdm import tqdm

from foundation.usage_error import UsageError
from imagedata import ImageFileDataset, build_dataset
from imagedata.image_folder import find_damaged_images
from launch.cli import check_on_every_rank
from models.vae import NO_VAE
from training.flags import is_text_model


def open_dataset(args, rank, world_size):
    """build_dataset for --data-path / --feature-path; data that cannot be read stops every rank before training.

    Image files are checked up front (size, header, end marker; see imagedata.image_folder.image_file_problem),
    each rank a share of them, so a file that was bad from the start never crashes a run hours in at its batch.
    """
    try:
        dataset = build_dataset(data_path=args.data_path, feature_path=args.feature_path, image_size=args.image_size,
                                kind=args.data_kind, flip=True, seed=args.global_seed, captions=args.captions)
    except (OSError, ValueError) as error:  # no dataset kind recognised, an empty class folder, a bad manifest
        flag = "--feature-path" if args.feature_path is not None else "--data-path"
        raise UsageError(f"{flag}: {error}") from None

    def check_images():
        if not isinstance(dataset, ImageFileDataset):
            return
        paths = dataset.paths[rank::world_size]
        damaged = find_damaged_images(tqdm(paths, desc="checking images", disable=rank != 0 or len(paths) < 10_000))
        if damaged:
            listed = "; ".join(f"{path} ({reason})" for path, reason in damaged[:3])
            raise UsageError(f"--data-path holds {'at least ' if world_size > 1 else ''}{len(damaged)} unreadable "
                             f"image(s): {listed}{'; ...' if len(damaged) > 3 else ''}. Remove or replace them")
    check_on_every_rank(check_images)
    return dataset


def check_data_fits_model(args, dataset):
    """(input_size, in_channels): the model input implied by the data, or a clear error if they disagree."""
    if len(dataset) < args.global_batch_size:
        raise UsageError(f"dataset has {len(dataset)} samples, fewer than --global-batch-size "
                         f"{args.global_batch_size}: not a single step per epoch")
    if dataset.num_classes > args.num_classes:
        raise UsageError(f"dataset has {dataset.num_classes} classes but --num-classes is {args.num_classes}")
    channels, resolution = dataset.channels, dataset.resolution
    if args.feature_path is not None:
        if dataset.image_size != args.image_size:
            raise UsageError(f"latents in {args.feature_path} were extracted from {dataset.image_size}px images "
                             f"but --image-size is {args.image_size}")
        return resolution, channels
    if args.vae != NO_VAE:
        raise UsageError("encoding images with a VAE on the fly is not supported: precompute latents with "
                         "extract_features.py and pass --feature-path, or train in pixel space with --vae none")
    if resolution != args.image_size:
        raise UsageError(f"dataset yields {resolution}x{resolution} images but --image-size is {args.image_size}")
    return resolution, channels


def unused_classes_warning(args, dataset):
    """A warning line when --num-classes exceeds the data's classes (legal, e.g. a config's 1000 on a small
    folder: the extra label embeddings never train and samples of those classes are noise), else None."""
    if is_text_model(args.model) or dataset.num_classes >= args.num_classes:
        return None
    return (f"Warning: --num-classes {args.num_classes} but the data ({args.data_path or args.feature_path}) has "
            f"{dataset.num_classes} classes; classes {dataset.num_classes}..{args.num_classes - 1} never train")
