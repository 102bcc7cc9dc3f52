"""Training progress on rank 0: a tqdm bar with ETA on a terminal; log.txt keeps plain, uncoloured lines.

A bar only makes sense on a terminal: under SLURM or nohup stdout is a file, where tqdm's carriage
returns would fill it with partial lines, so there the console gets the plain log lines alone.
"""
import logging
import sys

from tqdm import tqdm

PLAIN = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
COLOURED = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def console_is_terminal():
    """True when stdout is an interactive terminal (not a file, pipe or SLURM output)."""
    return sys.stdout.isatty()


class TqdmConsoleHandler(logging.Handler):
    """Console log lines written above the progress bar instead of through it."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def console_handler():
    """Coloured lines through tqdm on a terminal; plain lines on a redirected stdout."""
    if console_is_terminal():
        handler = TqdmConsoleHandler()
        handler.setFormatter(COLOURED)
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(PLAIN)
    return handler


class LogFileHandler(logging.FileHandler):
    """log.txt's handler. A line the disk refuses (full, quota) is lost quietly: logging's default prints a
    traceback for it, which would bury the one-line error that follows (the checkpoint fails on that disk too)."""

    def handleError(self, record):
        pass


def file_handler(path):
    """log.txt: plain lines, no terminal colour codes."""
    handler = LogFileHandler(path)
    handler.setFormatter(PLAIN)
    return handler


def progress_bar(total, done, rank):
    """tqdm over training steps with ETA, on rank 0 and only on a terminal (disabled bars cost nothing)."""
    return tqdm(total=total, initial=done, unit="step", desc="train", dynamic_ncols=True, file=sys.stdout,
                disable=rank != 0 or not console_is_terminal())
