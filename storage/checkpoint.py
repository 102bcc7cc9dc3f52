"""The checkpoint file: train.py's training checkpoints written and resumed, and safe reading of any checkpoint.

train.py writes one dict per checkpoint (training_checkpoint, save_checkpoint; keys in train.py's docstring)
and resumes it (read_training_checkpoint, check_resume_compatible, restore_training_state). read_checkpoint
opens any checkpoint (ours, official DiT's, the DTR authors', raw state_dicts) as data, no code run; building
the model a checkpoint describes is sampling/model_from_checkpoint.py's job.
"""
import argparse
import os
import pickle
import zipfile
from dataclasses import dataclass

import torch

from foundation.atomic_file import atomic_write
from foundation.settings_diff import describe_differences
from foundation.usage_error import UsageError
from storage.authors_checkpoint import load_with_omegaconf_config
from storage.checkpoint_integrity import integrity_problem, write_sealed
from storage.checkpoint_kind import check_resumable, check_weights_fit


#################################################################################
#                         Training checkpoints (train.py)                       #
#################################################################################

@dataclass
class TrainingState:
    """What a training checkpoint holds: networks, optimiser, fixed settings and where the run stands."""
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    weighting: torch.nn.Module          # the loss weighting (ANT-UW's learnable s_k)
    scaler: torch.amp.GradScaler        # fp16 only
    settings: dict                      # model_config, diffusion_config, vae, image_size, latent_scale, dataset
    step: int = 0                       # optimiser steps done
    epoch: int = 0
    position: int = 0                   # batches done in the epoch


def training_checkpoint(state, args, rng_states, loss_log):
    """The dict train.py saves: state, args, one RNG state per rank and the loss log (LossLog.state())."""
    checkpoint = {
        "model": state.model.state_dict(), "ema": state.ema.state_dict(), "opt": state.opt.state_dict(),
        "step": state.step, "args": vars(args), **state.settings,
        "loss_weighting": state.weighting.state_dict(), "rng": rng_states,
        "loss_log": loss_log,
        "data_state": {"epoch": state.epoch, "position": state.position, "sampler_seed": args.global_seed,
                       "global_batch_size": args.global_batch_size},
    }
    if state.scaler.is_enabled():
        checkpoint["scaler"] = state.scaler.state_dict()
    return checkpoint


def save_checkpoint(checkpoint, path):
    """torch.save through a temp file and os.replace: a crash never leaves a broken checkpoint. The file carries
    a SHA-256 of its content (storage/checkpoint_integrity.py) that every reader verifies."""
    atomic_write(path, lambda f: write_sealed(f, lambda sealed: torch.save(checkpoint, sealed)))


def read_training_checkpoint(path, verify_checksum=True):
    """A train.py checkpoint as saved (weights_only: no code runs on load); one-line UsageError if unreadable.

    verify_checksum=False where this process has just verified the file (train.py: rank 0 picks and checks it).
    A readable file of another kind (official DiT's, a state_dict, ...) is a UsageError saying what it is."""
    checkpoint = read_checkpoint(path, verify_checksum)
    check_resumable(checkpoint, path)
    return checkpoint


def check_resume_compatible(checkpoint, path, model_config, diffusion_config):
    """Refuse to resume a checkpoint of another model, routing or diffusion setup; name what differs."""
    for label, saved, current in (("model", checkpoint["model_config"], model_config),
                                  ("diffusion", checkpoint["diffusion_config"], diffusion_config)):
        diff = describe_differences(saved, current, "checkpoint", "this run", ignore=("grad_checkpointing",))
        if diff:
            raise UsageError(f"cannot resume {path}: its {label} config differs from this run's ({diff})")


def restore_training_state(state, checkpoint, path="the checkpoint"):
    """Load weights, optimiser, loss weighting, scaler and the position in the data into state."""
    for which in ("model", "ema"):  # a tensor too many or too few: one line, not load_state_dict's report
        check_weights_fit(checkpoint[which], state.model.state_dict(), path, which)
    state.model.load_state_dict(checkpoint["model"])
    state.ema.load_state_dict(checkpoint["ema"])
    state.opt.load_state_dict(checkpoint["opt"])
    state.weighting.load_state_dict(checkpoint["loss_weighting"])
    if "scaler" in checkpoint:
        state.scaler.load_state_dict(checkpoint["scaler"])
    state.step = checkpoint["step"]
    state.epoch, state.position = checkpoint["data_state"]["epoch"], checkpoint["data_state"]["position"]


#################################################################################
#                         Reading any checkpoint safely                         #
#################################################################################

def read_checkpoint(path, verify_checksum=True):
    """torch.load(path, weights_only=True) on CPU, or a UsageError saying in one line why the file cannot be read.

    Used by every loader (sample.py, sample_ddp.py, train.py --resume). Besides tensors and plain containers
    it admits argparse.Namespace (official DiT) and OmegaConf configs (the DTR release) as inert data.
    A checkpoint that carries a checksum (ours) must match it; see storage/checkpoint_integrity.py.
    """
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint not found: {path}")
    problem = integrity_problem(path, verify_checksum)
    if problem is not None:
        raise UsageError(f"cannot read checkpoint {path}: {problem}")
    try:
        return load_with_omegaconf_config(path, extra_globals=[argparse.Namespace])
    except pickle.UnpicklingError as error:
        # torch suggests weights_only=False here, which would run whatever code the file carries
        unsupported = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        raise UsageError(f"cannot read checkpoint {path}: it holds Python objects that safe loading refuses "
                         f"({unsupported[0] if unsupported else 'not a checkpoint file'})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot read checkpoint {path}: truncated or damaged ({first_line})") from None
