"""
One-command acceptance check on a GPU: what a performance engineer looks at first, as one table.

    python -m benchmarks.gpu_check                 # one H100: about 5 minutes, synthetic latents, no internet
    python -m benchmarks.gpu_check --cpu-smoke     # the same checks on tiny models with gloo (part of the tests)
(`python benchmarks/gpu_check.py` works too once the repository is installed: pip install -e .)

Rows:
  * process group: init through launch.process_group.setup_distributed (nccl on GPU, gloo on CPU), one
    all-reduce, and one DDP step with train.py's settings (gradient_as_bucket_view, static_graph);
  * attention backend of DiT-XL/2, ADM-ImageNet64 and TextDiT-XL/2: the first of flash, memory-efficient
    that the model's forward runs on with only that backend allowed (math = the fused kernels refused it);
  * host syncs per training step (train.py's train_step with each loss weighting) and per DDPM CFG sampling
    step (sample_ddp.py's per-sample noise and guidance): torch.cuda.set_sync_debug_mode on a GPU,
    monitoring.host_syncs.HostSyncCounter on the CPU;
  * bf16 vs fp32 on the same DiT-XL/2 batch and weights: relative loss difference, relative gradient
    difference and cosine (fp32 reference with TF32 off);
  * compile vs eager: train.py --compile (per block and the loss) against eager, bf16: compile time, step time;
  * DiT-XL/2 bf16 training images/s and MFU at batch 32 and 64: FLOPs = 3 x the forward's FlopCounterMode count;
    peak = the device's dense bf16 spec where known, and a large bf16 matmul measured in the same run;
  * DTR / no-routing training step time, DiT-XL/2 bf16 batch 32, steps alternating in one process;
  * DDPM-250 CFG 1.5 sampling images/s (DiT-XL/2 bf16, batch 64, VAE decode not included) and the projected
    wall time of 50K samples on 8 such GPUs.
"""
import argparse
import copy
import gc
import os
import socket
import statistics
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion import create_diffusion
from launch.process_group import cleanup_distributed, setup_distributed
from models import create_model
from monitoring.host_syncs import HostSyncCounter
from sampling.seeded import PerSampleNoise, model_function
from storage.checkpoint import TrainingState
from training.ema import EMAUpdater
from training.fast_path import AUTOCAST_DTYPES, compile_for_training, wrap_ddp
from training.step import train_step

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s.
BF16_SPEC_PEAKS = {"H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A10": 125e12}
WEIGHTINGS = ("vanilla", "min-snr", "p2", "ant-uw")

# Model sizes: the paper's on a GPU, tiny ones for --cpu-smoke (same code paths).
FULL = {"dit": ("DiT-XL/2", dict(input_size=32, num_classes=1000)),
        "adm": ("ADM-ImageNet64", dict(num_classes=1000)),
        "text": ("TextDiT-XL/2", dict(input_size=32, context_dim=768, max_text_len=77)),
        "sync": ("DiT-S/2", dict(input_size=32, num_classes=1000))}
TINY_DIT = dict(input_size=8, num_classes=10, depth=2, hidden_size=32, num_heads=2)
SMOKE = {"dit": ("DiT-S/2", TINY_DIT),
         "adm": ("ADM-ImageNet64", dict(input_size=8, num_classes=10, model_channels=32, channel_mult=[1, 2],
                                        num_res_blocks=1, attention_resolutions=[8, 4], num_head_channels=16)),
         "text": ("TextDiT-S/2", dict(input_size=8, depth=1, hidden_size=32, num_heads=2, context_dim=16,
                                      max_text_len=5)),
         "sync": ("DiT-S/2", TINY_DIT)}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device):
    """Free what finished checks held: compiled graphs keep their modules (13.5 GB per DiT-XL/2 trainer) alive."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def seconds(fn, device, repeats=1):
    """Wall seconds of `repeats` calls of fn, device work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


#################################################################################
#                               Building blocks                                 #
#################################################################################

def build_model(spec, device, routing="none", **overrides):
    """A zoo model with random (not zero-initialised) output layers, so every path carries signal."""
    name, kwargs = spec
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: DiT-XL/2's init takes seconds on a CPU
        model = create_model(name, **kwargs, **overrides, routing=routing, learn_sigma=True)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():  # adaLN-Zero / zero convs: give them small random values
                p.normal_(0, 0.02)
    return model


