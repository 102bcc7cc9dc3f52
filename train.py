"""
Train a DiT, optionally with Denoising Task Routing, using PyTorch DDP (Park et al., ICLR 2024, Sec. 5, App. C).

    torchrun --nnodes=1 --nproc_per_node=8 train.py --feature-path features/imagenet256 --model DiT-L/2 --routing dtr
    python train.py --config configs/table1/imagenet256_dit_l2_dtr.yaml --feature-path features/imagenet256
    python train.py --config configs/tiny_fashion_mnist.yaml   # small CPU run in pixel space

Defaults are the paper's setting: AdamW lr 1e-4 without weight decay, EMA 0.9999, random horizontal flip,
cosine schedule over 1000 steps, learned sigma. Runs under torchrun (nccl on GPU, gloo on CPU) or as a plain
single process. Every global batch is the same whatever the world size: the sampler splits each global batch
over ranks, and the timesteps, noise and label dropout of a step are drawn for the whole global batch from a
generator seeded by (global seed, step), each rank taking its own samples. So 2 ranks x B match 1 rank x 2B,
and a resumed run continues bit for bit.

Outputs in <results-dir>/<NNN>-<model>/ (model "DiT-S/2" -> "DiT-S-2"):
log.txt, metrics.jsonl (one {"step", "loss", ...} per --log-every) and checkpoints/<step:07d>.pt, written
atomically, loadable with torch.load(weights_only=True):
    model, ema, opt (state_dicts), step, args (dict), model_config ({"model": zoo name, **every constructor argument};
    rebuild with models.build_from_config), diffusion_config (create_diffusion kwargs), vae, image_size, latent_scale,
    loss_weighting (its state_dict: ANT-UW s_k), rng (one dict per rank: torch, numpy, python, cuda),
    data_state ({epoch, position = batches done in the epoch, sampler_seed, global_batch_size}),
    scaler (fp16 only), loss_log ({sums: (world_size,) running loss sums, steps}: the next log line after a
    resume averages the same steps as a straight run), dataset ({num_samples, num_classes}). The per-step
    generator needs no state: it is reseeded from (global seed, step).

Clusters: SIGTERM, SIGUSR1 or SIGINT stop every rank after the current step, with a checkpoint of it, and
exit 0 (launch/preemption.py). --exp-name NAME --resume auto continues the newest checkpoint of
<results-dir>/NAME or starts there, so a requeued job reruns the same command; --keep-last K prunes.
A resume may change --lr (applied and logged); other trajectory settings are refused (storage/resume_policy.py).
"""
import argparse
import copy
import json
import logging
import math
import os
import random
import resource
import sys
import time
from collections import OrderedDict
from glob import glob

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from storage.atomic_file import atomic_write
from diffusion import WEIGHTINGS, create_diffusion
from imagedata import build_dataset
from imagedata.latents import sample_posterior
from models import ROUTING_KINDS, check_overrides, create_model, model_names
from models import model_config as model_config_of
from launch.preemption import PreemptionFlag, ignore_preemption_signals
from launch.process_group import add_launch_arguments, cleanup_distributed, describe_distributed, setup_distributed
from storage.run_folder import prune_checkpoints, resolve_run
from storage.resume_policy import apply_learning_rate, check_fixed_settings, dataset_identity
from storage.run_record import write_run_record

LATENT_SCALE = 0.18215  # SD VAE latent scale, as official DiT
# Constructor arguments train.py sets itself (from the data or a flag); --model-arg may not set them.
MODEL_ARGS_SET_BY_TRAIN = {"input_size": "--image-size and the data", "in_channels": "the data",
                           "num_classes": "--num-classes", "learn_sigma": "train.py (learned variances, as the paper)",
                           "routing": "--routing", "alpha": "--alpha", "beta": "--beta",
                           "routing_seed": "--routing-seed", "grad_checkpointing": "--grad-checkpointing"}
NOISE_SCHEDULES = ("squaredcos_cap_v2", "cosine", "linear")  # cosine = squaredcos_cap_v2 (ADM's / the release's name)


#################################################################################
#                             Training Helper Functions                         #
#################################################################################

