"""Command-line mistakes end a script the way argparse's own errors do: one line on stderr, exit code 2.

Every script (train.py, sample.py, sample_ddp.py, extract_features.py, evaluations/*) uses this module:

    from foundation.usage_error import UsageError
    from foundation.flag_types import finite_float
    from launch.cli import check_writable, make_output_dir, run_command

    def main(args):
        if args.lr <= 0:                           # check everything before anything is written
            raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
        make_output_dir(args.results_dir, "--results-dir")   # a read-only / full disk is named, not a traceback
        ...

    def build_parser():
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--lr", type=finite_float, default=1e-4)   # nan / inf rejected by argparse itself
        return parser

    if __name__ == "__main__":
        run_command(main, build_parser())          # or run_command(main, parser, parse_args=lambda: ...)

    $ python train.py --lr 0
    train.py: error: --lr must be a finite number > 0, got 0.0          (exit code 2, no traceback)

Rules of the contract:
  * UsageError is for what the user can fix (a flag value, missing or empty data, a checkpoint that does not
    match or cannot be read, an output folder that cannot be written); bugs stay ordinary exceptions and keep
    their traceback. The message is one line and names the flag or path.
  * Raise it before anything is written, so a rejected command leaves no files behind: check_writable(path,
    flag) at the start tests an output path without creating it, make_output_dir(path, flag) creates the folder
    once the inputs have passed.
  * UsageError is a ValueError, so library callers (and tests calling main(args)) can catch it as one.
  * argparse's own errors (a bad number such as --lr nan, an unknown flag, a missing argument) end the same way
    under run_command: one line, not the 16-27 line usage block first (`prog -h` prints that).
  * Under torchrun every rank runs the same checks and exits 2; the line is printed once, by rank 0. A check
    whose verdict can differ between ranks (rank 0 alone creates the results folder) goes through
    check_on_every_rank, which shares the verdict so that no rank waits forever in a collective.
  * A run that fails later on every rank alike (train.py: an image of the next batch cannot be decoded; the
    checkpoint rank 0 writes does not fit on the disk) raises RunFailure on every rank: one line, printed once,
    exit code 1.
  * A file operation that fails later for lack of space or permission (OSError: no space left, read-only file
    system, permission denied, file too large) ends in one line `prog: error: PATH: reason`, exit code 1, on
    the rank that hit it: the command was right, the disk was not. foundation.atomic_file.atomic_write raises
    such an OSError with the target path even where torch.save hides it.
"""
import argparse
import contextlib
import os
import signal
import sys
import time

import torch.distributed as dist

from foundation.atomic_file import DISK_ERRNOS
from foundation.usage_error import UsageError

USAGE_EXIT_CODE = 2        # argparse's code for a bad command line
ENVIRONMENT_EXIT_CODE = 1  # a valid command that the disk could not serve
RANK_ZERO_GRACE_S = 10     # how long other ranks leave rank 0 to report a shared error


class RunFailure(RuntimeError):
    """A run that had to stop for a reason outside the command line (an image that cannot be decoded, a disk that
    is full), raised with the same message on every rank; run_command prints it once (rank 0), every rank
    exits 1. The message is one line and names the file."""


#################################################################################
#                           Checks that touch the disk                          #
#################################################################################

def make_output_dir(path, flag):
    """os.makedirs(path, exist_ok=True), or a UsageError naming the flag, the path and why it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be created: {error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):  # access(2) reports a read-only file system even for root
        reason = "read-only file system" if _read_only_fs(path) else "permission denied"
        raise UsageError(f"{flag} {path} is not writable: {reason}")
    return path


def check_writable(path, flag):
    """UsageError unless `path` (a file or folder not written yet) could be created; creates nothing.

    Its nearest existing ancestor must be a writable folder: for checks at the start of a long command whose
    output folder is made only when there is something to put in it.
    """
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(parent) else "permission denied"
        raise UsageError(f"{flag} {path} cannot be written: {parent} is not writable ({reason})")
    return path


def _read_only_fs(path):
    """True if the file system holding `path` is mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_on_every_rank(check, *args, **kwargs):
    """check(*args, **kwargs) on every rank, then a UsageError on every rank if it raised one on any.

    For checks whose verdict can differ between ranks (rank 0 alone creates a folder, each rank reads its own
    shards): without this, the failing rank exits and the others wait in the next collective. Returns check's
    result on this rank. A collective: every rank must call it at the same point. Outside torchrun it is just
    check(*args, **kwargs).
    """
    message, result = None, None
    try:
        result = check(*args, **kwargs)
    except UsageError as error:
        message = str(error)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m is not None), None)  # the lowest failing rank's words
    if message is not None:
        raise UsageError(message)
    return result


def write_on_rank_zero(write, rank, world_size):
    """write() on rank 0 while the other ranks wait; a disk that refuses it (full, read-only, quota) is a
    RunFailure on every rank. Returns write's result on rank 0, None elsewhere.

    Replaces `if rank == 0: write()` followed by a barrier, where the other ranks, left waiting in the barrier
    when rank 0 fails, end in a 40-line "Connection closed by peer" (gloo) or wait out the timeout (nccl).
    A collective: every rank calls it at the same point.
    """
    result, failure = None, None
    if rank == 0:
        try:
            result = write()
        except OSError as error:
            if error.errno not in DISK_ERRNOS:
                raise
            failure = f"{error.filename + ': ' if error.filename else ''}{error.strerror or error}"
    if world_size > 1:
        shared = [failure]
        dist.broadcast_object_list(shared, src=0)  # also the barrier: the others wait for rank 0's word
        failure = shared[0]
    if failure is not None:
        raise RunFailure(failure)
    return result


#################################################################################
#                                   The runner                                  #
#################################################################################

def _rank():
    """This process's rank: the process group's if one exists, else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _stop(parser, message, code, print_on_this_rank):
    """Tear down the process group (so no rank hangs in it), print `prog: error: message` once, exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if not print_on_this_rank:
        # torchrun stops every rank (SIGTERM) as soon as one exits. Rank 0 prints the shared message and exits
        # first; the others exit with the same code when stopped, or print it themselves if rank 0 carries on
        # (an error of this rank alone), so the line appears exactly once either way.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
        time.sleep(RANK_ZERO_GRACE_S)
    sys.stderr.write(f"{parser.prog}: error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


@contextlib.contextmanager
def one_line_argparse_errors():
    """Within the block, argparse's errors raise UsageError instead of printing the usage block and exiting.

    Set on the class for the time of parsing only: train.py parses with parsers it builds itself (--config).
    """
    def error(parser, message):
        raise UsageError(message)
    previous = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = previous


def run_command(main, parser, parse_args=None):
    """Parse the command line and return main(args); a UsageError or a failed write ends in one line, no traceback.

    parse_args: a function returning the parsed arguments, for scripts that parse in several steps
    (train.py reads --config first); default parser.parse_args(). Its UsageErrors are handled the same way.
    """
    try:
        with one_line_argparse_errors():
            args = parse_args() if parse_args is not None else parser.parse_args()
        return main(args)
    except UsageError as error:
        _stop(parser, " ".join(str(error).split("\n")), USAGE_EXIT_CODE, _rank() == 0)
    except RunFailure as error:
        _stop(parser, " ".join(str(error).split("\n")), ENVIRONMENT_EXIT_CODE, _rank() == 0)
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        where = f"{error.filename}: " if error.filename is not None else ""
        # each rank writes its own files, so each rank reports its own failure (as coreutils: "PATH: reason")
        _stop(parser, f"{where}{error.strerror or error}", ENVIRONMENT_EXIT_CODE, True)