def model_inputs(model, batch, device, text=False, seed=0):
    """(x, y or context kwargs) of synthetic data for `model`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g).to(device)
    if text:
        context = torch.randn(batch, model.max_text_len, model.context_dim, generator=g).to(device)
        return x, {"context": context, "context_mask": torch.ones(batch, model.max_text_len, dtype=torch.bool,
                                                                   device=device)}
    return x, {"y": torch.randint(0, model.num_classes, (batch,), generator=g).to(device)}


class Trainer:
    """train.py's state and step (training.step.train_step) on synthetic data for one model."""

    def __init__(self, model, device, batch, precision, weighting="vanilla", compile_backend=None, ddp=False,
                 world_size=1):
        self.model, self.device, self.precision = model.train(), device, precision
        self.diffusion = create_diffusion("", learn_sigma=True, noise_schedule="squaredcos_cap_v2",
                                          loss_weighting=weighting)
        weighting_module = self.diffusion.loss_weighting.to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW([{"params": list(model.parameters())}, *weighting_module.param_groups()], lr=1e-4,
                                weight_decay=0, fused=device.type in ("cpu", "cuda"))
        self.state = TrainingState(model, ema, opt, weighting_module, torch.amp.GradScaler(device.type, enabled=False),
                                   {})
        if compile_backend is not None:
            self.compile(compile_backend)
        self.net = wrap_ddp(model, device, world_size, force=ddp)
        self.ema_update = EMAUpdater(ema, model)
        self.args = argparse.Namespace(global_batch_size=batch, global_seed=0, timestep_range=None, ema_decay=0.9999)
        self.x, kwargs = model_inputs(model, batch, device)
        self.y = kwargs["y"]

    def compile(self, backend):
        """train.py --compile: each block and the loss (in place; the DDP wrapper, if any, is unchanged)."""
        compile_for_training(self.model, self.diffusion, backend=backend)

    def step(self):
        loss, _, _ = train_step(self.state, self.net, self.diffusion, self.x, self.y, self.args, 0, 1,
                                AUTOCAST_DTYPES[self.precision], self.ema_update)
        self.state.step += 1
        return loss


def count_syncs(fn, device):
    """Host syncs during fn(): CUDA's sync debug warnings on a GPU, HostSyncCounter events elsewhere (where
    copies between devices cannot show: tests/test_host_syncs.py counts those on the meta device)."""
    if device.type == "cuda":
        synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    with HostSyncCounter() as counter:
        fn()
    # models.routing.check_timesteps validates t with a host read on the CPU only (a clear ValueError there;
    # an asynchronous assert on a GPU): not a sync a GPU would see
    return sum("check_timesteps" not in where for _, _, where in counter.events)


#################################################################################
#                                    Checks                                     #
#################################################################################

