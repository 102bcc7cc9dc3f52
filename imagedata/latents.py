"""Precomputed VAE latent shards written by extract_features.py, and the dataset that reads them.

Layout of a features directory (all shard files are plain .npy, opened with np.load(mmap_mode="r")):
    manifest.json                written by rank 0 once every shard exists; see write_manifest
    shard-00000.latents.npy      (n, 2, C, h, w) float32: [:, 0] VAE posterior mean of the image, [:, 1] of
                                 its hflip, already multiplied by latent_scale (0.18215 for the SD VAE)
    shard-00000.stds.npy         (n, 2, C, h, w) float32: the posterior standard deviations, scaled alike;
                                 only when latent_stat is "posterior" (the default of extract_features.py)
    shard-00000.labels.npy       (n,) int64 class labels
    shard-00000.json             per-shard record {shard, start, stop, count, skipped}; written last,
                                 so its presence marks the shard finished (resume skips it)
Shard k holds the images with dataset indices [k * shard_size, (k + 1) * shard_size) in order,
minus the unreadable ones listed in its "skipped" (only with --skip-bad-images).

latent_stat "posterior": a sample holds the moments (2, C, h, w) = [mean, std] and training draws each
step's latent z = mean + std * eps (sample_posterior), as official DiT's latent_dist.sample() per step.
latent_stat "mean": a sample is the mean (C, h, w) itself. Version 1 folders (before the posterior
was stored) are mean-only and read as such.
"""
import bisect
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from foundation.atomic_file import atomic_write, atomic_write_json

from .flip import SeededFlip

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "dtr-vae-latents"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: means only, no latent_stat / stds
LATENT_STATS = ("posterior", "mean")
MANIFEST_KEYS = ("format", "version", "vae", "latent_scale", "latent_shape", "dtype", "image_size",
                 "num_classes", "count", "shards")


def shard_stem(shard_index):
    """File name stem of shard k; names depend on the shard, not the rank, so any world size resumes."""
    return f"shard-{shard_index:05d}"


def sample_posterior(moments, noise):
    """z = mean + std * noise from moments (N, 2, C, h, w): the VAE posterior draw (Kingma & Welling 2014, Eq. 10)."""
    mean, std = moments.unbind(dim=1)  # (N, C, h, w) each
    return mean + std * noise


def shard_is_finished(features_path, shard_index, with_stds=False):
    """A shard is finished when its record and its arrays exist (the record is written last)."""
    stem = os.path.join(features_path, shard_stem(shard_index))
    arrays = (".latents.npy", ".labels.npy") + ((".stds.npy",) if with_stds else ())
    return all(os.path.isfile(stem + ext) for ext in (".json",) + arrays)


