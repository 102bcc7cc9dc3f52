"""The checkpoint format: train.py's training checkpoints written and resumed, any checkpoint read for sampling.

train.py writes one dict per checkpoint (training_checkpoint, save_checkpoint; keys in train.py's docstring)
and resumes it (read_training_checkpoint, check_resume_compatible, restore_training_state).

Four formats are read for sampling (load_checkpoint):
  * ours (train.py): {"model", "ema", "model_config", "diffusion_config", "vae", "image_size", ...};
    every model, routing and diffusion setting comes from the file;
  * official DiT training dicts: {"model", "ema", "opt", "args": argparse.Namespace};
  * the DTR authors' dicts: {"model", "ema", "opt", "config": OmegaConf DictConfig}; model, routing,
    alpha, beta, schedule and VAE come from the config (read as data: storage/authors_checkpoint.py);
  * raw state_dicts (the released DiT-XL-2-256x256.pt, guided-diffusion's 64x64_diffusion.pt): nothing
    but weights, so the flags (--model, --image-size, --num-classes, routing flags) say what to build,
    defaulting to official DiT (DiT-XL/2, 256px, 1000 classes, SD VAE latents, linear schedule,
    learn_sigma) or, for --model ADM-*, to guided-diffusion's 64x64 pixel models (cosine schedule);
    DiT files whose weights carry the release's routing tables (`blocks.{i}.routing._unit_mapping`)
    default to its DTR (alpha 4, beta 0.8) and cosine schedule instead.
A flag that disagrees with a setting stored in the checkpoint is an error naming both values.
"""
import argparse
import os
import pickle
import zipfile
from dataclasses import dataclass, field

import torch

from launch.cli import UsageError, finite_float
from launch.model_args import add_model_arg
from models import ADM, DiT, ROUTING_KINDS, build_from_config, create_model, family_of
from models.vae import LATENT_DOWNSAMPLE, LATENT_SCALE, vae_name
from storage.atomic_file import atomic_write
from storage.authors_checkpoint import (adopt_release_random_tables, carries_release_routing_tables,
                                        load_with_omegaconf_config, release_settings)
from storage.checkpoint_integrity import integrity_problem, write_sealed
from storage.checkpoint_kind import check_resumable, check_weights_fit
from storage.pretrained import add_pretrained_arguments


# Official DiT's defaults, used only for files that do not say how they were trained.
OFFICIAL_DEFAULTS = {
    "model": "DiT-XL/2", "image_size": 256, "num_classes": 1000, "routing": "none",
    "alpha": 4.0, "beta": 0.8, "routing_seed": 0, "noise_schedule": "linear",
    "vae": "stabilityai/sd-vae-ft-ema",
}
# Per backbone family, what its public raw state_dicts were trained with (num_classes: the zoo entry's).
RAW_STATE_DICT_DEFAULTS = {
    DiT: {"image_size": 256, "noise_schedule": "linear", "vae": OFFICIAL_DEFAULTS["vae"]},
    ADM: {"image_size": 64, "noise_schedule": "squaredcos_cap_v2", "vae": "none"},  # guided-diffusion 64x64
}
# What the DTR release trained with, for its files that do not say (their mask tables are the sign).
RELEASE_DEFAULTS = {"routing": "dtr", "noise_schedule": "cosine"}
SETTING_FLAGS = ("model", "image_size", "num_classes", "routing", "alpha", "beta", "routing_seed",
                 "noise_schedule")


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
        keys = sorted(set(saved) | set(current))
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
                for k in keys if saved.get(k) != current.get(k) and k != "grad_checkpointing"]
        if diff:
            raise UsageError(f"cannot resume {path}: its {label} config differs from this run's "
                             f"({'; '.join(diff)})")


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
#                          Any checkpoint, for sampling                         #
#################################################################################