def check_process_group(device, rows, compile_backend=None):
    """nccl (GPU) / gloo (CPU) through the project's launcher, an all-reduce, DDP training steps (compiled blocks
    inside DDP with compile_backend, as train.py --compile)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        start = time.perf_counter()
        rank, world_size, pg_device = setup_distributed(device.type)
        ones = torch.ones(4, device=pg_device)
        dist.all_reduce(ones)
        synchronize(pg_device)
        rows.append(("process group", f"{dist.get_backend()} via launch.process_group",
                     f"all_reduce ok={bool(ones.eq(1).all())}, {time.perf_counter() - start:.2f} s"))
        trainer = Trainer(build_model(SMOKE["dit"], pg_device), pg_device, 4, "no", ddp=True,
                          compile_backend=compile_backend)
        losses = [trainer.step().item() for _ in range(2)]
        rows.append(("DDP step", "gradient_as_bucket_view, static_graph" +
                     (f", blocks compiled ({compile_backend})" if compile_backend else ""),
                     f"2 steps, loss {losses[-1]:.4f}"))
    finally:
        cleanup_distributed()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def attention_backend(model, x, kwargs, t, dtype):
    """The first fused backend the whole forward runs on alone, or 'math'."""
    candidates = [("flash", SDPBackend.FLASH_ATTENTION), ("mem-efficient", SDPBackend.EFFICIENT_ATTENTION),
                  ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    for name, backend in candidates:
        try:
            with torch.no_grad(), sdpa_kernel(backend), torch.autocast(x.device.type, dtype=dtype,
                                                                        enabled=dtype != torch.float32):
                model(x, t, **kwargs)
            return name
        except RuntimeError:
            continue
    return "math (fused kernels refused)"


def check_attention(specs, device, dtype, rows):
    for key in ("dit", "adm", "text"):
        model = build_model(specs[key], device).eval()
        x, kwargs = model_inputs(model, 2, device, text=key == "text")
        t = torch.tensor([10, 900], device=device)
        rows.append(("attention backend", specs[key][0], attention_backend(model, x, kwargs, t, dtype)))
        del model


def check_syncs(specs, device, precision, rows):
    """Syncs are structural (the same code at every size): counted on specs["sync"], a small DiT."""
    specs = {"dit": specs["sync"]}
    for weighting in WEIGHTINGS:
        trainer = Trainer(build_model(specs["dit"], device, routing="dtr"), device, 8, precision, weighting)
        trainer.step()  # first step: schedule tables to the device, optimizer state
        rows.append(("host syncs / training step", f"{specs['dit'][0]} DTR, {weighting}",
                     str(count_syncs(trainer.step, device))))
    model = build_model(specs["dit"], device, routing="dtr").eval()
    diffusion = create_diffusion("250", learn_sigma=True)
    model_fn = model_function(model, 1.5, "all", precision)
    noise = PerSampleNoise(range(8), 0, device)
    _, kwargs = model_inputs(model, 8, device)
    steps = diffusion.p_sample_loop_progressive(model_fn, (8, model.in_channels, model.input_size, model.input_size),
                                                noise=noise((8, model.in_channels, model.input_size,
                                                             model.input_size)),
                                                model_kwargs=kwargs, noise_fn=lambda x: noise(x.shape))
    with torch.no_grad():
        next(steps)  # the loop's setup: tables to the device once
        counts = [count_syncs(lambda: next(steps), device) for _ in range(3)]
    rows.append(("host syncs / sampling step", f"{specs['dit'][0]} DDPM CFG 1.5, per-sample noise",
                 f"{max(counts)} (max of 3 steps)"))


def check_bf16(specs, device, batch, rows):
    """bf16 autocast vs fp32 (TF32 off) on the same batch, weights and draws: loss and gradient agreement."""
    results = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for precision in ("no", "bf16"):
            model = build_model(specs["dit"], device, routing="dtr")
            trainer = Trainer(model, device, batch, precision)
            trainer.state.opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keep the weights: compare gradients
            loss = trainer.step()
            grads = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])
            results[precision] = (loss.double(), grads)
            del trainer, model
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    (l32, g32), (l16, g16) = results["no"], results["bf16"]
    rel_loss = (abs(l16 - l32) / abs(l32)).item()
    rel_grad = ((g16 - g32).norm() / g32.norm()).item()
    cosine = (g16 @ g32 / (g16.norm() * g32.norm())).item()
    rows.append(("bf16 vs fp32", f"{specs['dit'][0]} DTR, batch {batch}, same batch",
                 f"loss {l32.item():.5f} vs {l16.item():.5f} (rel {rel_loss:.1e}); grad rel {rel_grad:.1e}, "
                 f"cos {cosine:.6f}"))
    return rel_loss, rel_grad


def check_compile(specs, device, batch, precision, backend, rows, repeats):
    """train.py --compile (per block + loss) vs eager: compile time and step time."""
    times = {}
    for compiled in (False, True):
        trainer = Trainer(build_model(specs["dit"], device, routing="dtr"), device, batch, precision,
                          compile_backend=backend if compiled else None)
        first = seconds(trainer.step, device)
        trainer.step()
        times[compiled] = (first, seconds(trainer.step, device, repeats))
        del trainer
    rows.append(("compile vs eager", f"{specs['dit'][0]} DTR {precision}, batch {batch}, backend {backend}",
                 f"first step {times[True][0]:.1f} s (eager {times[False][0]:.1f} s); step {times[True][1]:.3f} s vs "
                 f"{times[False][1]:.3f} s = {times[False][1] / times[True][1]:.2f}x"))


def matmul_peak(device, dtype, size):
    """FLOP/s of a size^3 matmul in dtype, best of a few bursts."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    return 2 * size ** 3 / min(seconds(lambda: a @ b, device, 4) for _ in range(3))


