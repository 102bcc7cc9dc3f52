"""Crash-safe file writes: write a temporary sibling, flush it to disk, then os.replace it over the target.

A kill at any moment leaves either the old file or the new one, never half of one; every script that
writes checkpoints, shards, reference batches or reports goes through here. The temp file is named
.<name>.pid<PID>@<HOST>.<random>.tmp, so that a cleanup of what killed writes left behind can tell a dead
writer's file from a live one's (writer_is_gone).
"""
import errno
import json
import os
import re
import socket
import stat
import tempfile

# Failures that mean "this disk cannot take the file", reported as an OSError naming the target path.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


# .<name>.pid<PID>@<HOST>.<random>.tmp; a temp name without the pid@host part has no known writer
TEMP_FILE = re.compile(r"^\.(?P<target>.+?)\.(?:pid(?P<pid>\d+)@(?P<host>.+)\.)?[^.]+\.tmp$")


def temp_prefix(path):
    """The start of the temp file names atomic_write uses for `path` in this process."""
    return f".{os.path.basename(path)}.pid{os.getpid()}@{socket.gethostname()}."


def writer_is_gone(name):
    """Whether the process that wrote temp file `name` is certainly dead: it ran on this host and its pid is
    free. A writer on another host cannot be checked (False); a name without a writer predates them (True)."""
    match = TEMP_FILE.match(name)
    if match is None:
        return False  # not one of atomic_write's temp files
    if match.group("pid") is None:
        return True
    pid = int(match.group("pid"))
    if match.group("host") != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0 checks existence only
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


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
        handle, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix(path), suffix=".tmp")
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
