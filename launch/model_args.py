"""--model-arg KEY=VALUE: constructor overrides of a zoo model on the command line (models.create_model).

    parser.add_argument("--model-arg", dest="model_args", type=parse_model_arg, action=ModelArgAction, ...)
    python train.py --model ADM-FFHQ64 --model-arg model_channels=64 --model-arg channel_mult=[1,2,2]

VALUE is read as YAML (64, 0.5, true, [1, 2, 2], dtr); repeats collect into one {KEY: VALUE} mapping,
a later KEY winning, which is what a config's model_args: mapping holds.
"""
import argparse

import yaml


def parse_model_arg(text):
    """--model-arg KEY=VALUE -> (key, value), VALUE read as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. hidden_size=64), got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r} (YAML: 64, 0.5, true, [1, 2])") from None


class ModelArgAction(argparse.Action):
    """Repeatable --model-arg KEY=VALUE collected into one {KEY: VALUE} mapping, a later KEY winning."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, value = values
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: value})


def add_model_arg(parser, help):
    """Add --model-arg KEY=VALUE (dest model_args, default None) to an argparse parser or group."""
    parser.add_argument("--model-arg", dest="model_args", type=parse_model_arg, action=ModelArgAction, default=None,
                        metavar="KEY=VALUE", help=help)
