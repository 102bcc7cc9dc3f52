"""What the checkpoint checksum costs: save and load with and without it (storage/checkpoint_integrity.py).

    python -m benchmarks.checkpoint_integrity --size-mb 1024 --folder /scratch/me

Writes a checkpoint-like dict of fp32 tensors (--size-mb in all, in 64 MB tensors) atomically (temp file, fsync,
rename) as save_checkpoint did before checksums, and with save_checkpoint (the same, sealed), then reads it
back with plain torch.load and with read_checkpoint (checksum verified first). Prints one JSON line per
measurement (best of --repeats, seconds and GB/s) and the sealed/plain ratios. The second read of a file comes
from the page cache, as torch.load's read after the checksum pass does.
"""
import argparse
import json
import os
import tempfile

import torch

from foundation.atomic_file import atomic_write
from storage.checkpoint import read_checkpoint, save_checkpoint
from storage.checkpoint_integrity import integrity_problem
from training.step_cost import best_of


def main(args):
    chunk = 16 * 2**20  # fp32 values per 64 MB tensor
    total = args.size_mb * 2**20 // 4
    state = {f"w{i}": torch.randn(min(chunk, total - i * chunk)) for i in range((total + chunk - 1) // chunk)}
    folder = tempfile.mkdtemp(dir=args.folder)
    plain, sealed = os.path.join(folder, "plain.pt"), os.path.join(folder, "sealed.pt")
    size = args.size_mb * 2**20 / 1e9
    times = {
        "save plain": best_of(lambda: atomic_write(plain, lambda f: torch.save(state, f)), args.repeats),
        "save sealed": best_of(lambda: save_checkpoint(state, sealed), args.repeats),
        "verify checksum": best_of(lambda: integrity_problem(sealed), args.repeats),
        "load plain": best_of(lambda: torch.load(plain, weights_only=True), args.repeats),
        "load sealed (verify + load)": best_of(lambda: read_checkpoint(sealed), args.repeats),
    }
    for name, seconds in times.items():
        print(json.dumps({"measure": name, "seconds": round(seconds, 3), "GB_per_s": round(size / seconds, 2),
                          "size_GB": round(size, 3)}))
    print(json.dumps({"save sealed / plain": round(times["save sealed"] / times["save plain"], 2),
                      "load sealed / plain": round(times["load sealed (verify + load)"] / times["load plain"], 2)}))
    for path in (plain, sealed):
        os.remove(path)
    os.rmdir(folder)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="checkpoint size (a DiT-XL/2 training one: 10,800)")
    parser.add_argument("--folder", type=str, default=None, help="where to write (default: the temp folder)")
    parser.add_argument("--repeats", type=int, default=3)
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
