"""
Training throughput of a DiT or ADM with and without task routing (paper App. E, Table 7: iterations/s).

    python -m benchmarks.train_throughput --model DiT-S/2 --batch-size 8 --threads 2          # CPU, fp32
    python -m benchmarks.train_throughput --model DiT-L/2 --batch-size 32 --mixed-precision bf16   # GPU
    python -m benchmarks.train_throughput --model ADM-ImageNet64 --batch-size 32 --mixed-precision bf16
    python -m benchmarks.train_throughput --model ADM-ImageNet64 --model-arg model_channels=64 --batch-size 4

The model is any zoo name of models.create_model, at its preset input (DiT: 32x32x4 latents of 256px images;
ADM: 64x64x3 pixels) unless --input-size / --in-channels say otherwise; --model-arg overrides any other
constructor argument (a reduced size on CPU).

Text-to-image (MS-COCO setting, App. C): a TextDiT-* name adds the caption variants, all timed in the same rounds:
    python -m benchmarks.train_throughput --model TextDiT-B/2 --text-encoder openai/clip-vit-large-patch14
times the text DiT with captions encoded by the frozen CLIP encoder on the fly (train.py's default) and with
precomputed token embeddings (already in memory: reading them from disk is not counted), with and without
routing, next to the class-conditional DiT of the same size (paired: the same round), and the encoder alone,
whose time over the on-the-fly step is the encoder's share of a step.

One training step is what train.py runs: forward + diffusion loss, backward, AdamW step, EMA update.
Reports images/s and peak memory for the routed model and the same model without routing, their ratio,
and the share of the machine's matmul peak: achieved FLOP/s of the training step (3x the forward FLOPs
counted by torch.utils.flop_counter.FlopCounterMode, attention included) over the FLOP/s of a large square matmul in the same
precision, measured in the same run. Steps of both models and matmul bursts are interleaved and the fastest
of each is reported (medians too), so a machine shared with other jobs biases them alike.
"""
import argparse
import json
import statistics

import torch

from foundation.flag_types import finite_float
from launch.model_args import add_model_arg
from models import ROUTING_KINDS, model_names
from models.routing import DTR_ALPHA, DTR_BETA
from training.step_cost import DTYPES, benchmark_captions, build_training_step, synchronize, timed


def reset_peak_memory(device):
    """Start a new peak-memory window (CUDA allocator stats; on Linux CPU, the process's VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size


def peak_memory_gb(device):
    """Peak accelerator memory allocated, or peak resident memory of this process on CPU, since the reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def build_matmul(size, dtype, device, repeats=4):
    """(burst of `repeats` square matmuls, its FLOPs: 2 size^3 each)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def burst():
        for _ in range(repeats):
            a @ b
    return burst, 2 * size**3 * repeats


def main(args):
    """Benchmark the routed model and the unrouted baseline; print one JSON object."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py (official DiT)
        torch.backends.cudnn.allow_tf32 = True
    routings = [args.routing] + (["none"] if args.routing != "none" else [])
    encoder = None
    if args.model.startswith("TextDiT-"):  # the main comparison on precomputed tokens; the rest in text_benchmark
        from models.text_encoder import FrozenCLIPTextEncoder
        encoder = FrozenCLIPTextEncoder(args.text_encoder).to(device)

    # Peak memory: each model alone, a few steps after a fresh start of the peak window.
    memory = {}
    for routing in routings:
        reset_peak_memory(device)
        step, _, _ = build_training_step(args, routing, device, encoder=encoder)
        for _ in range(2):
            step()
        synchronize(device)
        memory[routing] = peak_memory_gb(device)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # Throughput: steps of both models and matmul bursts interleaved round by round, so load from other
    # processes on a shared machine hits all of them alike; the fastest round estimates the unloaded speed.
    steps = {routing: build_training_step(args, routing, device, encoder=encoder) for routing in routings}
    burst, burst_flops = build_matmul(args.matmul_size, DTYPES[args.mixed_precision], device)
    times = {routing: [] for routing in routings}
    matmul_times = []
    for round_index in range(args.warmup + args.steps):
        for routing, (step, _, _) in steps.items():
            seconds = timed(step, device)
            if round_index >= args.warmup:
                times[routing].append(seconds)
        seconds = timed(burst, device)
        if round_index >= args.warmup:
            matmul_times.append(seconds)
    peak = burst_flops / min(matmul_times)
    results = []
    for routing in routings:
        best, median = min(times[routing]), statistics.median(times[routing])
        flops = steps[routing][1]
        results.append({"routing": routing, "images_per_sec": args.batch_size / best,
                        "images_per_sec_median": args.batch_size / median, "sec_per_step": best,
                        "peak_mem_gb": memory[routing], "train_flops_per_step": flops,
                        "achieved_flops_per_sec": flops / best, "share_of_matmul_peak": flops / best / peak})
    probe = steps[routings[0]][2]
    report = {"model": args.model, "model_args": args.model_args or {}, "parameters": probe["parameters"],
              "batch_size": args.batch_size, "input": probe["input"], "mixed_precision": args.mixed_precision,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "compile": args.compile, "rounds": args.steps,
              "matmul_peak_flops_per_sec": peak, "matmul_size": args.matmul_size, "results": results}
    if len(results) == 2:
        routed, unrouted = times[routings[0]], times["none"]
        report["images_per_sec_ratio_routed_to_unrouted"] = results[0]["images_per_sec"] / results[1]["images_per_sec"]
        # step time with routing over without, per round (the two steps of a round ran back to back), median
        report["step_time_ratio_routed_to_unrouted_paired"] = statistics.median(a / b for a, b in zip(routed, unrouted))
    if encoder is not None:
        report.update(text_benchmark(args, routings, device, encoder, steps))
    print(json.dumps(report, indent=1))
    return report


