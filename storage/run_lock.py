"""One job per run folder: an advisory lock on <run>/run.lock, held by train.py's rank 0 for the whole run.

Two starts on one folder (`--exp-name same --resume auto` run twice, a requeued job racing the one it replaces)
would both train, write every metrics.jsonl line twice, interleave log.txt and delete each other's temp
files. The lock is flock(2): the kernel drops it when its holder dies, however it dies (SIGKILL, OOM killer,
node preemption), so a crash never leaves a folder locked and there is nothing to clean up. The file names
its last holder (host, pid, start time) for the refusal message; it stays in the folder between runs.
flock covers every host on NFSv4 and on Lustre mounted with -o flock; on other network file systems only
the processes of one host.
"""
import fcntl
import os
import socket
import time

from foundation.usage_error import UsageError

LOCK_NAME = "run.lock"


class RunFolderLock:
    """acquire(run_dir) takes the folder or raises a UsageError naming the holder; release() (or leaving a
    `with` block) lets it go. One lock object holds at most one folder."""

    def __init__(self):
        self.file = None
        self.run_dir = None

    def acquire(self, run_dir):
        """Hold run_dir; a folder held by another process is a UsageError naming its host and pid."""
        path = os.path.join(run_dir, LOCK_NAME)
        f = open(path, "a+")  # never truncated before the lock is ours: the holder's line must survive
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            f.close()
            raise UsageError(f"run folder {run_dir} is in use by {holder}: another train.py writes into it; "
                             f"wait for it to end or choose another --exp-name") from None
        except BaseException:
            f.close()
            raise
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} "
                f"(since {time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n")
        f.flush()
        self.release()
        self.file, self.run_dir = f, run_dir

    def release(self):
        """Let the folder go (closing the file drops the flock)."""
        if self.file is not None:
            self.file.close()
            self.file, self.run_dir = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False