@dataclass(frozen=True)
class SamplingSettings:
    """Everything besides the weights that sampling needs to know about a checkpoint."""
    model_name: str                 # zoo name ("DiT-S/2") or "custom" for a model outside the zoo
    image_size: int                 # pixels of the decoded image
    vae: str                        # "none" for pixel-space models, else a diffusers name or local path
    latent_scale: float             # latents were multiplied by this before training
    diffusion_config: dict = field(default_factory=dict)  # create_diffusion kwargs used in training
    weights: str = "ema"            # which weights were loaded: "ema", "model" or "state_dict"
    step: int = -1                  # training step of the checkpoint, -1 if unknown
    text_encoder: str = None        # text-to-image models: the frozen CLIP encoder (hub name or local directory)
    timestep_range: tuple = None    # (LO, HI) of an expert trained with --timestep-range (Table 6), else None


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


def _is_state_dict(obj):
    """A raw state_dict maps parameter names to tensors and nothing else."""
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _resolve(name, stored, flag, source):
    """Value stored in the checkpoint, unless a flag disagrees (error) or the file has none."""
    if stored is None:
        return flag
    if flag is not None and flag != stored:
        raise UsageError(f"--{name.replace('_', '-')} {flag} conflicts with the checkpoint's "
                         f"{name} {stored!r} ({source}); drop the flag or pick another checkpoint")
    return stored


def check_state_dict_fits(model, state_dict, model_name):
    """Raise a UsageError (one line) naming missing/unexpected keys and shape mismatches before loading."""
    expected = model.state_dict()
    # The DTR authors' checkpoints carry their masks; the model itself checks those on load.
    given = {k: v for k, v in state_dict.items() if "routing._unit_mapping" not in k}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in given and given[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:5]))
        parts.append("wrong --model / --image-size / --num-classes, or a checkpoint of another model?")
        raise UsageError(f"checkpoint does not fit {model_name}: {'; '.join(parts)}")


def _pick_weights(ckpt, use_model_weights, path):
    """EMA weights by default (official DiT samples EMA); raw training weights on request."""
    key = "model" if use_model_weights else "ema"
    if key not in ckpt:
        raise UsageError(f"{path} has no {key!r} weights (keys: {sorted(ckpt)})")
    return ckpt[key], key


def _load_ours(ckpt, flags, use_model_weights, path):
    """Our train.py format: settings come from the file, flags may only agree with it."""
    config = dict(ckpt["model_config"])
    name = config.get("model", "custom")
    diffusion_config = dict(ckpt.get("diffusion_config") or {})
    stored = {"model": name, "image_size": ckpt.get("image_size"), "num_classes": config.get("num_classes"),
              "routing": config.get("routing"), "alpha": config.get("alpha"), "beta": config.get("beta"),
              "routing_seed": config.get("routing_seed"),
              "noise_schedule": diffusion_config.get("noise_schedule", "linear")}
    for key in SETTING_FLAGS:
        _resolve(key, stored[key], flags.get(key), path)
    for key, value in (flags.get("model_args") or {}).items():
        if config.get(key) != value:
            raise UsageError(f"--model-arg {key}={value} conflicts with the checkpoint's {key} {config.get(key)!r} "
                             f"({path}); drop the flag: the checkpoint stores its model's full config")
    model = build_from_config({"model": name, **config}, grad_checkpointing=False)
    state_dict, which = _pick_weights(ckpt, use_model_weights, path)
    vae = ckpt.get("vae", "none")
    if flags.get("vae") is not None:
        if (vae == "none") != (flags["vae"] == "none"):
            raise UsageError(f"--vae {flags['vae']} conflicts with the checkpoint's vae {vae!r} ({path}): "
                             f"a {'pixel' if vae == 'none' else 'latent'}-space model")
        vae = flags["vae"]  # another copy of the same VAE (e.g. a local path on an offline cluster)
    image_size = ckpt.get("image_size") or config["input_size"] * (1 if vae == "none" else LATENT_DOWNSAMPLE)
    text_encoder = ckpt.get("text_encoder")
    if flags.get("text_encoder") is not None:
        if text_encoder is None:
            raise UsageError(f"--text-encoder given, but {path} is not a text-to-image checkpoint")
        text_encoder = flags["text_encoder"]  # another copy of the same encoder (e.g. a local directory offline)
    settings = SamplingSettings(model_name=name, image_size=image_size, vae=vae_name(vae),
                                latent_scale=ckpt.get("latent_scale", LATENT_SCALE),
                                diffusion_config=diffusion_config, weights=which,
                                step=int(ckpt.get("step", -1)), text_encoder=text_encoder,
                                timestep_range=_timestep_range(ckpt.get("args")))
    return model, state_dict, settings