def text_benchmark(args, routings, device, encoder, text_steps):
    """Text model: encoder on the fly vs precomputed tokens, against the class DiT of the same size (paired rounds).

    text_steps: main's {routing: (step, flops, info)} of the text model, reused (one model per routing in memory).
    """
    class_model = args.model[len("Text"):]  # TextDiT-B/2 -> DiT-B/2
    timers, flops = {}, {}
    for routing in routings:
        step, text_flops, _ = text_steps[routing]
        timers[f"text/{routing}/on-the-fly"] = lambda step=step: step(on_the_fly=True)
        timers[f"text/{routing}/precomputed"] = step
        flops[f"text/{routing}/on-the-fly"] = flops[f"text/{routing}/precomputed"] = text_flops
        timers[f"class/{routing}"], flops[f"class/{routing}"], _ = build_training_step(args, routing, device,
                                                                                      class_model)
    captions = benchmark_captions(args.batch_size)
    timers["encoder"] = lambda: encoder(captions)  # tokenizer + frozen CLIP forward
    times = {name: [] for name in timers}
    for round_index in range(args.warmup + args.steps):
        for name, fn in timers.items():
            seconds = timed(fn, device)
            if round_index >= args.warmup:
                times[name].append(seconds)

    def paired(a, b):  # median over rounds of the per-round ratio (both ran back to back in each round)
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    report = {"text_encoder": args.text_encoder, "text_sec_per_step": {k: min(v) for k, v in times.items()},
              "text_train_flops_per_step": flops}
    for routing in routings:
        report[f"text_over_class_step_time_{routing}"] = paired(f"text/{routing}/precomputed", f"class/{routing}")
        report[f"on_the_fly_over_precomputed_step_time_{routing}"] = paired(f"text/{routing}/on-the-fly",
                                                                            f"text/{routing}/precomputed")
        report[f"encoder_share_of_on_the_fly_step_{routing}"] = paired("encoder", f"text/{routing}/on-the-fly")
    if len(routings) == 2:
        report["text_step_time_routed_over_unrouted"] = paired(f"text/{routings[0]}/precomputed", "text/none/precomputed")
    return report


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", type=str, choices=model_names(), default="DiT-S/2",
                        help="a TextDiT-* name adds the text-to-image variants (see above)")
    parser.add_argument("--text-encoder", type=str, default="openai/clip-vit-large-patch14",
                        help="TextDiT-*: the frozen CLIP text encoder, a hub name or a local directory")
    add_model_arg(parser, help="override a constructor argument, e.g. model_channels=64 (repeatable)")
    parser.add_argument("--input-size", type=int, default=None, help="default: the preset's (DiT 32 = 256px latents, ADM 64)")
    parser.add_argument("--in-channels", type=int, default=None, help="default: the preset's (DiT 4, ADM 3)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the preset's (1000; ADM-FFHQ64 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mixed-precision", type=str, choices=list(DTYPES), default="no")
    parser.add_argument("--routing", type=str, choices=ROUTING_KINDS, default="dtr")
    parser.add_argument("--alpha", type=finite_float, default=DTR_ALPHA)
    parser.add_argument("--beta", type=finite_float, default=DTR_BETA)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, as train.py --compile")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on GPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each model per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=2048)
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
