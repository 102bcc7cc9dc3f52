"""Numbers on the command line: argparse types (a bad value is a one-line `prog: error: argument --flag: ...`) and
the range check every script runs on its counts before anything is read or written."""
import argparse
import math

from foundation.usage_error import UsageError


def finite_float(text):
    """argparse type: a float that is neither nan nor +-inf (float('nan') parses, and poisons a run silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def check_at_least(args, minimum, *flags):
    """UsageError `--flag must be >= minimum, got value` for the first of `flags` (argparse dests) below minimum.

    A flag left at None (not given, where None means "unset") is skipped.
    """
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= {minimum}, got {value}")