def spec_peak(device):
    """(name, dense bf16 FLOP/s) from the data-sheet table, or (name, None)."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_SPEC_PEAKS.items():  # most specific names first
        if key in name:
            return name, peak
    return name, None


def check_throughput(specs, device, precision, batches, backend, rows, repeats, matmul_size):
    """Training images/s and MFU (3 x forward FLOPs of FlopCounterMode over the spec / measured peak)."""
    dtype = AUTOCAST_DTYPES[precision] or torch.float32
    measured = matmul_peak(device, dtype, matmul_size)
    name, spec = spec_peak(device)
    rows.append(("matmul peak", f"{name}, {matmul_size}^3 {str(dtype).replace('torch.', '')}",
                 f"measured {measured / 1e12:.1f} TFLOP/s; spec {spec / 1e12:.0f} TFLOP/s" if spec else
                 f"measured {measured / 1e12:.3f} TFLOP/s; no spec on file"))
    for batch in batches:
        try:
            trainer = Trainer(build_model(specs["dit"], device, routing="dtr"), device, batch, precision)
            t = torch.randint(0, 1000, (batch,), device=device)
            with torch.no_grad(), FlopCounterMode(display=False) as counter, \
                    torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                trainer.model(trainer.x, t, trainer.y)  # counted eagerly: backward ~ 2 x forward
            flops = 3 * counter.get_total_flops()
            if backend is not None:
                trainer.compile(backend)
            for _ in range(3):
                trainer.step()
            step = seconds(trainer.step, device, repeats)
            achieved = flops / step
            mfu = f"MFU {achieved / spec:.1%} of spec, " if spec else ""
            rows.append(("training throughput", f"{specs['dit'][0]} DTR {precision}, batch {batch}"
                         f"{', compiled' if backend else ''}",
                         f"{batch / step:.1f} img/s, {achieved / 1e12:.2f} TFLOP/s, {mfu}"
                         f"{achieved / measured:.1%} of measured matmul"))
            del trainer
        except torch.cuda.OutOfMemoryError:
            trainer = None
            rows.append(("training throughput", f"{specs['dit'][0]} {precision}, batch {batch}", "out of memory"))
        release(device)


def check_routing_ratio(specs, device, batch, precision, rows, rounds):
    """DTR / no-routing step time with steps alternating in one process (load affects both alike)."""
    trainers = {routing: Trainer(build_model(specs["dit"], device, routing=routing), device, batch, precision)
                for routing in ("none", "dtr")}
    for trainer in trainers.values():
        trainer.step()
        trainer.step()
    times = {routing: [] for routing in trainers}
    for _ in range(rounds):
        for routing, trainer in trainers.items():
            times[routing].append(seconds(trainer.step, device))
    ratio = statistics.median(times["dtr"]) / statistics.median(times["none"])
    rows.append(("DTR / no routing", f"{specs['dit'][0]} {precision}, batch {batch}, {rounds} alternating rounds",
                 f"step time ratio {ratio:.3f} (medians {statistics.median(times['dtr']):.3f} s / "
                 f"{statistics.median(times['none']):.3f} s)"))


def check_sampling(specs, device, batch, precision, rows, steps_timed):
    """DDPM-250 CFG 1.5 images/s from timed steps, and 50K samples on 8 such GPUs."""
    model = build_model(specs["dit"], device, routing="dtr").eval()
    diffusion = create_diffusion("250", learn_sigma=True)
    model_fn = model_function(model, 1.5, "all", precision)
    noise = PerSampleNoise(range(batch), 0, device)
    shape = (batch, model.in_channels, model.input_size, model.input_size)
    _, kwargs = model_inputs(model, batch, device)
    loop = diffusion.p_sample_loop_progressive(model_fn, shape, noise=noise(shape), model_kwargs=kwargs,
                                               noise_fn=lambda x: noise(x.shape))
    with torch.no_grad():
        next(loop)
        next(loop)
        step = seconds(lambda: next(loop), device, steps_timed)
    images_per_second = batch / (250 * step)
    hours = 50_000 / (8 * images_per_second) / 3600
    rows.append(("DDPM-250 CFG 1.5 sampling", f"{specs['dit'][0]} DTR {precision}, batch {batch} (VAE decode not "
                 f"included)", f"{images_per_second:.2f} img/s per device; 50K on 8: {hours:.2f} h"))


#################################################################################
#                                    Main                                       #
#################################################################################

def print_table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(3)]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU with gloo (the test suite)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default: inductor on GPU, aot_eager for --cpu-smoke)")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device visible; run with --cpu-smoke for the tiny CPU version")
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py (official DiT)
        torch.backends.cudnn.allow_tf32 = True
    specs = SMOKE if smoke else FULL
    precision = "no" if smoke else "bf16"
    backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    started = time.perf_counter()
    rows = []
    checks = [
        lambda: check_process_group(device, rows, None if smoke else backend),  # smoke: compile tested below
        lambda: check_attention(specs, device, torch.float32 if smoke else torch.bfloat16, rows),
        lambda: check_syncs(specs, device, precision, rows),
        lambda: check_bf16(specs, device, 4 if smoke else 8, rows),
        lambda: check_compile(specs, device, 4 if smoke else 32, precision, backend, rows, repeats=2 if smoke else 10),
        lambda: check_throughput(specs, device, precision, (4,) if smoke else (32, 64), None if smoke else backend,
                                 rows, repeats=2 if smoke else 10, matmul_size=256 if smoke else 8192),
        lambda: check_routing_ratio(specs, device, 4 if smoke else 32, precision, rows, rounds=3 if smoke else 10),
        lambda: check_sampling(specs, device, 4 if smoke else 64, precision, rows, steps_timed=2 if smoke else 10),
    ]
    for check in checks:
        check()
        release(device)
    rows.append(("total", "", f"{time.perf_counter() - started:.0f} s, torch {torch.__version__}"))
    print_table(rows, ("check", "setting", "result"))
    return rows


if __name__ == "__main__":
    main()
