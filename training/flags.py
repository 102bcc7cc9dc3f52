"""train.py's command line: its flags (official DiT's names, the paper's defaults, App. C), a YAML --config beneath
them (launch/yaml_config.py), and the checks of flag values that run before anything is read or written."""
import argparse
import math
import os

from diffusion import PAPER_SCHEDULE, SCHEDULES, WEIGHTINGS
from foundation.flag_types import check_at_least, finite_float
from foundation.usage_error import UsageError
from imagedata import KINDS as DATA_KINDS
from launch.model_args import add_model_arg
from launch.process_group import add_launch_arguments, default_num_workers
from launch.yaml_config import parse_with_config
from models import ROUTING_KINDS, TextDiT, check_overrides, family_of, model_names
from models.routing import DTR_ALPHA, DTR_BETA, NUM_TIMESTEPS
from monitoring.tensorboard_log import tensorboard_available
from training.fast_path import PRECISIONS
from training.lr_schedule import LR_SCHEDULES

DESCRIPTION = "Train a DiT, ADM or text DiT, optionally with Denoising Task Routing, using PyTorch DDP (train.py)."
# Constructor arguments train.py sets itself (from the data or a flag); --model-arg may not set them.
MODEL_ARGS_SET_BY_TRAIN = {"input_size": "--image-size and the data", "in_channels": "the data",
                           "num_classes": "--num-classes", "learn_sigma": "train.py (learned variances, as the paper)",
                           "routing": "--routing", "alpha": "--alpha", "beta": "--beta",
                           "routing_seed": "--routing-seed", "grad_checkpointing": "--grad-checkpointing",
                           "context_dim": "--text-encoder", "max_text_len": "--text-encoder"}


