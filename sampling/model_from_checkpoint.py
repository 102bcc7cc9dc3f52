"""Build the model a checkpoint describes and load its weights, for sampling (sample.py, sample_ddp.py, analysis).

Four formats are read (storage.checkpoint.read_checkpoint opens them safely):
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
from dataclasses import dataclass, field

import torch

from foundation.usage_error import UsageError
from models import ADM, DiT, build_from_config, create_model, family_of
from models.routing import DTR_ALPHA, DTR_BETA, TaskRouter
from models.vae import LATENT_DOWNSAMPLE, LATENT_SCALE, vae_name
from storage.authors_checkpoint import carries_release_routing_tables, release_settings
from storage.checkpoint import read_checkpoint


# Official DiT's defaults, used only for files that do not say how they were trained.
OFFICIAL_DEFAULTS = {
    "model": "DiT-XL/2", "image_size": 256, "num_classes": 1000, "routing": "none",
    "alpha": DTR_ALPHA, "beta": DTR_BETA, "routing_seed": 0, "noise_schedule": "linear",
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


def adopt_release_random_tables(model, state_dict):
    """An R-TR model (routing "random") takes the mask tables a release file stores for each block; returns how many.

    The release drew R-TR masks unseeded, so our seeded tables cannot match them: the stored ones are the model's.
    Our own checkpoints store no tables (they are rebuilt from routing_seed), so their R-TR is left as built.
    """
    if model.config.get("routing") != "random" or not carries_release_routing_tables(state_dict):
        return 0
    adopted = 0
    for name, module in model.named_modules():
        key = f"{name}._unit_mapping"
        if isinstance(module, TaskRouter) and key in state_dict:
            try:
                module.adopt_table(state_dict[key])
            except ValueError as error:
                raise UsageError(f"the checkpoint's R-TR masks {key}: {error}") from None
            adopted += 1
    return adopted


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