@torch.no_grad()
def update_ema(ema_model, model, decay=0.9999):
    """Step the EMA of the parameters towards the current model (App. C: EMA over parameters)."""
    ema_params = OrderedDict(ema_model.named_parameters())
    pairs = [(ema_params[name], param.detach()) for name, param in model.named_parameters()]
    ema_list, param_list = [e for e, _ in pairs], [p for _, p in pairs]
    # official DiT's ema.mul_(decay).add_(param, alpha=1 - decay), batched over all tensors at once
    torch._foreach_mul_(ema_list, decay)
    torch._foreach_add_(ema_list, param_list, alpha=1 - decay)


def requires_grad(model, flag=True):
    """Set requires_grad for every parameter of a model."""
    for p in model.parameters():
        p.requires_grad = flag


def create_logger(logging_dir, rank):
    """Rank 0 logs to the console and <logging_dir>/log.txt; other ranks log nothing."""
    logger = logging.getLogger(f"train.{os.path.abspath(logging_dir) if logging_dir else rank}")
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if rank == 0:
        fmt = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(f"{logging_dir}/log.txt")):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def close_logger(logger):
    """Detach and close handlers so repeated in-process runs do not leak file handles."""
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def step_generator(global_seed, step, device):
    """Generator for one training step, seeded by (global_seed, step) only: no state to checkpoint."""
    seed = int(np.random.SeedSequence([global_seed, step]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def all_reduce_mean(value, world_size):
    """Average a tensor over ranks (identity for a single process)."""
    if world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / world_size
    return value


def peak_memory_gb(device):
    """Peak accelerator memory allocated, or peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def unwrap(model):
    """The bare nn.Module under DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


#################################################################################
#                               Model and Data Setup                            #
#################################################################################

def model_overrides(args):
    """{constructor argument: value} from --model-arg KEY=VALUE (and a config's model_args); the last wins."""
    return dict(args.model_args or {})


def build_model(args, input_size, in_channels, num_classes):
    """The --model zoo entry with --model-arg overrides, sized to the data, routed as the flags say."""
    return create_model(args.model, **model_overrides(args), input_size=input_size, in_channels=in_channels,
                        num_classes=num_classes, learn_sigma=True, routing=args.routing, alpha=args.alpha,
                        beta=args.beta, routing_seed=args.routing_seed, grad_checkpointing=args.grad_checkpointing)


def check_data_fits_model(args, dataset):
    """(input_size, in_channels): the model input implied by the data, or a clear error if they disagree."""
    if len(dataset) < args.global_batch_size:
        raise ValueError(f"dataset has {len(dataset)} samples, fewer than --global-batch-size "
                         f"{args.global_batch_size}: not a single step per epoch")
    if dataset.num_classes > args.num_classes:
        raise ValueError(f"dataset has {dataset.num_classes} classes but --num-classes is {args.num_classes}")
    channels, resolution = dataset.channels, dataset.resolution
    if args.feature_path is not None:
        if dataset.image_size != args.image_size:
            raise ValueError(f"latents in {args.feature_path} were extracted from {dataset.image_size}px images "
                             f"but --image-size is {args.image_size}")
        return resolution, channels
    if args.vae != "none":
        raise ValueError("encoding images with a VAE on the fly is not supported: precompute latents with "
                         "extract_features.py and pass --feature-path, or train in pixel space with --vae none")
    if resolution != args.image_size:
        raise ValueError(f"dataset yields {resolution}x{resolution} images but --image-size is {args.image_size}")
    return resolution, channels


def build_loader(dataset, sampler, epoch, position, local_batch_size, num_workers, device):
    """Loader for the rest of an epoch: the sampler's order with the first `position` batches skipped."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)  # flips are a function of (seed, epoch, index); set before the workers fork
    indices = list(sampler)[position * local_batch_size:]
    return DataLoader(dataset, batch_size=local_batch_size, sampler=indices, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=True,
                      worker_init_fn=ignore_preemption_signals)  # the main process decides when to stop


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

def capture_rng_state():
    """All global RNG states of this process as plain tensors / lists (torch.load(weights_only=True) safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    """Inverse of capture_rng_state."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_loss_sums(running_loss, world_size):
    """(world_size,) tensor: every rank's running loss sum, so the next log line survives a resume."""
    sums = [running_loss.detach().float().cpu().reshape(1)]
    if world_size > 1:
        gathered = [torch.zeros_like(running_loss).reshape(1) for _ in range(world_size)]
        dist.all_gather(gathered, running_loss.detach().reshape(1))
        sums = [s.float().cpu() for s in gathered]
    return torch.cat(sums)


def gather_rng_states(world_size):
    """RNG state of every rank, rank order (each rank restores its own on resume)."""
    state = capture_rng_state()
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(checkpoint, path):
    """torch.save through a temp file and os.replace: a crash never leaves a broken checkpoint."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def check_resume_compatible(checkpoint, path, model_config, diffusion_config):
    """Refuse to resume a checkpoint of another model, routing or diffusion setup; name what differs."""
    for label, saved, current in (("model", checkpoint["model_config"], model_config),
                                  ("diffusion", checkpoint["diffusion_config"], diffusion_config)):
        keys = sorted(set(saved) | set(current))
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
                for k in keys if saved.get(k) != current.get(k) and k != "grad_checkpointing"]
        if diff:
            raise ValueError(f"cannot resume {path}: its {label} config differs from this run's "
                             f"({'; '.join(diff)})")


def truncate_metrics(metrics_path, step):
    """Drop metrics logged after `step` (written before a crash, redone after resume); atomic rewrite."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    atomic_write(metrics_path, lambda f: f.writelines(kept), mode="w")


#################################################################################
#                                  Training Loop                                #
#################################################################################

def main(args):
    """Train a (DTR-routed) DiT; returns the experiment folder."""
    validate_args(args)
    check_data_paths(args)
    rank, world_size, device = setup_distributed(args.device, args.dist_timeout)
    try:
        with PreemptionFlag(world_size) as preemption:  # from here on, SIGTERM/SIGUSR1/SIGINT stop cleanly
            return train(args, rank, world_size, device, preemption)
    finally:
        cleanup_distributed()


def train(args, rank, world_size, device, preemption=None):
    """The training loop proper (main sets up and tears down the process group and the signal handlers)."""
    preemption = preemption or PreemptionFlag(world_size)  # without handlers installed it never fires
    if args.global_batch_size % world_size != 0:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the world size "
                         f"{world_size}")
    local_batch_size = args.global_batch_size // world_size
    if device.type == "cuda":
        # TF32 as official DiT: faster matmuls on Ampere+, negligible effect on results
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Data (first, so a bad path fails before anything is written):
    dataset = build_dataset(data_path=args.data_path, feature_path=args.feature_path, image_size=args.image_size,
                            flip=True, seed=args.global_seed)
    input_size, in_channels = check_data_fits_model(args, dataset)
    vae_name = getattr(dataset, "vae", args.vae) if args.feature_path is not None else "none"
    latent_scale = getattr(dataset, "latent_scale", LATENT_SCALE) if args.feature_path is not None else 1.0
    steps_per_epoch = len(dataset) // args.global_batch_size
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch

    # Model, EMA, diffusion, optimizer. Same init on every rank and any world size:
    torch.manual_seed(args.global_seed)
    model = build_model(args, input_size, in_channels, args.num_classes).to(device)  # the model checks its shape
    model_config = model_config_of(args.model, model)
    ema = copy.deepcopy(model).to(device)  # EMA starts as a copy of the model (official DiT)
    requires_grad(ema, False)
    diffusion_config = dict(timestep_respacing="", noise_schedule=args.noise_schedule, learn_sigma=True,
                            diffusion_steps=1000, loss_weighting=args.loss_weighting,
                            min_snr_gamma=args.snr_gamma, p2_k=args.p2_k, p2_gamma=args.p2_gamma,
                            ant_num_clusters=args.ant_num_clusters, ant_lr=args.ant_lr)
    diffusion = create_diffusion(**diffusion_config)
    weighting = diffusion.loss_weighting.to(device)
    timestep_sampler = diffusion.timestep_sampler  # uniform; stratified over timestep clusters for ANT-UW
    # fused AdamW: one kernel per tensor instead of ~10 (on CPU ~20x faster than the default loop)
    opt = torch.optim.AdamW([{"params": list(model.parameters())}, *weighting.param_groups()],
                            lr=args.lr, weight_decay=0, fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    autocast_dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]

    # Experiment folder and resume state (rank 0 decides; --resume auto finds the newest checkpoint):
    located = [None, None, []]
    if rank == 0:
        located = list(resolve_run(args.results_dir, args.model.replace("/", "-"), args.exp_name,
                                   args.resume))
    if world_size > 1:
        dist.broadcast_object_list(located, src=0)
    experiment_dir, resume_path, removed_temp_files = located
    train_steps, epoch, position = 0, 0, 0
    checkpoint = None
    if resume_path is not None:
        if not os.path.isfile(resume_path):
            raise FileNotFoundError(f"--resume checkpoint not found: {resume_path}")
        checkpoint = torch.load(resume_path, map_location="cpu", weights_only=True)
        check_resume_compatible(checkpoint, resume_path, model_config, diffusion_config)
        check_fixed_settings(checkpoint, args, dataset_identity(dataset), resume_path)
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        opt.load_state_dict(checkpoint["opt"])
        saved_lr = apply_learning_rate(opt, args.lr)  # the optimizer state would restore the old lr
        weighting.load_state_dict(checkpoint["loss_weighting"])
        if "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        train_steps = checkpoint["step"]
        epoch, position = checkpoint["data_state"]["epoch"], checkpoint["data_state"]["position"]
    checkpoint_dir = f"{experiment_dir}/checkpoints"
    metrics_path = f"{experiment_dir}/metrics.jsonl"
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        truncate_metrics(metrics_path, train_steps)  # lines past the resume point are redone
        write_run_record(experiment_dir, args, world_size, resumed_from=resume_path, step=train_steps)
    if world_size > 1:
        dist.barrier()
    logger = create_logger(experiment_dir, rank)

    try:
        for path in removed_temp_files:
            logger.info(f"Removed {path}, left by a save that was killed mid-write")
        if checkpoint is not None:
            logger.info(f"Resumed from {resume_path} at step {train_steps} (epoch {epoch}, batch {position})")
            if saved_lr != args.lr:
                logger.info(f"Learning rate changed on resume: {saved_lr:g} -> {args.lr:g} (--lr)")
        elif args.resume == "auto":
            logger.info(f"--resume auto: no checkpoint in {checkpoint_dir} yet, starting from step 0")
        logger.info(f"Experiment directory: {experiment_dir}")
        logger.info(describe_distributed(world_size, device))
        logger.info(f"{model_config['model']} parameters: {sum(p.numel() for p in model.parameters()):,}; "
                    f"routing {model.routing_config()}")
        logger.info(f"Dataset contains {len(dataset):,} samples ({args.data_path or args.feature_path}); "
                    f"model input {in_channels}x{input_size}x{input_size}")

        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
        running_loss = torch.zeros((), device=device)  # sum of this rank's losses since the last log line
        log_steps = 0
        if args.compile:
            ddp_model = torch.compile(ddp_model)
        # Per-rank seed for anything left on the global RNG (e.g. loader worker seeds), as official DiT
        torch.manual_seed(args.global_seed * world_size + rank)
        if checkpoint is not None:
            rng = checkpoint["rng"]
            if len(rng) == world_size:
                restore_rng_state(rng[rank])
            if "loss_log" in checkpoint:  # the log line after a resume averages the same steps as a straight run
                sums = checkpoint["loss_log"]["sums"]
                running_loss.fill_(sums[rank] if len(sums) == world_size else sums.mean())
                log_steps = checkpoint["loss_log"]["steps"]
        del checkpoint

        # The sampler splits each global batch over ranks (rank r takes every world_size-th sample), so a
        # global batch is the same set of samples whatever the world size; drop_last keeps steps equal.
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=args.global_seed, drop_last=True)
        model.train()  # important! This enables embedding dropout for classifier-free guidance
        ema.eval()
        dropout_prob = model.config["class_dropout_prob"]
        posterior_latents = getattr(dataset, "latent_stat", None) == "posterior"  # else x is the training input

        def save(step):
            """Write a checkpoint of the current state (all ranks call it: RNG states are gathered)."""
            rng_states = gather_rng_states(world_size)
            loss_sums = gather_loss_sums(running_loss, world_size)
            if rank == 0:
                ckpt = {
                    "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "args": vars(args), "model_config": model_config, "diffusion_config": diffusion_config,
                    "vae": vae_name, "image_size": args.image_size, "latent_scale": latent_scale,
                    "loss_weighting": weighting.state_dict(), "rng": rng_states,
                    "loss_log": {"sums": loss_sums, "steps": log_steps}, "dataset": dataset_identity(dataset),
                    "data_state": {"epoch": epoch, "position": position, "sampler_seed": args.global_seed,
                                   "global_batch_size": args.global_batch_size},
                }
                if scaler.is_enabled():
                    ckpt["scaler"] = scaler.state_dict()
                path = f"{checkpoint_dir}/{step:07d}.pt"
                save_checkpoint(ckpt, path)
                logger.info(f"Saved checkpoint to {path}")
            if world_size > 1:
                dist.barrier()

        def check_finite(first_bad_step):
            """Stop every rank with the step number if any rank saw a non-finite loss (no checkpoint of it)."""
            no_bad = torch.full_like(first_bad_step, 2**62)
            worst = torch.where(first_bad_step < 0, no_bad, first_bad_step)
            if world_size > 1:
                dist.all_reduce(worst, op=dist.ReduceOp.MIN)
            if worst.item() != no_bad.item():
                saved = sorted(glob(f"{checkpoint_dir}/*.pt"))
                raise FloatingPointError(f"non-finite loss at step {worst.item()}; stopping. Last good checkpoint: "
                                         f"{saved[-1] if saved else 'none'}")

        logger.info(f"Training for {max_steps} steps ({steps_per_epoch} steps per epoch), global batch "
                    f"{args.global_batch_size} = {world_size} ranks x {local_batch_size}")
        first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # 1-based step of first NaN/inf
        timed_steps, start_time = 0, time.time()  # steps/s counts this process's steps only
        stopped = False
        while train_steps < max_steps and not stopped:
            loader = build_loader(dataset, sampler, epoch, position, local_batch_size, args.num_workers, device)
            for x, y in loader:
                # (B, C, H, W): images in [-1, 1] or scaled latents; (B, 2, C, h, w): a VAE posterior's mean, std
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)  # (B,)
                # Draw t, noise and label drops for the whole global batch; keep this rank's samples
                # (rank r holds global samples r, r + world_size, ... as the sampler deals them).
                g = step_generator(args.global_seed, train_steps, device)
                G = args.global_batch_size
                t = timestep_sampler.sample_timesteps(G, device, generator=g)[rank::world_size]
                noise = torch.randn((G, *x.shape[-3:]), generator=g, device=device)[rank::world_size]
                drop = torch.rand(G, generator=g, device=device)[rank::world_size] < dropout_prob
                if posterior_latents:  # this step's latent, as official DiT's latent_dist.sample(); drawn last
                    eps = torch.randn((G, *x.shape[-3:]), generator=g, device=device)[rank::world_size]
                    x = sample_posterior(x, eps)  # (B, C, h, w)
                model_kwargs = dict(y=y, force_drop_ids=drop.long() if dropout_prob > 0 else None)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss_dict = diffusion.training_losses(ddp_model, x, t, model_kwargs, noise=noise)
                loss = loss_dict["loss"].float().mean()
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                weighting.all_reduce_gradients()
                scaler.step(opt)
                scaler.update()
                update_ema(ema, model, args.ema_decay)

                train_steps += 1
                position += 1
                log_steps += 1
                timed_steps += 1
                loss = loss.detach()
                running_loss += loss
                first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss),
                                             torch.full_like(first_bad_step, train_steps), first_bad_step)
                at_log = train_steps % args.log_every == 0
                at_ckpt = train_steps % args.ckpt_every == 0 or train_steps == max_steps
                if at_log or at_ckpt:  # checked here only, to avoid a device sync every step
                    check_finite(first_bad_step)
                if at_log:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    steps_per_sec = timed_steps / (time.time() - start_time)
                    avg_loss = all_reduce_mean(running_loss / log_steps, world_size).item()
                    mem = peak_memory_gb(device)
                    logger.info(f"(step={train_steps:07d}) Train Loss: {avg_loss:.4f}, Train Steps/Sec: "
                                f"{steps_per_sec:.2f}, Images/Sec: {steps_per_sec * G:.1f}, Peak Mem: {mem:.2f} GB")
                    if rank == 0:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps({"step": train_steps, "loss": avg_loss, "steps_per_sec": steps_per_sec,
                                                "images_per_sec": steps_per_sec * G, "peak_mem_gb": mem}) + "\n")
                    running_loss.zero_()
                    log_steps, timed_steps, start_time = 0, 0, time.time()
                if position == steps_per_epoch:
                    epoch, position = epoch + 1, 0
                if at_ckpt:
                    save(train_steps)
                    if rank == 0 and args.keep_last is not None:
                        for path in prune_checkpoints(checkpoint_dir, args.keep_last, args.keep_every):
                            logger.info(f"Removed {path} (--keep-last {args.keep_last})")
                if preemption.stop_requested():  # same answer on every rank, after the same step
                    if not at_ckpt:
                        check_finite(first_bad_step)
                        save(train_steps)
                    logger.info(f"Stopped by {preemption.name} after step {train_steps} of {max_steps}; "
                                f"run the same command with --resume auto (or --resume {checkpoint_dir}/"
                                f"{train_steps:07d}.pt) to continue")
                    stopped = True
                if train_steps >= max_steps or stopped:
                    break
        model.eval()
        if not stopped:
            logger.info("Done!")
        return experiment_dir
    finally:
        close_logger(logger)