def build_parser():
    """Command-line flags; names follow official DiT train.py, defaults are the paper's (App. C)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file whose keys (flag names, - or _) set defaults; the command line wins")
    data = parser.add_argument_group("data")
    data.add_argument("--data-path", type=str, default=None, help="image folders, flat folder or Fashion-MNIST IDX")
    data.add_argument("--feature-path", type=str, default=None, help="latents written by extract_features.py")
    data.add_argument("--data-kind", type=str, choices=DATA_KINDS, default="auto",
                      help="how --data-path is laid out; auto-detected, but FFHQ's nested 00000/... folders need "
                           "flat (one unconditional class), ImageNet's class folders are imagefolder")
    data.add_argument("--image-size", type=int, default=256)
    data.add_argument("--num-classes", type=int, default=1000, help="1 = unconditional (FFHQ)")
    data.add_argument("--vae", type=str, default="ema",
                      help="'none' trains on --data-path images in pixel space (required there: images are not "
                           "encoded on the fly). With --feature-path the VAE named in the latents' manifest "
                           "(extract_features.py --vae) is used and recorded in checkpoints; other values are ignored")
    data.add_argument("--skip-bad-images", action=argparse.BooleanOptionalAction, default=False,
                      help="an image that fails to decode mid-run is replaced by the next readable one (logged) "
                           "instead of stopping the run after a checkpoint")
    data.add_argument("--num-workers", type=int, default=default_num_workers(),
                      help="data-loader processes per rank; default: 4 (official DiT), or the CPUs available if fewer")
    data.add_argument("--captions", type=str, default=None,
                      help="text models: MS-COCO captions_*.json of the training images (annotations/captions_train2014.json)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", type=str, choices=model_names(), default="DiT-XL/2")
    add_model_arg(model, help="override a constructor argument of --model, e.g. hidden_size=64 or channel_mult=[1,2] "
                              "(repeatable; VALUE is read as YAML; in a config: a model_args mapping)")
    model.add_argument("--routing", type=str, choices=ROUTING_KINDS, default="none",
                       help="none = vanilla; dtr = DTR (Sec. 4, as the authors' code); dtr-paper = Eq. 4 as printed; "
                            "random = R-TR (Sec. 4.2); cdtr, ercdt = the clustered variants of App. F")
    model.add_argument("--alpha", type=finite_float, default=DTR_ALPHA, help="DTR window shift exponent (Eq. 4)")
    model.add_argument("--beta", type=finite_float, default=DTR_BETA, help="share of active channels per task")
    model.add_argument("--routing-seed", type=int, default=0, help="seed of the R-TR masks")
    model.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    model.add_argument("--text-encoder", type=str, default="openai/clip-vit-large-patch14",
                       help="text models: frozen CLIP text encoder, a hub name or a local directory (recorded in "
                            "checkpoints)")
    diff = parser.add_argument_group("diffusion")
    diff.add_argument("--noise-schedule", type=str, choices=SCHEDULES, default=PAPER_SCHEDULE,
                      help="squaredcos_cap_v2 or its other name cosine (paper); linear = official DiT")
    diff.add_argument("--loss-weighting", type=str, choices=WEIGHTINGS, default="vanilla")
    diff.add_argument("--timestep-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                      help="train on t in [LO, HI] only: one expert of the multi-experts baseline (Table 6)")
    diff.add_argument("--snr-gamma", type=finite_float, default=5.0, help="Min-SNR gamma")
    diff.add_argument("--p2-k", type=finite_float, default=1.0)
    diff.add_argument("--p2-gamma", type=finite_float, default=1.0)
    diff.add_argument("--ant-num-clusters", type=int, default=8, help="ANT-UW timestep clusters")
    diff.add_argument("--ant-lr", type=finite_float, default=0.025, help="ANT-UW lr of the log-variances s_k")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--results-dir", type=str, default="results")
    optim.add_argument("--epochs", type=int, default=1400)
    optim.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    optim.add_argument("--global-batch-size", type=int, default=256)
    optim.add_argument("--global-seed", type=int, default=0)
    optim.add_argument("--lr", type=finite_float, default=1e-4)
    optim.add_argument("--lr-schedule", type=str, choices=LR_SCHEDULES, default="constant",
                       help="constant (the paper) or cosine: decay to zero at the last step (training/lr_schedule.py)")
    optim.add_argument("--warmup-steps", type=int, default=0, help="linear lr warmup over this many steps")
    optim.add_argument("--ema-decay", type=finite_float, default=0.9999)
    optim.add_argument("--mixed-precision", type=str, choices=PRECISIONS, default="auto",
                       help="auto = bf16 on a GPU that supports it, fp32 (no) elsewhere; the model runs under "
                            "autocast, the loss, gradients, AdamW state and EMA stay fp32")
    optim.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    optim.add_argument("--log-every", type=int, default=100)
    optim.add_argument("--ckpt-every", type=int, default=50_000)
    run = parser.add_argument_group("run folder and resume")
    run.add_argument("--exp-name", type=str, default=None,
                     help="run folder <results-dir>/NAME (default: a new <results-dir>/NNN-<model>)")
    run.add_argument("--resume", type=str, default=None,
                     help="checkpoint to continue (in its run folder), or 'auto': the newest complete checkpoint "
                          "of --exp-name's folder, starting fresh if there is none (requeued jobs)")
    run.add_argument("--keep-last", type=int, default=None,
                     help="keep only the K newest checkpoints (default: keep all), plus --keep-every's milestones")
    run.add_argument("--keep-every", type=int, default=None,
                     help="with --keep-last: never delete checkpoints whose step is a multiple of this")
    watch = parser.add_argument_group("monitoring")
    watch.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                       help="TensorBoard scalars in <run>/tensorboard (needs the tensorboard extra)")
    watch.add_argument("--sample-every", type=int, default=None,
                       help="every N steps, a 4x4 grid of EMA samples (DDIM-50) in <run>/samples/<step>.png")
    add_launch_arguments(parser)
    return parser


def parse_args(argv=None):
    """Parse train.py's flags, with --config FILE.yaml supplying values that the command line overrides."""
    return parse_with_config(build_parser(), argv)


def model_overrides(args):
    """{constructor argument: value} from --model-arg KEY=VALUE (and a config's model_args); the last wins."""
    return dict(args.model_args or {})


def is_text_model(name):
    """Whether zoo name `name` is a text-to-image model (captions instead of class labels)."""
    return family_of(name).constructor is TextDiT


def check_data_paths(args):
    """Clear errors for a missing or empty data folder, before anything is built or written."""
    if (args.data_path is None) == (args.feature_path is None):
        raise UsageError("give exactly one of --data-path (images) or --feature-path (precomputed latents)")
    for flag in ("data_path", "feature_path"):
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(path):
            raise UsageError(f"--{flag.replace('_', '-')} does not exist or is not a directory: {path}")
        if path is not None and not os.listdir(path):
            raise UsageError(f"--{flag.replace('_', '-')} is empty: {path}")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise UsageError(f"--resume checkpoint not found: {args.resume}")


