"""
Training throughput of a DiT with and without task routing (paper App. E, Table 7: iterations/s).

    python benchmarks/train_throughput.py --model DiT-S/2 --batch-size 8 --threads 2          # CPU, fp32
    python benchmarks/train_throughput.py --model DiT-L/2 --batch-size 32 --mixed-precision bf16   # GPU

One training step is what train.py runs: forward + diffusion loss, backward, AdamW step, EMA update.
Reports images/s and peak memory for the routed model and the same model without routing, their ratio,
and the share of the machine's matmul peak: achieved FLOP/s of the training step (3x the forward FLOPs
counted by torch.utils.flop_counter.FlopCounterMode) over the FLOP/s of a large square matmul in the same
precision, measured in the same run.
"""
import argparse
import copy
import json
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion import create_diffusion
from models import ROUTING_KINDS, DiT_models, create_model
from train import update_ema

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device):
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device):
    """Peak accelerator memory allocated, or peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_peak_flops(size, dtype, device, seconds=2.0):
    """FLOP/s of repeated (size x size) @ (size x size) matmuls: 2 size^3 FLOPs each."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: thread pools, kernel selection
        a @ b
    synchronize(device)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
        if device.type == "cuda" and iters % 10:
            continue
        synchronize(device)
    synchronize(device)
    return 2 * size**3 * iters / (time.perf_counter() - start)


def forward_flops(model, x, t, y):
    """FLOPs of one forward pass as counted by FlopCounterMode (a multiply-add counts as 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return counter.get_total_flops()


def measure(args, routing, device):
    """images/s, seconds per step, peak memory and training FLOPs per step for one routing kind."""
    torch.manual_seed(0)
    model = create_model(args.model, input_size=args.input_size, in_channels=args.in_channels,
                         num_classes=args.num_classes, routing=routing, alpha=args.alpha, beta=args.beta).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = create_diffusion(timestep_respacing="", noise_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)  # as train.py
    dtype = DTYPES[args.mixed_precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    x = torch.randn(args.batch_size, args.in_channels, args.input_size, args.input_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        update_ema(ema, model, 0.9999)

    t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,), device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        flops = 3 * forward_flops(model, x, t, y)  # backward ~ 2x forward
    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    sec_per_step = (time.perf_counter() - start) / args.steps
    return {"routing": routing, "images_per_sec": args.batch_size / sec_per_step, "sec_per_step": sec_per_step,
            "peak_mem_gb": peak_memory_gb(device), "train_flops_per_step": flops,
            "achieved_flops_per_sec": flops / sec_per_step}


def main(args):
    """Benchmark the routed model and the unrouted baseline; print one JSON object."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py (official DiT)
        torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak_flops(args.matmul_size, DTYPES[args.mixed_precision], device)
    results = [measure(args, args.routing, device)]
    if args.routing != "none":
        results.append(measure(args, "none", device))
    for r in results:
        r["share_of_matmul_peak"] = r["achieved_flops_per_sec"] / peak
    report = {"model": args.model, "batch_size": args.batch_size, "input": [args.in_channels, args.input_size,
              args.input_size], "mixed_precision": args.mixed_precision, "device": str(device),
              "threads": torch.get_num_threads(), "matmul_peak_flops_per_sec": peak, "results": results}
    if len(results) == 2:
        report["images_per_sec_ratio_routed_to_unrouted"] = results[0]["images_per_sec"] / results[1]["images_per_sec"]
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default="DiT-S/2")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256px images)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mixed-precision", type=str, choices=list(DTYPES), default="no")
    parser.add_argument("--routing", type=str, choices=ROUTING_KINDS, default="dtr")
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--beta", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on GPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=2048)
    main(parser.parse_args())
