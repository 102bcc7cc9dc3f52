"""
Training throughput of a DiT or ADM with and without task routing (paper App. E, Table 7: iterations/s).

    python benchmarks/train_throughput.py --model DiT-S/2 --batch-size 8 --threads 2          # CPU, fp32
    python benchmarks/train_throughput.py --model DiT-L/2 --batch-size 32 --mixed-precision bf16   # GPU
    python benchmarks/train_throughput.py --model ADM-ImageNet64 --batch-size 32 --mixed-precision bf16
    python benchmarks/train_throughput.py --model ADM-ImageNet64 --model-arg model_channels=64 --batch-size 4

The model is any zoo name of models.create_model, at its preset input (DiT: 32x32x4 latents of 256px images;
ADM: 64x64x3 pixels) unless --input-size / --in-channels say otherwise; --model-arg overrides any other
constructor argument (a reduced size on CPU).

Text-to-image (MS-COCO setting, App. C): a TextDiT-* name adds the caption variants, all timed in the same rounds:
    python benchmarks/train_throughput.py --model TextDiT-B/2 --text-encoder openai/clip-vit-large-patch14
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
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere
from diffusion import create_diffusion  # noqa: E402
from launch.cli import finite_float  # noqa: E402
from launch.model_args import add_model_arg  # noqa: E402
from models import ROUTING_KINDS, create_model, model_names  # noqa: E402
from train import update_ema  # noqa: E402

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device):
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def timed(fn, device):
    """Seconds one call of fn takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


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
    diffusion = create_diffusion(timestep_respacing="", noise_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)  # as train.py
    net = torch.compile(model) if args.compile else model  # as train.py --compile
    dtype = DTYPES[args.mixed_precision]
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
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = diffusion.training_losses(net, x, t, condition(on_the_fly))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        update_ema(ema, model, 0.9999)

    t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,), device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        flops = 3 * forward_flops(model, x, t, condition())  # backward ~ 2x forward (the frozen encoder: none)
    return step, flops, {"parameters": sum(p.numel() for p in model.parameters()), "input": list(x.shape[1:])}


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
    parser.add_argument("--alpha", type=finite_float, default=4.0)
    parser.add_argument("--beta", type=finite_float, default=0.8)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, as train.py --compile")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ignored on GPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each model per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=2048)
    return parser


if __name__ == "__main__":
    main(build_parser().parse_args())