def write_shard(features_path, shard_index, latents, labels, record, stds=None):
    """Atomically write one shard: means (n, 2, C, h, w), stds alike (or None), labels (n,), then its record."""
    latents = np.ascontiguousarray(latents, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if latents.ndim != 5 or latents.shape[1] != 2 or len(latents) != len(labels):
        raise ValueError(f"shard {shard_index}: latents {latents.shape} / labels {labels.shape} do not match (n, 2, C, h, w) / (n,)")
    if stds is not None and np.shape(stds) != latents.shape:
        raise ValueError(f"shard {shard_index}: stds {np.shape(stds)} do not match latents {latents.shape}")
    stem = os.path.join(features_path, shard_stem(shard_index))
    atomic_write(stem + ".latents.npy", lambda f: np.save(f, latents))
    if stds is not None:
        atomic_write(stem + ".stds.npy", lambda f: np.save(f, np.ascontiguousarray(stds, dtype=np.float32)))
    atomic_write(stem + ".labels.npy", lambda f: np.save(f, labels))
    atomic_write_json(stem + ".json", dict(record, shard=shard_index, count=len(labels)))


def shard_range(k, shard_size, n):
    """Dataset indices [start, stop) held by shard k."""
    return k * shard_size, min((k + 1) * shard_size, n)


class ShardCollector:
    """extract_features.py's writer: encoded samples arrive in any order, grouped by shard; a shard is written
    (write_shard) as soon as every one of its indices has arrived.

    A shard holding an unreadable image is written only with skip_bad_images (without that image, named in its
    record), so a failed run can be resumed with --skip-bad-images or after fixing the files.
    """

    def __init__(self, features_path, shard_size, num_images, latent_shape, record, with_stds, skip_bad_images):
        self.features_path, self.shard_size, self.num_images = features_path, shard_size, num_images
        self.latent_shape, self.record = latent_shape, record  # (C, h, w); the record's fields besides the range
        self.with_stds, self.skip_bad_images = with_stds, skip_bad_images
        self.pending = {}  # shard -> lists of latents / stds / labels / skipped paths
        self.bad_paths = []

    def add(self, index, label, mean_std=None, path=None):
        """Sample `index`: its (mean, std) of shape (2, C, h, w) each, or None with its path if unreadable."""
        k = index // self.shard_size
        shard = self.pending.setdefault(k, {"latents": [], "stds": [], "labels": [], "skipped": [], "seen": 0})
        shard["seen"] += 1
        if mean_std is not None:
            shard["latents"].append(mean_std[0])
            shard["stds"].append(mean_std[1])
            shard["labels"].append(label)
        else:
            shard["skipped"].append(path)
            self.bad_paths.append(path)
        start, stop = shard_range(k, self.shard_size, self.num_images)
        if shard["seen"] == stop - start:
            if not shard["skipped"] or self.skip_bad_images:
                latents, stds = ((torch.stack(shard[key]) if shard[key] else torch.zeros(0, 2, *self.latent_shape))
                                 .numpy() for key in ("latents", "stds"))  # (n, 2, C, h, w) each
                write_shard(self.features_path, k, latents, shard["labels"],
                            {"start": start, "stop": stop, "skipped": shard["skipped"], **self.record},
                            stds=stds if self.with_stds else None)
            del self.pending[k]


def read_shard_record(features_path, shard_index):
    """The JSON record of a finished shard."""
    path = os.path.join(features_path, shard_stem(shard_index) + ".json")
    with open(path) as f:
        return json.load(f)


def write_manifest(features_path, num_shards, latent_stat="posterior", **meta):
    """Gather the finished shards' records into manifest.json (rank 0, after all ranks are done)."""
    if latent_stat not in LATENT_STATS:
        raise ValueError(f"latent_stat must be one of {LATENT_STATS}, got {latent_stat!r}")
    with_stds = latent_stat == "posterior"
    shards, skipped = [], []
    for k in range(num_shards):
        if not shard_is_finished(features_path, k, with_stds):
            raise FileNotFoundError(f"shard {k} of {num_shards} is not finished in {features_path}")
        record = read_shard_record(features_path, k)
        stem = shard_stem(k)
        shards.append({"latents": stem + ".latents.npy", "labels": stem + ".labels.npy", "count": record["count"],
                       "start": record["start"], "stop": record["stop"],
                       **({"stds": stem + ".stds.npy"} if with_stds else {})})
        skipped += record.get("skipped", [])
    manifest = dict(meta, format=FORMAT_NAME, version=FORMAT_VERSION, latent_stat=latent_stat, dtype="float32",
                    count=sum(s["count"] for s in shards), skipped=skipped, shards=shards)
    atomic_write_json(os.path.join(features_path, MANIFEST_NAME), manifest)
    return manifest


def read_manifest(features_path):
    """Load and validate manifest.json; clear errors for a missing, corrupt or incomplete manifest."""
    if not os.path.isdir(features_path):
        raise FileNotFoundError(f"features path does not exist or is not a directory: {features_path}")
    path = os.path.join(features_path, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {features_path}: run extract_features.py "
                                f"(the manifest is written only after every shard is finished)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt manifest {path}: {err}") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"corrupt manifest {path}: expected a JSON object")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"manifest {path} lacks keys {missing}")
    if manifest["format"] != FORMAT_NAME or manifest["version"] not in READABLE_VERSIONS:
        raise ValueError(f"manifest {path} has format {manifest['format']!r} v{manifest['version']}, "
                         f"expected {FORMAT_NAME!r} v{' or v'.join(map(str, READABLE_VERSIONS))}")
    if manifest["version"] == 1:
        manifest["latent_stat"] = "mean"  # version 1 stored posterior means only
    if manifest.get("latent_stat") not in LATENT_STATS:
        raise ValueError(f"manifest {path} has latent_stat {manifest.get('latent_stat')!r}, expected one of {LATENT_STATS}")
    if manifest["latent_stat"] == "posterior" and not all("stds" in shard for shard in manifest["shards"]):
        raise ValueError(f"manifest {path} says latent_stat 'posterior' but lists no stds file for some shards")
    return manifest


