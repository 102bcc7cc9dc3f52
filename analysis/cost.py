"""Cost of DTR for the zoo (Table 7, App. E): parameters, forward GFLOPs, training images/s with and without DTR.

    python -m analysis.cost --models DiT-S/2 DiT-B/2 --batch-size 4 --out cost.md    # measured on this machine

DTR adds no parameters and only a mask multiply per block, so its FLOPs equal the vanilla model's; what it can
cost is wall time. Training steps are train.py's (training/step_cost.py: forward + loss, backward, AdamW,
EMA); the vanilla and DTR steps alternate round by round and the fastest round of each is reported, so load from
other processes on a shared machine hits both alike; the range of the per-round ratio is printed beside it. FLOPs are FlopCounterMode's (a multiply-add counts 2).
"""
import argparse
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

from foundation.atomic_file import atomic_write
from foundation.flag_types import check_at_least, finite_float
from foundation.usage_error import UsageError
from launch.cli import run_command
from models import DiT_models, create_model, model_names
from models.routing import DTR_ALPHA, DTR_BETA
from training.step_cost import build_training_step, forward_flops, timed

MIN_WARMUP = 1  # untimed steps per model: the first one allocates, picks kernels and warms caches
MIN_ROUNDS = 3  # timed steps per model: the fastest of fewer says nothing about a few-percent difference


def model_cost(name, input_size, in_channels, num_classes):
    """(parameters, forward GFLOPs per image) of a zoo model (vanilla; DTR has the same of both).

    Counted on the meta device: shapes alone fix both numbers, so no weights are initialised (DiT-XL/2: 675M).
    """
    with torch.device("meta"):
        model = create_model(name, input_size=input_size, in_channels=in_channels, num_classes=num_classes).eval()
        x = torch.zeros(1, in_channels, input_size, input_size)
        t, y = torch.tensor([500]), torch.tensor([0])
        return sum(p.numel() for p in model.parameters()), forward_flops(model, x, t, {"y": y}) / 1e9


def training_speed(name, args, device):
    """{routing: training images/s} for vanilla and DTR: fastest of args.rounds interleaved rounds."""
    config = SimpleNamespace(model=name, model_args=None, input_size=args.input_size, in_channels=args.in_channels,
                             num_classes=args.num_classes, alpha=args.alpha, beta=args.beta, compile=False,
                             mixed_precision="no", batch_size=args.batch_size)
    steps = {routing: build_training_step(config, routing, device)[0] for routing in ("none", "dtr")}
    seconds = {routing: [] for routing in steps}
    for round_index in range(args.warmup + args.rounds):
        for routing, step in steps.items():
            elapsed = timed(step, device)
            if round_index >= args.warmup:
                seconds[routing].append(elapsed)
    # per round, DTR / vanilla images/s: its range says how far the machine's noise moves the reported ratio
    ratios = [none / dtr for none, dtr in zip(seconds["none"], seconds["dtr"])]
    return {**{routing: args.batch_size / min(values) for routing, values in seconds.items()},
            "ratio_range": (min(ratios), max(ratios))}


def cost_table(rows, args, device, threads):
    """Markdown: one row per model, the measuring machine and settings underneath."""
    lines = ["| model | params (M) | forward GFLOPs | train images/s vanilla | train images/s DTR | DTR / vanilla "
             "(range over rounds) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        low, high = row["ratio_range"]
        lines.append(f"| {row['model']} | {row['params'] / 1e6:.1f} | {row['gflops']:.2f} | {row['none']:.2f} | "
                     f"{row['dtr']:.2f} | {row['dtr'] / row['none']:.3f} ({low:.3f}-{high:.3f}) |")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} thread(s)"
    lines += ["", f"Input {args.in_channels}x{args.input_size}x{args.input_size}, {args.num_classes} classes; "
              f"training batch {args.batch_size}, fp32, {where}; fastest of {args.rounds} interleaved rounds after "
              f"{args.warmup} warm-up; DTR alpha {args.alpha:g}, beta {args.beta:g}. Parameters and FLOPs are the "
              "same with and without DTR (the masks are fixed buffers, not parameters)."]
    return "\n".join(lines) + "\n"


def main(args):
    """Measure every requested model and write (and print) the markdown table."""
    unknown = [m for m in args.models if m not in model_names()]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)}; expected names from {', '.join(model_names())}")
    check_at_least(args, 1, "batch_size", "rounds", "input_size", "in_channels", "num_classes", "threads")
    if args.warmup < MIN_WARMUP or args.rounds < MIN_ROUNDS:
        # without a warm-up the model timed first pays the one-time setup: --warmup 0 --rounds 1 shows DTR ~2x faster
        raise UsageError(f"--warmup {args.warmup} --rounds {args.rounds} is too small to time anything: the first "
                         f"step of a model pays one-time setup, and the fastest of fewer than {MIN_ROUNDS} rounds is "
                         f"noise; give --warmup >= {MIN_WARMUP} --rounds >= {MIN_ROUNDS}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = []
    for name in tqdm(args.models, desc="models"):
        start = time.time()
        params, gflops = model_cost(name, args.input_size, args.in_channels, args.num_classes)
        rows.append({"model": name, "params": params, "gflops": gflops, **training_speed(name, args, device),
                     "seconds": time.time() - start})
    table = cost_table(rows, args, device, torch.get_num_threads())
    if args.out:
        atomic_write(args.out, lambda f: f.write(table), mode="w")
    print(table)
    return rows


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=str, nargs="+", default=list(DiT_models), help="zoo names; default all")
    parser.add_argument("--input-size", type=int, default=32, help="latent side: 32 = 256px images (SD VAE)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=4, help="training images per step")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--alpha", type=finite_float, default=DTR_ALPHA)
    parser.add_argument("--beta", type=finite_float, default=DTR_BETA)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--device", type=str, default=None)
    parser.add_argument("--out", type=str, default=None, help="also write the markdown here")
    return parser


if __name__ == "__main__":
    run_command(main, build_parser())
