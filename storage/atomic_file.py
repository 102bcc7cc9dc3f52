"""Crash-safe file writes: write a temporary sibling, flush it to disk, then os.replace it over the target.

A kill at any moment leaves either the old file or the new one, never half of one; every script that
writes checkpoints, shards, reference batches or reports goes through here.
"""
import json
import os
import tempfile


def atomic_write(path, write, mode="wb"):
    """Call write(f) on a temporary file beside `path`, then rename it to `path` (the temp file never lingers)."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, payload, indent=1):
    """JSON dump of `payload` to `path`, atomically."""
    atomic_write(path, lambda f: json.dump(payload, f, indent=indent), mode="w")