#################################################################################
#                                    Arguments                                  #
#################################################################################

def build_parser():
    """Command-line flags; names follow official DiT train.py, defaults are the paper's (App. C)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", type=str, default=None,
                        help="YAML file whose keys (flag names, - or _) set defaults; the command line wins")
    data = parser.add_argument_group("data")
    data.add_argument("--data-path", type=str, default=None, help="image folders, flat folder or Fashion-MNIST IDX")
    data.add_argument("--feature-path", type=str, default=None, help="latents written by extract_features.py")
    data.add_argument("--image-size", type=int, default=256)
    data.add_argument("--num-classes", type=int, default=1000, help="1 = unconditional (FFHQ)")
    data.add_argument("--vae", type=str, default="ema",
                      help="VAE of the latents (ema, mse or a path; recorded in checkpoints); none = pixel space")
    data.add_argument("--num-workers", type=int, default=4)
    model = parser.add_argument_group("model")
    model.add_argument("--model", type=str, choices=model_names(), default="DiT-XL/2")
    model.add_argument("--model-arg", dest="model_args", type=parse_model_arg, action=ModelArgAction, default=None,
                       metavar="KEY=VALUE",
                       help="override a constructor argument of --model, e.g. hidden_size=64 or channel_mult=[1,2] "
                            "(repeatable; VALUE is read as YAML; in a config: a model_args mapping)")
    model.add_argument("--routing", type=str, choices=ROUTING_KINDS, default="none",
                       help="none = vanilla, random = R-TR, dtr = DTR (Sec. 4)")
    model.add_argument("--alpha", type=float, default=4.0, help="DTR window shift exponent (Eq. 4)")
    model.add_argument("--beta", type=float, default=0.8, help="share of active channels per task")
    model.add_argument("--routing-seed", type=int, default=0, help="seed of the R-TR masks")
    model.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    diff = parser.add_argument_group("diffusion")
    diff.add_argument("--noise-schedule", type=str, choices=NOISE_SCHEDULES, default="squaredcos_cap_v2",
                      help="squaredcos_cap_v2 or its other name cosine (paper); linear = official DiT")
    diff.add_argument("--loss-weighting", type=str, choices=WEIGHTINGS, default="vanilla")
    diff.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR gamma")
    diff.add_argument("--p2-k", type=float, default=1.0)
    diff.add_argument("--p2-gamma", type=float, default=1.0)
    diff.add_argument("--ant-num-clusters", type=int, default=8, help="ANT-UW timestep clusters")
    diff.add_argument("--ant-lr", type=float, default=0.025, help="ANT-UW lr of the log-variances s_k")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--results-dir", type=str, default="results")
    optim.add_argument("--epochs", type=int, default=1400)
    optim.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides --epochs)")
    optim.add_argument("--global-batch-size", type=int, default=256)
    optim.add_argument("--global-seed", type=int, default=0)
    optim.add_argument("--lr", type=float, default=1e-4)
    optim.add_argument("--ema-decay", type=float, default=0.9999)
    optim.add_argument("--mixed-precision", type=str, choices=["no", "bf16", "fp16"], default="no")
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
    add_launch_arguments(parser)
    return parser


def parse_model_arg(text):
    """--model-arg KEY=VALUE -> (key, value), VALUE read as YAML: 64, 0.5, true, [1, 2, 2], dtr."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. hidden_size=64), got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r} (YAML: 64, 0.5, true, [1, 2])") from None