def _timestep_range(args):
    """(LO, HI) a train.py run was restricted to (--timestep-range), or None."""
    value = args.get("timestep_range") if isinstance(args, dict) else None
    return tuple(int(v) for v in value) if value is not None else None


def _load_official(state_dict, args, flags, weights, path):
    """Official DiT / guided-diffusion / DTR release files: their args or config (or nothing) plus flags,
    defaults as released."""
    stored = {k: getattr(args, k, None) for k in SETTING_FLAGS} if args else {}
    value = {k: _resolve(k, stored.get(k), flags.get(k), path) for k in SETTING_FLAGS}
    name = value["model"] or OFFICIAL_DEFAULTS["model"]
    try:
        family = family_of(name)
    except ValueError as error:
        raise UsageError(f"--model: {error}") from None
    defaults = {**OFFICIAL_DEFAULTS, "num_classes": family.presets[name].get("num_classes", 1000),
                **RAW_STATE_DICT_DEFAULTS[family.constructor], "model": name}
    if carries_release_routing_tables(state_dict):
        defaults.update(RELEASE_DEFAULTS)
    value = {k: defaults[k] if v is None else v for k, v in value.items()}
    vae = flags.get("vae") or (getattr(args, "vae", None) if args else None) or defaults["vae"]
    pixel_space = defaults["vae"] == "none"
    if (vae == "none") != pixel_space:
        raise UsageError(f"--vae {vae} does not fit {path}: {name} checkpoints are "
                         f"{'pixel' if pixel_space else 'latent'}-space models")
    downsample = 1 if pixel_space else LATENT_DOWNSAMPLE
    if value["image_size"] % downsample != 0:
        raise UsageError(f"--image-size {value['image_size']} must be divisible by {downsample}")
    overrides = {**label_layout(family, state_dict, value["num_classes"]), **(flags.get("model_args") or {})}
    try:  # unknown or impossible --model-arg values, sizes the model cannot take
        model = create_model(name, **overrides, input_size=value["image_size"] // downsample,
                             num_classes=value["num_classes"], routing=value["routing"], alpha=value["alpha"],
                             beta=value["beta"], routing_seed=value["routing_seed"])
    except ValueError as error:
        raise UsageError(f"--model {name} does not build with these settings: {error}") from None
    diffusion_config = {"noise_schedule": value["noise_schedule"], "learn_sigma": model.learn_sigma}
    settings = SamplingSettings(model_name=name, image_size=value["image_size"], vae=vae_name(vae),
                                latent_scale=LATENT_SCALE, diffusion_config=diffusion_config, weights=weights)
    return model, state_dict, settings


def label_layout(family, state_dict, num_classes):
    """class_dropout_prob=0 for an ADM whose label table has no null-class row (guided-diffusion's release)."""
    table = state_dict.get("label_emb.weight")
    if family.constructor is ADM and table is not None and table.shape[0] == num_classes:
        return {"class_dropout_prob": 0.0}
    return {}


