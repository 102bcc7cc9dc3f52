"""The flags of sample.py and sample_ddp.py that say which checkpoint to load and how to build it."""
from foundation.flag_types import finite_float
from launch.model_args import add_model_arg
from models import ROUTING_KINDS
from sampling.model_from_checkpoint import SETTING_FLAGS
from storage.pretrained import add_pretrained_arguments


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