class ModelArgAction(argparse.Action):
    """Repeatable --model-arg KEY=VALUE collected into one {KEY: VALUE} mapping, a later KEY winning."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, value = values
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: value})


def config_to_argv(parser, path):
    """YAML {key: value} -> flag tokens, so argparse type-checks them; unknown keys are an error naming them.

    The mapping under model_args becomes one --model-arg KEY=VALUE per entry.
    """
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f"config {path} must be a mapping of flag names to values")
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = sorted(k for k in config if str(k).replace("-", "_") not in flags)
    if unknown:
        raise ValueError(f"unknown keys in config {path}: {', '.join(map(str, unknown))} "
                         f"(valid: {', '.join(sorted(flags))})")
    argv = []
    for key, value in config.items():
        if str(key).replace("-", "_") == "model_args":
            if not isinstance(value, dict):
                raise ValueError(f"model_args in config {path} must be a mapping of constructor arguments to "
                                 f"values, got {value!r}")
            for name, arg in value.items():
                argv += ["--model-arg", f"{name}={json.dumps(arg)}"]  # JSON is YAML: parse_model_arg reads it back
            continue
        action = flags[str(key).replace("-", "_")]
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def parse_args(argv=None):
    """Parse flags, with --config FILE.yaml supplying defaults that the command line overrides."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        argv = config_to_argv(parser, known.config) + argv  # later flags win in argparse
    return parser.parse_args(argv)


