"""One train.py step of a fresh model, its wall time and its FLOPs (benchmarks/train_throughput.py, analysis/cost.py).

One training step is what train.py runs: forward + diffusion loss, backward, AdamW step, EMA update.
"""
import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from diffusion import PAPER_SCHEDULE, create_diffusion
from models import create_model
from training.ema import EMAUpdater
from training.fast_path import autocast_model, compile_for_training

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device):
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds one call of fn takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def best_of(fn, rounds, device=torch.device("cpu")):
    """Fastest of `rounds` timed calls of fn (the least disturbed by other load)."""
    return min(timed(fn, device) for _ in range(rounds))


def cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs):
    """FLOPs of the CPU flash-attention kernel, which FlopCounterMode has no formula for (~10% of DiT-S/2)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def forward_flops(model, x, t, model_kwargs):
    """FLOPs of one forward pass as counted by FlopCounterMode (a multiply-add counts as 2).

    DiT-S/2 at 32x32x4 counts 12.1 GFLOPs per image, i.e. the DiT paper's 6.06 GFLOPs of multiply-adds.
    """
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        model(x, t, **model_kwargs)
    return counter.get_total_flops()


def benchmark_captions(n, seed=0):
    """n COCO-like captions of 8 to 15 words (about the length of real COCO captions)."""
    words = ("a man woman dog cat red blue bus train plate of food on the table street sitting next to "
             "large small white black two people standing in front with field grass kitchen").split()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 16, (n,), generator=g).tolist()
    return [" ".join(words[i] for i in torch.randint(len(words), (k,), generator=g).tolist()) for k in lengths]


def build_training_step(args, routing, device, model_name=None, encoder=None):
    """(step function, training FLOPs per step, {parameters, input}): one train.py step of a fresh model.

    model_name: default --model. With a text `encoder` the model is a text DiT: step() conditions on precomputed
    tokens of fixed captions, step(on_the_fly=True) encodes the captions in the step, as train.py does.
    """
    text = encoder is not None
    torch.manual_seed(0)
    keys = ("input_size", "in_channels") + (() if text else ("num_classes",))
    shape = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if text:
        shape.update(context_dim=encoder.width, max_text_len=encoder.max_length)
    model = create_model(model_name or args.model, **(args.model_args or {}), **shape, routing=routing,
                         alpha=args.alpha, beta=args.beta).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = create_diffusion(timestep_respacing="", noise_schedule=PAPER_SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)  # as train.py
    dtype = DTYPES[args.mixed_precision]
    if args.compile:  # as train.py --compile: each block and the loss
        compile_for_training(model, diffusion)
    net = autocast_model(model, device.type, None if dtype == torch.float32 else dtype)  # fp32 output, as train.py
    ema_update = EMAUpdater(ema, model)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    x = torch.randn(args.batch_size, model.in_channels, model.input_size, model.input_size, device=device)
    if not text:
        y = torch.randint(0, model.num_classes, (args.batch_size,), device=device)
    else:
        captions = benchmark_captions(args.batch_size)
        drop = torch.zeros(args.batch_size, dtype=torch.long, device=device)
        context, context_mask = encoder(captions)  # the precomputed tokens, already in memory

    def condition(on_the_fly=False):
        if not text:
            return {"y": y}
        if on_the_fly:  # as train.py: the frozen encoder runs on the step's captions every step
            return dict(zip(("context", "context_mask"), encoder(captions)), force_drop_ids=drop)
        return {"context": context, "context_mask": context_mask, "force_drop_ids": drop}

    def step(on_the_fly=False):
        t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,), device=device)
        loss = diffusion.training_losses(net, x, t, condition(on_the_fly))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ema_update(0.9999)

    t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,), device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        flops = 3 * forward_flops(model, x, t, condition())  # backward ~ 2x forward (the frozen encoder: none)
    return step, flops, {"parameters": sum(p.numel() for p in model.parameters()), "input": list(x.shape[1:])}
