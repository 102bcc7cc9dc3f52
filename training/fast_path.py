"""How train.py runs the model fast: DDP settings, torch.compile per block and of the loss, mixed precision.

Mixed precision (--mixed-precision): autocast covers the model only; its output is cast to fp32 before
the diffusion loss, whose small differences of nearly equal numbers (eps - eps_hat, KL terms) bf16's
8-bit mantissa would round away. Parameters, gradients, the AdamW state and the EMA stay fp32.
"auto" (the default) is bf16 on a GPU that supports it and fp32 elsewhere: CPUs without bf16 units run
bf16 autocast many times slower than fp32 (24x measured on an AVX2 machine).
"""
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from models.compiled_blocks import compile_blocks

PRECISIONS = ("auto", "no", "bf16", "fp16")
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_mixed_precision(choice, device):
    """'auto' -> 'bf16' on a CUDA device with bf16 support, else 'no'; other choices are returned as given."""
    if choice not in PRECISIONS:
        raise ValueError(f"mixed precision must be one of {PRECISIONS}, got {choice!r}")
    if choice != "auto":
        return choice
    device = torch.device(device)
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def autocast_model(model, device_type, autocast_dtype):
    """model(x, t, **kw) under autocast to autocast_dtype (None: as is), its output cast to fp32 for the loss."""
    if autocast_dtype is None:
        return model

    def run(x, t, **kwargs):
        with torch.autocast(device_type, dtype=autocast_dtype):
            out = model(x, t, **kwargs)
        return out.float()

    return run


def wrap_ddp(model, device, world_size, force=False):
    """DDP around the model when world_size > 1, set up to copy as little as it can.

    gradient_as_bucket_view: gradients live in the all-reduce buckets (no second copy: 2.7 GB for DiT-XL/2);
    static_graph: every step uses every parameter in the same order (label / caption dropout selects rows
    with torch.where, never skips a layer), which lets DDP overlap the all-reduces with activation
    checkpointing; broadcast_buffers=False: the only buffers (routing tables) are fixed and built alike on
    every rank, re-sending them cost 25 to 32 MB per step. force: wrap even a single process (checks).
    """
    if world_size == 1 and not force:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
               gradient_as_bucket_view=True, static_graph=True)


def compile_for_training(model, diffusion, **compile_kwargs):
    """torch.compile each repeated block of the model (inside DDP) and the diffusion loss; returns blocks compiled.

    Compiling the DDP-wrapped model whole would split the graph at every DDP bucket and leave the loss eager.
    """
    count = compile_blocks(model, **compile_kwargs)
    diffusion.compile_loss_terms(**compile_kwargs)
    return count
