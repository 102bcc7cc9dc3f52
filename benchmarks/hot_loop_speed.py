"""
Before / after ratios of issue 22's hot-loop changes, measured on this machine in one run (CPU by default).

    python -m benchmarks.hot_loop_speed            # about a minute on 2 cores
    python -m benchmarks.hot_loop_speed --threads 2

Each "before" is the code it replaced, kept here only as the reference it is timed against:
  * ADM attention (ADM-ImageNet64's 32x32 level: 384 channels, 6 heads of 64, L = 1024), forward + backward:
    channels-major transposed q, k, v (the math kernel, the L x L matrix stored) vs tokens-major (flash);
  * the EMA update of DiT-B/2's parameters: an OrderedDict rebuilt each step and two foreach passes
    (mul_, add_) vs one _foreach_lerp_ over cached lists;
  * DDPM-250's per-sample noise for a batch of 32 DiT latents (4 x 32 x 32): one draw per sample per step,
    stacked and copied every step, vs 64 steps per draw (sampling.seeded.PerSampleNoise);
  * a DiT-S/2 training step (batch 8, 32x32x4 latents) under bf16 autocast vs fp32: why --mixed-precision auto
    stays fp32 on a CPU (a CPU with bf16 units, AVX-512 BF16 / AMX, may gain; one without loses many times).
Rounds alternate before and after; the fastest of each is reported, so load from other jobs biases both alike.
"""
import argparse
import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F

from diffusion import create_diffusion
from models import create_model
from models.adm import QKVAttention
from sampling.seeded import NOISE_STREAM, PerSampleNoise, sample_generator
from training.ema import EMAUpdater
from training.fast_path import autocast_model
from training.step_cost import best_of


def compare(before, after, rounds):
    """(best before, best after) with the two alternating round by round."""
    b, a = [], []
    for _ in range(rounds):
        b.append(best_of(before, 1))
        a.append(best_of(after, 1))
    return min(b), min(a)


def channels_major_attention(qkv, num_heads):
    """The replaced QKVAttention (new order): transposed (N, heads, L, D) views with unit stride over L."""
    n, width, length = qkv.shape
    d = width // (3 * num_heads)
    q, k, v = (z.transpose(-1, -2) for z in qkv.reshape(n, 3, num_heads, d, length).transpose(0, 1))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(n, num_heads * d, length)


def attention_case(rounds):
    qkv = torch.randn(2, 3 * 384, 1024, requires_grad=True)
    attention = QKVAttention(6, new_order=True)

    def run(fn):
        def step():
            fn(qkv).sum().backward()
            qkv.grad = None
        return step
    torch.testing.assert_close(channels_major_attention(qkv, 6), attention(qkv), rtol=1e-4, atol=1e-5)
    return compare(run(lambda x: channels_major_attention(x, 6)), run(attention), rounds)


def two_pass_update_ema(ema_model, model, decay):
    """The replaced update_ema: OrderedDict per step, ema.mul_(decay) then add_(param, 1 - decay)."""
    ema_params = OrderedDict(ema_model.named_parameters())
    pairs = [(ema_params[name], param.detach()) for name, param in model.named_parameters()]
    torch._foreach_mul_([e for e, _ in pairs], decay)
    torch._foreach_add_([e for e, _ in pairs], [p for _, p in pairs], alpha=1 - decay)


def ema_case(rounds):
    model = create_model("DiT-B/2", input_size=32, num_classes=1000)
    ema = copy.deepcopy(model).requires_grad_(False)
    update = EMAUpdater(ema, model)
    with torch.no_grad():
        return compare(lambda: two_pass_update_ema(ema, model, 0.9999), lambda: update(0.9999), rounds)


def noise_case(rounds, steps=250, batch=32):
    shape = (batch, 4, 32, 32)

    def before():  # one CPU draw per sample per call, stacked and copied each step
        generators = [sample_generator(0, i, NOISE_STREAM) for i in range(batch)]
        for _ in range(steps + 1):
            torch.stack([torch.randn(shape[1:], generator=g) for g in generators])

    def after():
        noise = PerSampleNoise(range(batch), 0)
        for _ in range(steps + 1):
            noise(shape)
    return compare(before, after, rounds)


def bf16_case(rounds):
    torch.manual_seed(0)
    model = create_model("DiT-S/2", input_size=32, num_classes=1000, routing="dtr")
    diffusion = create_diffusion("", learn_sigma=True)
    x, y = torch.randn(8, 4, 32, 32), torch.randint(0, 1000, (8,))
    t = torch.randint(0, 1000, (8,))

    def step(dtype):
        def run():
            losses = diffusion.training_losses(autocast_model(model, "cpu", dtype), x, t, {"y": y})["loss"]
            losses.mean().backward()
            model.zero_grad(set_to_none=True)
        return run
    return compare(step(None), step(torch.bfloat16), rounds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    cases = [("ADM attention 32x32, fwd+bwd", "transposed (math)", "tokens-major (flash)", attention_case),
             ("EMA update, DiT-B/2", "OrderedDict + mul_/add_", "cached _foreach_lerp_", ema_case),
             ("DDPM-250 per-sample noise, batch 32", "draw per step", "64 steps per draw", noise_case),
             ("DiT-S/2 training step, batch 8", "fp32", "bf16 autocast", bf16_case)]
    print(f"{'case':38s} {'before':26s} {'after':24s} {'before s':>9s} {'after s':>9s} {'speed-up':>9s}")
    for name, before_name, after_name, case in cases:
        before, after = case(args.rounds)
        print(f"{name:38s} {before_name:26s} {after_name:24s} {before:9.4f} {after:9.4f} {before / after:8.2f}x")


if __name__ == "__main__":
    main()
