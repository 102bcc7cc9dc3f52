"""Crash-safe file writes: write a temporary sibling, flush it to disk, then os.replace it over the target.

A kill at any moment leaves either the old file or the new one, never half of one; every script that
writes checkpoints, shards, reference batches or reports goes through here.
"""
import errno
import json
import os
import stat
import tempfile

# Failures that mean "this disk cannot take the file", reported as an OSError naming the target path.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


class _RecordingFile:
    """The temp file, remembering the first OSError of a write: torch.save reports a failed write as
    `[enforce fail at inline_container.cc] unexpected pos`, without the reason (no space left, ...)."""

    def __init__(self, f):
        self._f = f
        self.error = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _new_file_mode(path):
    """The mode a plain open(path, "w") would leave: the existing file's, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0o022)  # the only portable way to read the umask is to set it and restore it
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path, write, mode="wb"):
    """Call write(f) on a temporary file beside `path`, then rename it to `path` (the temp file never lingers).

    The file gets the permissions a plain open() would give it (mkstemp's are 0600). A disk that is full,
    read-only or not ours raises OSError(errno, reason, path), whatever the writer made of it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as error:
        raise OSError(error.errno, error.strerror, path) from error
    try:
        os.fchmod(handle, _new_file_mode(path))
        raw = os.fdopen(handle, mode)
        f = _RecordingFile(raw)
        try:
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
            raw.close()
        except BaseException as error:
            try:
                raw.close()  # flushing what is left fails the same way on a full disk; report the first failure
            except OSError:
                pass
            cause = error if isinstance(error, OSError) else f.error
            if cause is not None and cause.errno in DISK_ERRNOS:
                raise OSError(cause.errno, cause.strerror, path) from error
            raise
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, payload, indent=1):
    """JSON dump of `payload` to `path`, atomically."""
    atomic_write(path, lambda f: json.dump(payload, f, indent=indent), mode="w")
