"""argparse types for numbers: a bad value is a one-line `prog: error: argument --flag: ...` before anything runs."""
import argparse
import math


def finite_float(text):
    """argparse type: a float that is neither nan nor +-inf (float('nan') parses, and poisons a run silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