def validate_args(args):
    """Clear errors for flag values that would fail later (or silently do the wrong thing); no file access."""
    if args.model not in model_names():
        raise UsageError(f"unknown model {args.model!r}; expected one of {', '.join(model_names())}")
    overrides = model_overrides(args)
    try:
        check_overrides(args.model, overrides)
    except ValueError as error:
        raise UsageError(str(error)) from None
    for key in overrides:
        if key in MODEL_ARGS_SET_BY_TRAIN:
            raise UsageError(f"--model-arg {key}=... is set by {MODEL_ARGS_SET_BY_TRAIN[key]}, not by --model-arg")
    if is_text_model(args.model) and args.captions is None:
        raise UsageError(f"--model {args.model} is a text-to-image model: give --captions "
                         f"(MS-COCO annotations/captions_train2014.json)")
    if is_text_model(args.model) and args.sample_every is not None:
        raise UsageError("--sample-every draws class-label grids; for a text model sample its checkpoints with "
                         "sample.py --prompt")
    if args.captions is not None and not is_text_model(args.model):
        raise UsageError(f"--captions is for text-to-image models (TextDiT-*), not --model {args.model}")
    if args.routing not in ROUTING_KINDS:
        raise UsageError(f"unknown routing {args.routing!r}; expected one of {', '.join(ROUTING_KINDS)}")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise UsageError(f"--alpha must be a finite number > 0, got {args.alpha}")
    if not 0 < args.beta <= 1:
        raise UsageError(f"--beta must lie in (0, 1], got {args.beta}")
    if args.feature_path is not None and args.vae == "none":
        raise UsageError("--vae none trains in pixel space; it cannot be combined with --feature-path latents")
    check_at_least(args, 1, "global_batch_size", "log_every", "ckpt_every", "epochs", "image_size", "num_classes",
                   "keep_last", "keep_every", "sample_every", "max_steps", "ant_num_clusters")
    if args.resume == "auto" and args.exp_name is None:
        raise UsageError("--resume auto needs --exp-name NAME: a numbered run folder is new at every start")
    if args.exp_name is not None and (not args.exp_name or os.sep in args.exp_name or args.exp_name in (".", "..")):
        raise UsageError(f"--exp-name must be a folder name without '{os.sep}', got {args.exp_name!r}")
    if args.exp_name is not None and args.resume not in (None, "auto"):
        own = os.path.dirname(os.path.dirname(os.path.abspath(args.resume)))
        if own != os.path.abspath(os.path.join(args.results_dir, args.exp_name)):
            raise UsageError(f"--resume {args.resume} continues in its own run folder {own}, not --exp-name "
                             f"{args.exp_name}; drop --exp-name, or use --resume auto")
    if args.tensorboard and not tensorboard_available():
        raise UsageError("--tensorboard needs the tensorboard package: pip install -e \".[tensorboard]\"")
    if args.keep_every is not None and args.keep_last is None:
        raise UsageError("--keep-every only spares checkpoints from --keep-last pruning; give --keep-last K too")
    if not 0 <= args.ema_decay <= 1:
        raise UsageError(f"--ema-decay must lie in [0, 1], got {args.ema_decay}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    check_at_least(args, 0, "warmup_steps")
    if args.lr_schedule == "cosine" and args.max_steps is not None and args.max_steps <= args.warmup_steps:
        raise UsageError(f"--lr-schedule cosine decays after the warmup: --max-steps {args.max_steps} must exceed "
                         f"--warmup-steps {args.warmup_steps}")
    for flag in ("snr_gamma", "p2_k", "p2_gamma", "ant_lr"):  # loss weightings (diffusion/loss_weighting.py)
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be a finite number > 0, got {getattr(args, flag)}")
    if args.timestep_range is not None:
        lo, hi = args.timestep_range
        if not 0 <= lo <= hi < NUM_TIMESTEPS:
            raise UsageError(f"--timestep-range must satisfy 0 <= LO <= HI < {NUM_TIMESTEPS}, got {lo} {hi}")
        if args.loss_weighting == "ant-uw":
            raise UsageError("--timestep-range cannot be combined with --loss-weighting ant-uw (its clusters span all t)")