class LatentFeatureDataset(SeededFlip, Dataset):
    """Latent shards -> (x, y int64), seeded choice of plain/flipped latent; x (already scaled) is the mean
    (C, h, w) for latent_stat "mean", the moments [mean, std] (2, C, h, w) for "posterior" (see sample_posterior).

    latent_stat=None takes the folder's; "mean" reads only the means of a posterior folder.
    """

    def __init__(self, feature_path, flip=True, seed=0, latent_stat=None):
        self.feature_path = feature_path
        self.manifest = read_manifest(feature_path)
        stored = self.manifest["latent_stat"]
        if latent_stat not in (None,) + LATENT_STATS:
            raise ValueError(f"latent_stat must be one of {LATENT_STATS}, got {latent_stat!r}")
        if latent_stat == "posterior" and stored == "mean":
            raise ValueError(f"{feature_path} holds posterior means only (latent_stat 'mean'); re-extract with "
                             f"extract_features.py --latent-stat posterior to train on posterior samples")
        self.latent_stat = latent_stat or stored
        self.shards = self.manifest["shards"]
        latent_shape = tuple(self.manifest["latent_shape"])
        counts = []
        for shard in self.shards:
            latents, labels, *stds = self._open(shard)
            if latents.shape[1:] != (2,) + latent_shape or latents.shape[0] != shard["count"] or labels.shape != (shard["count"],):
                raise ValueError(f"shard {shard['latents']} in {feature_path} has shape {latents.shape} / labels "
                                 f"{labels.shape}, manifest says ({shard['count']}, 2, *{list(latent_shape)})")
            if stds and stds[0].shape != latents.shape:
                raise ValueError(f"shard {shard['stds']} in {feature_path} has shape {stds[0].shape}, "
                                 f"its means {latents.shape}")
            counts.append(shard["count"])
        if sum(counts) != self.manifest["count"]:
            raise ValueError(f"manifest in {feature_path}: shards hold {sum(counts)} latents, count says {self.manifest['count']}")
        self.offsets = np.cumsum([0] + counts).tolist()
        self.num_classes = int(self.manifest["num_classes"])
        self.class_names = self.manifest.get("class_names")
        self.label_kind = self.manifest.get("label_kind", "class")  # "coco_image_id": labels are COCO image ids
        self.channels, self.resolution = latent_shape[0], latent_shape[-1]
        self.image_size = int(self.manifest["image_size"])
        self.latent_scale = float(self.manifest["latent_scale"])
        self.vae = self.manifest["vae"]
        self._arrays = {}  # shard index -> (latents memmap, labels memmap), opened lazily per process
        self._init_flip(flip, seed)

    def _open(self, shard):
        """(means, labels) memmaps of a shard, plus its stds when sampling the posterior."""
        arrays = []
        for key in ("latents", "labels") + (("stds",) if self.latent_stat == "posterior" else ()):
            path = os.path.join(self.feature_path, shard[key])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"latent shard file listed in the manifest is missing: {path}")
            try:
                arrays.append(np.load(path, mmap_mode="r"))
            except (ValueError, OSError) as err:
                raise ValueError(f"corrupt latent shard file {path}: {err}") from err
        return tuple(arrays)

    def __getstate__(self):
        # Memmaps would be pickled by value; DataLoader workers reopen the files instead.
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def __len__(self):
        return self.offsets[-1]

    def label_array(self):
        """Every sample's label (N,) int64, in index order."""
        return np.concatenate([np.asarray(self._open(shard)[1]) for shard in self.shards]).astype(np.int64)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        k = bisect.bisect_right(self.offsets, index) - 1
        if k not in self._arrays:
            self._arrays[k] = self._open(self.shards[k])
        latents, labels, *stds = self._arrays[k]
        local, side = index - self.offsets[k], int(self.is_flipped(index))
        x = torch.from_numpy(np.array(latents[local, side]))  # (C, h, w)
        if stds:
            x = torch.stack([x, torch.from_numpy(np.array(stds[0][local, side]))])  # (2, C, h, w): mean, std
        return x, torch.tensor(int(labels[local]), dtype=torch.int64)
