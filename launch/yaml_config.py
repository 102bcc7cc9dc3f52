"""YAML configs as command lines: a config's {flag name: value} mapping becomes flags the command line overrides.

    args = parse_with_config(parser)      # train.py: --config configs/table1/....yaml --lr 2e-4 (the flag wins)
    config = read_config(path)            # demo.py: the same file's settings, keys with _ ({"max_steps": 1600})

Keys are flag names with - or _ (`global-batch-size`, `global_batch_size`); a `model_args` mapping becomes one
--model-arg KEY=VALUE per entry. Values go through argparse as if typed, so they are type-checked alike.
"""
import argparse
import json
import sys

import yaml

from foundation.usage_error import UsageError


def read_config(path, flag="--config"):
    """{key with _ : value} of a YAML mapping, or a one-line UsageError naming the flag, the path and why."""
    return {str(key).replace("-", "_"): value for key, value in _read_mapping(path, flag).items()}


def _read_mapping(path, flag):
    """The YAML mapping at `path` with its keys as written."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"{flag} {path}: {getattr(error, 'strerror', None) or ' '.join(str(error).split())}") from None
    if not isinstance(config, dict):
        raise UsageError(f"config {path} must be a mapping of flag names to values")
    return config


def config_to_argv(parser, path):
    """The config at `path` as flag tokens for `parser`; unknown keys are an error naming them and the valid ones."""
    written = _read_mapping(path, "--config")
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = sorted(str(key) for key in written if str(key).replace("-", "_") not in flags)
    if unknown:
        raise UsageError(f"unknown keys in config {path}: {', '.join(unknown)} (valid: {', '.join(sorted(flags))})")
    argv = []
    for key, value in written.items():
        key = str(key).replace("-", "_")
        if key == "model_args":
            value = {} if value is None else value  # a run record of a run without overrides
            if not isinstance(value, dict):
                raise UsageError(f"model_args in config {path} must be a mapping of constructor arguments to "
                                 f"values, got {value!r}")
            for name, arg in value.items():
                argv += ["--model-arg", f"{name}={json.dumps(arg)}"]  # JSON is YAML: parse_model_arg reads it back
            continue
        action = flags[key]
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):  # nargs flags (timestep-range: [0, 249])
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def parse_with_config(parser, argv=None):
    """parser.parse_args with --config FILE.yaml supplying values that later command-line flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        argv = config_to_argv(parser, known.config) + argv  # later flags win in argparse
    return parser.parse_args(argv)
