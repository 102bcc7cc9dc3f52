"""What a run was started with, written into its folder at start (before any checkpoint exists).

<run>/config.yaml   the resolved flags of the latest start, loadable with train.py --config (the keys
                    that tie a config to one run folder, --config/--resume/--exp-name, are left out);
<run>/starts.jsonl  one line per start: time, host, command line, world size, git commit and dirty flag,
                    versions of python, torch, CUDA and the packages the code imports, resume point.
A requeued job appends a line instead of overwriting the history.
"""
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata

import torch
import yaml

from foundation.atomic_file import atomic_write

RUN_SPECIFIC_KEYS = ("config", "resume", "exp_name")  # a config.yaml must start a run anywhere
KEY_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "diffusers", "transformers",
                "torch-fidelity", "tensorboard", "dtr")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_state(repo=REPO):
    """{"commit": sha or None, "dirty": bool or None} of the code being run (None outside a git checkout)."""
    def git(*argv):
        return subprocess.run(["git", "-C", repo, *argv], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        # tracked files only: results/ and other untracked outputs do not make the code dirty
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def versions():
    """Versions of python, torch, CUDA, cuDNN and the installed key packages (absent ones are left out)."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for package in KEY_PACKAGES:
        try:
            found.setdefault(package, metadata.version(package))
        except metadata.PackageNotFoundError:
            pass
    return found


def resolved_config(args):
    """The flags as a YAML-ready {flag-name: value} mapping, run-specific keys left out."""
    return {key.replace("_", "-"): value for key, value in sorted(vars(args).items())
            if key not in RUN_SPECIFIC_KEYS}


def write_run_record(run_dir, args, world_size, argv=None, resumed_from=None, step=0):
    """Write <run>/config.yaml (atomically) and append this start to <run>/starts.jsonl; returns the record."""
    config = resolved_config(args)
    atomic_write(os.path.join(run_dir, "config.yaml"),
                 lambda f: yaml.safe_dump(config, f, sort_keys=False), mode="w")
    record = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "command": [sys.executable, *(sys.argv if argv is None else argv)],
        "cwd": os.getcwd(),
        "world_size": world_size,
        "resumed_from": resumed_from,
        "step": step,
        "git": git_state(),
        "versions": versions(),
    }
    with open(os.path.join(run_dir, "starts.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    return record