def check_data_paths(args):
    """Clear errors for a missing or empty data folder, before anything is built or written."""
    if (args.data_path is None) == (args.feature_path is None):
        raise ValueError("give exactly one of --data-path (images) or --feature-path (precomputed latents)")
    for flag in ("data_path", "feature_path"):
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} does not exist or is not a directory: {path}")
        if path is not None and not os.listdir(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} is empty: {path}")
    if args.resume not in (None, "auto") and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume checkpoint not found: {args.resume}")


def validate_args(args):
    """Clear errors for flag values that would fail later (or silently do the wrong thing); no file access."""
    if args.model not in model_names():
        raise ValueError(f"unknown model {args.model!r}; expected one of {', '.join(model_names())}")
    overrides = model_overrides(args)
    check_overrides(args.model, overrides)
    for key in overrides:
        if key in MODEL_ARGS_SET_BY_TRAIN:
            raise ValueError(f"--model-arg {key}=... is set by {MODEL_ARGS_SET_BY_TRAIN[key]}, not by --model-arg")
    if args.routing not in ROUTING_KINDS:
        raise ValueError(f"unknown routing {args.routing!r}; expected one of {', '.join(ROUTING_KINDS)}")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise ValueError(f"--alpha must be a finite number > 0, got {args.alpha}")
    if not 0 < args.beta <= 1:
        raise ValueError(f"--beta must lie in (0, 1], got {args.beta}")
    if args.feature_path is not None and args.vae == "none":
        raise ValueError("--vae none trains in pixel space; it cannot be combined with --feature-path latents")
    for flag in ("global_batch_size", "log_every", "ckpt_every", "epochs", "image_size", "num_classes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.resume == "auto" and args.exp_name is None:
        raise ValueError("--resume auto needs --exp-name NAME: a numbered run folder is new at every start")
    if args.exp_name is not None and (not args.exp_name or os.sep in args.exp_name or args.exp_name in (".", "..")):
        raise ValueError(f"--exp-name must be a folder name without '{os.sep}', got {args.exp_name!r}")
    for flag in ("keep_last", "keep_every"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.keep_every is not None and args.keep_last is None:
        raise ValueError("--keep-every only spares checkpoints from --keep-last pruning; give --keep-last K too")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not 0 <= args.ema_decay <= 1:
        raise ValueError(f"--ema-decay must lie in [0, 1], got {args.ema_decay}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")


if __name__ == "__main__":
    main(parse_args())