def load_checkpoint(path, flags=None, use_model_weights=False):
    """Build the model a checkpoint describes, load its (EMA) weights, return (model.eval(), settings).

    flags: {name: value or None} for SETTING_FLAGS, "vae" and "model_args" ({constructor argument: value},
    overrides for raw files); None means "not given on the command line".
    """
    flags = dict(flags or {})
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and "model_config" in ckpt:
        model, state_dict, settings = _load_ours(ckpt, flags, use_model_weights, path)
    elif isinstance(ckpt, dict) and ("ema" in ckpt or "model" in ckpt) and not _is_state_dict(ckpt):
        args = ckpt.get("args")
        args = argparse.Namespace(**args) if isinstance(args, dict) else args
        if isinstance(ckpt.get("config"), dict):  # the DTR / ANT releases: their Hydra config, as plain dicts
            settings = {k: v for k, v in release_settings(ckpt["config"]).items() if v is not None}
            args = argparse.Namespace(**{**vars(args or argparse.Namespace()), **settings})
        state_dict, which = _pick_weights(ckpt, use_model_weights, path)
        model, state_dict, settings = _load_official(state_dict, args, flags, which, path)
    elif _is_state_dict(ckpt):
        model, state_dict, settings = _load_official(ckpt, None, flags, "state_dict", path)
    else:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UsageError(f"{path}: not a DiT or ADM checkpoint (top level: {keys})")
    adopt_release_random_tables(model, state_dict)  # the release's R-TR: its unseeded masks are in the file
    check_state_dict_fits(model, state_dict, settings.model_name)
    try:
        model.load_state_dict(state_dict, strict=True)
    except ValueError as error:  # stored DTR masks that the routing flags / settings do not rebuild
        raise UsageError(f"cannot load {path}: {error}; give the --routing / --alpha / --beta it was trained with "
                         f"(--routing random takes the masks stored in the file)") from None
    return model.eval(), settings


def add_checkpoint_arguments(parser):
    """Flags shared by sample.py and sample_ddp.py that say which checkpoint and how to build it."""
    parser.add_argument("--ckpt", type=str, nargs="+", default=None,
                        help="our train.py checkpoint, an official DiT checkpoint, or a raw state_dict; several: "
                             "multi-experts (Table 6), each step sampled by the expert owning its timestep. Released "
                             "files by name (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt, 64x64_diffusion.pt) are "
                             "downloaded once; default: the released weights of --model / --image-size")
    add_pretrained_arguments(parser)
    parser.add_argument("--expert-range", type=int, nargs=2, action="append", metavar=("LO", "HI"), default=None,
                        help="timestep range of each --ckpt, in order (default: its train.py --timestep-range)")
    parser.add_argument("--allow-partial-expert", action="store_true",
                        help="sample every timestep with one --ckpt trained on a --timestep-range only (an error "
                             "otherwise: it never saw the other timesteps)")
    parser.add_argument("--use-model-weights", action="store_true",
                        help="sample the raw training weights instead of the EMA weights")
    # Defaults None: a flag given must agree with the checkpoint; raw state_dicts fall back to official DiT.
    parser.add_argument("--model", type=str, default=None,
                        help="zoo name, e.g. DiT-XL/2 or ADM-ImageNet64 (raw state_dicts; else from the checkpoint)")
    parser.add_argument("--image-size", type=int, default=None, help="pixels; official default 256")
    parser.add_argument("--num-classes", type=int, default=None, help="official default 1000")
    parser.add_argument("--routing", type=str, default=None, choices=ROUTING_KINDS,
                        help="none, dtr, dtr-paper, random (R-TR), cdtr or ercdt (raw state_dicts; else from the file)")
    parser.add_argument("--alpha", type=finite_float, default=None)
    parser.add_argument("--beta", type=finite_float, default=None)
    parser.add_argument("--routing-seed", type=int, default=None)
    parser.add_argument("--noise-schedule", type=str, default=None, help="linear (official DiT) or squaredcos_cap_v2 = cosine")
    parser.add_argument("--vae", type=str, default=None,
                        help="ema, mse, a diffusers name or a local path; 'none' for pixel-space models")
    add_model_arg(parser, help="constructor override of --model for raw state_dicts (repeatable), e.g. "
                               "model_channels=128; for our checkpoints it must agree with the stored config")
    parser.add_argument("--text-encoder", type=str, default=None,
                        help="text-to-image models: another copy of the checkpoint's CLIP encoder (a local directory)")
    return parser


def checkpoint_flags(args):
    """The {name: value} dict load_checkpoint takes, from parsed arguments."""
    return {k: getattr(args, k, None) for k in SETTING_FLAGS + ("vae", "model_args", "text_encoder")}
