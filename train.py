"""
Train a DiT or ADM, optionally with Denoising Task Routing, using PyTorch DDP (Park et al., ICLR 2024, Sec. 5, App. C).

    torchrun --nnodes=1 --nproc_per_node=8 train.py --feature-path features/imagenet256 --model DiT-L/2 --routing dtr
    python train.py --config configs/table1/imagenet256_dit_l2_dtr.yaml --feature-path features/imagenet256
    torchrun --nproc_per_node=8 train.py --config configs/table1/ffhq64_adm_dtr.yaml --data-path data/ffhq  # ADM, pixels
    python train.py --config configs/tiny_fashion_mnist.yaml   # small CPU run in pixel space
    python train.py --config configs/table1/coco256_dit_b2_dtr.yaml --feature-path features/coco256 \
        --captions coco/annotations/captions_train2014.json --text-encoder openai/clip-vit-large-patch14

--model takes every zoo name of models.create_model (DiT-S/2 ... DiT-XL/8, TextDiT-S/2 ... TextDiT-XL/8,
ADM-ImageNet64, ADM-FFHQ64);
--model-arg KEY=VALUE (or a config's model_args: mapping) overrides any constructor argument.
The flags, the YAML --config beneath them and their checks are in training/flags.py.

Defaults are the paper's setting: AdamW lr 1e-4 without weight decay, EMA 0.9999, random horizontal flip,
cosine schedule over 1000 steps, learned sigma; the model runs under bf16 autocast on GPUs with bf16 (the authors'
release trained in mixed precision; --mixed-precision no for fp32), the loss and optimiser stay fp32
(training/fast_path.py, with DDP's settings and --compile's per-block compile). Runs under torchrun or srun (nccl on GPU, gloo on CPU) or as a
plain single process. Every global batch is the same whatever the world size: the sampler splits each global batch
over ranks, and the timesteps, noise and label dropout of a step are drawn for the whole global batch from a
generator seeded by (global seed, step), each rank taking its own samples. So 2 ranks x B match 1 rank x 2B,
and a resumed run continues bit for bit. Text models (TextDiT-*, MS-COCO, App. C): each image's caption is drawn
per step from a stream of (global seed, step) for the whole global batch (imagedata/caption_conditioning.py), encoded
on the fly by the frozen CLIP --text-encoder; the label drops become caption drops to the learned null caption.

Outputs in <results-dir>/<NNN>-<model>/ (model "DiT-S/2" -> "DiT-S-2") or <results-dir>/<--exp-name>/:
config.yaml and starts.jsonl (written at start: storage/run_record.py), log.txt, metrics.jsonl (one
{"step", "loss", ...} per --log-every), tensorboard/ and samples/ (--tensorboard, --sample-every) and
checkpoints/<step:07d>.pt, written atomically, loadable with torch.load(weights_only=True):
    model, ema, opt (state_dicts), step, args (dict), model_config ({"model": zoo name, **every constructor argument};
    rebuild with models.build_from_config), diffusion_config (create_diffusion kwargs), vae, image_size, latent_scale,
    loss_weighting (its state_dict: ANT-UW s_k), rng (one dict per rank: torch, numpy, python, cuda),
    data_state ({epoch, position = batches done in the epoch, sampler_seed, global_batch_size}),
    scaler (fp16 only), loss_log ({sums: (world_size,) running loss sums, steps}: the next log line after a
    resume averages the same steps as a straight run), dataset ({num_samples, num_classes}), text_encoder and
    captions (text models: the CLIP encoder's hub name or local directory, the annotation file). The per-step
    generator needs no state: it is reseeded from (global seed, step).

Clusters: SIGTERM, SIGUSR1 or SIGINT stop every rank after the current step, with a checkpoint of it, and
exit 0 (launch/preemption.py). --exp-name NAME --resume auto continues the newest checkpoint of
<results-dir>/NAME or starts there, so a requeued job reruns the same command; --keep-last K prunes.
A resume may change --lr (applied and logged); other trajectory settings are refused (storage/resume_policy.py).
A run folder is held by one job (storage/run_lock.py); checkpoints carry a SHA-256 that every reader checks
(storage/checkpoint_integrity.py); an image that fails to decode mid-run stops every rank after a checkpoint of the
last good step, or is replaced under --skip-bad-images (imagedata/unreadable_images.py).
"""
import copy
import functools
import os
import sys
from glob import glob

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from diffusion import NUM_TIMESTEPS, create_diffusion
from foundation.usage_error import UsageError
from imagedata.epoch_loader import EpochLoader
from imagedata.unreadable_images import BatchesAhead, ReportUnreadable
from launch.cli import RunFailure, check_on_every_rank, make_output_dir, run_command, write_on_rank_zero
from launch.preemption import PreemptionFlag, ignore_preemption_signals
from launch.process_group import cleanup_distributed, describe_distributed, setup_distributed
from models import create_model
from models import model_config as model_config_of
from models.routing import check_routing_covers
from models.vae import LATENT_SCALE, NO_VAE, load_vae
from monitoring.training_log import LossLog, close_logger, create_logger, truncate_metrics
from monitoring.training_monitor import TrainingMonitor
from storage.checkpoint import (TrainingState, check_resume_compatible, read_training_checkpoint,
                                restore_training_state, save_checkpoint, training_checkpoint)
from storage.resume_policy import apply_learning_rate, check_fixed_settings, dataset_identity
from storage.rng_state import capture_rng_state, gather_rng_states, restore_rng_state
from storage.run_folder import prune_checkpoints, resolve_run
from storage.run_lock import RunFolderLock
from storage.run_record import write_run_record
from training.data_checks import check_data_fits_model, open_dataset, unused_classes_warning
from training.ema import EMAUpdater, requires_grad
from training.fast_path import AUTOCAST_DTYPES, compile_for_training, resolve_mixed_precision, wrap_ddp
from training.flags import build_parser, check_data_paths, is_text_model, model_overrides, parse_args, validate_args
from training.lr_schedule import learning_rate
from training.step import train_step


#################################################################################
#                             Training Helper Functions                         #
#################################################################################

def check_finite(first_bad_step, checkpoint_dir, world_size):
    """Stop every rank with the step number if any rank saw a non-finite loss (no checkpoint of it)."""
    no_bad = torch.full_like(first_bad_step, 2**62)
    worst = torch.where(first_bad_step < 0, no_bad, first_bad_step)
    if world_size > 1:
        dist.all_reduce(worst, op=dist.ReduceOp.MIN)
    if worst.item() != no_bad.item():
        saved = sorted(glob(f"{checkpoint_dir}/*.pt"))
        raise FloatingPointError(f"non-finite loss at step {worst.item()}; stopping. Last good checkpoint: "
                                 f"{saved[-1] if saved else 'none'}")


#################################################################################
#                               Model and Data Setup                            #
#################################################################################

def build_model(args, input_size, in_channels, num_classes, text_overrides=None):
    """The --model zoo entry with --model-arg overrides, sized to the data, routed as the flags say.

    text_overrides: a text model's token width and length (CaptionConditioning.model_overrides) instead of classes.
    """
    condition = {"num_classes": num_classes} if text_overrides is None else text_overrides
    try:
        return create_model(args.model, **model_overrides(args), **condition, input_size=input_size,
                            in_channels=in_channels, learn_sigma=True, routing=args.routing, alpha=args.alpha,
                            beta=args.beta, routing_seed=args.routing_seed, grad_checkpointing=args.grad_checkpointing)
    except ValueError as error:  # flags the model cannot be built from, e.g. a size its patch does not divide
        raise UsageError(f"--model {args.model}: {error}") from None


def load_text_conditioning(args, dataset, device):
    """The COCO captions of the training images and the frozen CLIP encoder (text models only)."""
    from imagedata.caption_conditioning import CaptionConditioning  # transformers only for text models
    try:
        return CaptionConditioning.for_training(args.text_encoder, args.captions, dataset,
                                                args.feature_path or args.data_path, device)
    except (OSError, ValueError) as error:  # captions missing, not covering the data; encoder not found offline
        raise UsageError(str(error)) from None


def diffusion_config_of(args):
    """create_diffusion kwargs of this run (stored in checkpoints; the samplers respace them)."""
    return dict(timestep_respacing="", noise_schedule=args.noise_schedule, learn_sigma=True,
                diffusion_steps=NUM_TIMESTEPS, loss_weighting=args.loss_weighting, min_snr_gamma=args.snr_gamma,
                p2_k=args.p2_k, p2_gamma=args.p2_gamma, ant_num_clusters=args.ant_num_clusters, ant_lr=args.ant_lr)


def build_training_state(args, dataset, device, text=None):
    """(TrainingState at step 0, diffusion): model, its EMA, AdamW, loss weighting; the same on every rank."""
    input_size, in_channels = check_data_fits_model(args, dataset)
    torch.manual_seed(args.global_seed)  # same init on every rank and any world size
    model = build_model(args, input_size, in_channels, args.num_classes,  # the model checks its shape
                        text.model_overrides() if text is not None else None).to(device)
    ema = copy.deepcopy(model).to(device)  # EMA starts as a copy of the model (official DiT)
    requires_grad(ema, False)
    diffusion_config = diffusion_config_of(args)
    diffusion = create_diffusion(**diffusion_config)
    try:
        check_routing_covers(model, diffusion.original_num_steps)
    except ValueError as error:
        raise UsageError(str(error)) from None
    weighting = diffusion.loss_weighting.to(device)  # ANT-UW's s_k train in their own optimizer group
    # fused AdamW: one kernel per tensor instead of ~10 (on CPU ~20x faster than the default loop)
    opt = torch.optim.AdamW([{"params": list(model.parameters())}, *weighting.param_groups()],
                            lr=args.lr, weight_decay=0, fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    latent = args.feature_path is not None
    settings = {"model_config": model_config_of(args.model, model), "diffusion_config": diffusion_config,
                "vae": getattr(dataset, "vae", args.vae) if latent else NO_VAE, "image_size": args.image_size,
                "latent_scale": getattr(dataset, "latent_scale", LATENT_SCALE) if latent else 1.0,
                "dataset": dataset_identity(dataset)}
    if text is not None:  # what the samplers rebuild the encoder from
        settings.update(text_encoder=text.name_or_path, captions=os.path.abspath(args.captions))
    return TrainingState(model, ema, opt, weighting, scaler, settings), diffusion


def build_loader(dataset, sampler, local_batch_size, num_workers, device, skip_bad_images=False):
    """One loader for the run (workers persist across epochs); loader.epoch(epoch, position) resumes mid-epoch.

    It yields (x, y, problems): an image that fails to decode is reported, not raised (imagedata/unreadable_images.py).
    """
    return EpochLoader(dataset, sampler, local_batch_size, num_workers, pin_memory=device.type == "cuda",
                       worker_init_fn=ignore_preemption_signals,  # the main process decides when to stop
                       wrap=lambda d: ReportUnreadable(d, skip_bad_images))


#################################################################################
#                          Run Folder and Checkpoints                           #
#################################################################################

def locate_run(args, rank, lock=None):
    """[run folder, checkpoint to resume, removed temp files, skipped checkpoints] on rank 0 (resolve_run)."""
    if rank != 0:
        return [None, None, [], []]
    if args.resume in (None, "auto"):
        make_output_dir(args.results_dir, "--results-dir")
    try:
        return list(resolve_run(args.results_dir, args.model.replace("/", "-"), args.exp_name, args.resume, lock))
    except OSError as error:
        raise UsageError(f"cannot prepare the run folder: {error.filename}: {error.strerror}") from None


def open_run(args, state, dataset, rank, world_size, lock=None):
    """(experiment dir, checkpoint resumed or None, lines for log.txt): rank 0 takes the folder (lock) and picks
    the checkpoint (--resume auto: the newest whole one in it), every rank restores the state."""
    located = check_on_every_rank(locate_run, args, rank, lock)  # a folder that cannot be written stops every rank
    if world_size > 1:
        dist.broadcast_object_list(located, src=0)
    experiment_dir, resume_path, removed_temp_files, skipped = located
    notes = [f"Removed {path}, left by a save that was killed mid-write" for path in removed_temp_files]
    notes += [f"--resume auto: skipped {path}: {why}" for path, why in skipped]
    checkpoint = None
    if resume_path is not None:  # rank 0 has checked it whole (resolve_run)
        checkpoint = read_training_checkpoint(resume_path, verify_checksum=False)
        check_resume_compatible(checkpoint, resume_path, state.settings["model_config"],
                                state.settings["diffusion_config"])
        check_fixed_settings(checkpoint, args, dataset_identity(dataset), resume_path)
        restore_training_state(state, checkpoint, resume_path)
        checkpoint["path"] = resume_path

    def prepare_folder():
        os.makedirs(f"{experiment_dir}/checkpoints", exist_ok=True)
        truncate_metrics(f"{experiment_dir}/metrics.jsonl", state.step)  # lines past the resume point are redone
        write_run_record(experiment_dir, args, world_size, resumed_from=resume_path, step=state.step)
    write_on_rank_zero(prepare_folder, rank, world_size)
    return experiment_dir, checkpoint, notes


def save(state, args, loss_log, checkpoint_dir, rank, world_size, logger):
    """Write <checkpoint_dir>/<step>.pt and prune (--keep-last); every rank calls it (RNG states are gathered)."""
    rng_states = gather_rng_states(world_size)
    loss_state = loss_log.state()

    def write():
        path = f"{checkpoint_dir}/{state.step:07d}.pt"
        save_checkpoint(training_checkpoint(state, args, rng_states, loss_state), path)
        logger.info(f"Saved checkpoint to {path}")
        if args.keep_last is not None:
            for removed in prune_checkpoints(checkpoint_dir, args.keep_last, args.keep_every):
                logger.info(f"Removed {removed} (--keep-last {args.keep_last})")
    write_on_rank_zero(write, rank, world_size)  # a full disk: one line on every rank, not a broken barrier


def stop_on_unreadable_image(batches, state, args, loss_log, checkpoint_dir, rank, world_size, logger, preemption,
                             rng_before_loader):
    """Checkpoint the last good step (unless saved already) and raise the RunFailure naming the file and step.

    Mid-epoch the loop has just saved it. When a loader's first batch failed, the step before it may not be saved
    yet: its checkpoint is written with the RNG states from before the loader was built, as a save at the end
    of that step would hold them, so that a resume from it continues bit for bit.
    """
    problems = [batches.unreadable]
    if world_size > 1:
        problems = [None] * world_size
        dist.all_gather_object(problems, batches.unreadable)
    problem = next(p for p in problems if p is not None)  # the lowest rank's: "PATH: reason"
    path = f"{checkpoint_dir}/{state.step:07d}.pt"
    if batches.stopped_at_start and state.step > 0 and not preemption.any_rank(rank == 0 and os.path.exists(path)):
        restore_rng_state(rng_before_loader)
        save(state, args, loss_log, checkpoint_dir, rank, world_size, logger)
    kept = f"step {state.step} is saved in {path}" if state.step > 0 else "no step was done"
    raise RunFailure(f"cannot read image {problem}, in the batch of step {state.step + 1}; {kept}. Replace or "
                     "remove the file and run again with --resume, or pass --skip-bad-images")


#################################################################################
#                                  Training Loop                                #
#################################################################################

def main(args):
    """Train a (DTR-routed) DiT or ADM; returns the experiment folder."""
    validate_args(args)
    check_data_paths(args)
    rank, world_size, device = setup_distributed(args.device, args.dist_timeout)
    try:
        # from here on, SIGTERM/SIGUSR1/SIGINT stop cleanly; the run folder is this job's until it ends
        with PreemptionFlag(world_size) as preemption, RunFolderLock() as lock:
            return train(args, rank, world_size, device, preemption, lock)
    finally:
        cleanup_distributed()


def train(args, rank, world_size, device, preemption=None, lock=None):
    """Set up (data, model, run folder, resume), then official DiT's loop: step, log, checkpoint."""
    preemption = preemption or PreemptionFlag(world_size)  # without handlers installed it never fires
    args.mixed_precision = resolve_mixed_precision(args.mixed_precision, device)  # recorded as resolved
    if args.global_batch_size % world_size != 0:
        raise UsageError(f"--global-batch-size {args.global_batch_size} is not divisible by the world size "
                         f"{world_size}")
    if device.type == "cuda":
        # TF32 as official DiT: faster matmuls on Ampere+, negligible effect on results
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Data first, so a bad path fails before anything is written; then model, EMA, diffusion, optimizer:
    dataset = open_dataset(args, rank, world_size)
    text = load_text_conditioning(args, dataset, device) if is_text_model(args.model) else None
    state, diffusion = build_training_state(args, dataset, device, text)
    model, ema = state.model, state.ema
    experiment_dir, checkpoint, notes = open_run(args, state, dataset, rank, world_size, lock)
    saved_lr = apply_learning_rate(state.opt, args.lr)  # a resumed optimizer state would restore the old lr
    checkpoint_dir = f"{experiment_dir}/checkpoints"
    logger = create_logger(experiment_dir, rank)
    loss_log = LossLog(f"{experiment_dir}/metrics.jsonl", logger, args.global_batch_size, rank, world_size, device)
    steps_per_epoch = len(dataset) // args.global_batch_size
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    local_batch_size = args.global_batch_size // world_size
    if args.lr_schedule == "cosine" and max_steps <= args.warmup_steps:
        raise UsageError(f"--lr-schedule cosine: {max_steps} steps (--epochs {args.epochs}) must exceed "
                         f"--warmup-steps {args.warmup_steps}")
    lr_at = functools.partial(learning_rate, base_lr=args.lr, schedule=args.lr_schedule,
                              warmup_steps=args.warmup_steps, total_steps=max_steps)
    try:
        for note in notes:
            logger.info(note)
        if checkpoint is not None:
            logger.info(f"Resumed from {checkpoint['path']} at step {state.step} (epoch {state.epoch}, "
                        f"batch {state.position})")
            if saved_lr != lr_at(state.step - 1):  # the lr of the checkpoint's last step, by this run's flags
                logger.info(f"Learning rate changed on resume: {saved_lr:g} -> {lr_at(state.step - 1):g} (--lr)")
        elif args.resume == "auto":
            logger.info(f"--resume auto: no checkpoint in {checkpoint_dir} yet, starting from step 0")
        logger.info(f"Experiment directory: {experiment_dir}")
        logger.info(describe_distributed(world_size, device))
        logger.info(f"{args.model} parameters: {sum(p.numel() for p in model.parameters()):,}; "
                    f"routing {model.routing_config()}")
        logger.info(f"Dataset contains {len(dataset):,} samples ({args.data_path or args.feature_path}); "
                    f"model input {model.in_channels}x{model.input_size}x{model.input_size}")
        warning = unused_classes_warning(args, dataset)
        if warning:
            logger.warning(warning)

        if args.compile:  # each block (inside DDP) and the loss, not the DDP model whole (training/fast_path.py)
            compile_for_training(model, diffusion)
        ddp_model = wrap_ddp(model, device, world_size)  # gradient_as_bucket_view, static_graph
        ema_update = EMAUpdater(ema, model)  # after the resume: the cached lists are the restored tensors
        # Per-rank seed for anything left on the global RNG (e.g. loader worker seeds), as official DiT
        torch.manual_seed(args.global_seed * world_size + rank)
        if checkpoint is not None:
            if len(checkpoint["rng"]) == world_size:
                restore_rng_state(checkpoint["rng"][rank])
            if "loss_log" in checkpoint:  # the log line after a resume averages the same steps as a straight run
                loss_log.restore(checkpoint["loss_log"])
        del checkpoint

        # The sampler splits each global batch over ranks (rank r takes every world_size-th sample), so a
        # global batch is the same set of samples whatever the world size; drop_last keeps steps equal.
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=args.global_seed, drop_last=True)
        loader = build_loader(dataset, sampler, local_batch_size, args.num_workers, device, args.skip_bad_images)
        model.train()  # important! This enables embedding dropout for classifier-free guidance
        ema.eval()
        autocast_dtype = AUTOCAST_DTYPES[args.mixed_precision]
        posterior_latents = getattr(dataset, "latent_stat", None) == "posterior"  # x: a VAE posterior's mean, std
        first_bad_step = torch.full((), -1, dtype=torch.long, device=device)  # 1-based step of first NaN/inf
        vae = state.settings["vae"]
        monitor = TrainingMonitor(experiment_dir, rank, world_size, device, max_steps, state.step,
                                  diffusion.num_timesteps, args.tensorboard, args.sample_every,
                                  load_vae=None if vae == NO_VAE else lambda: load_vae(vae, device))
        logger.info(f"Training for {max_steps} steps ({steps_per_epoch} steps per epoch), global batch "
                    f"{args.global_batch_size} = {world_size} ranks x {local_batch_size}")
        stopped = False
        while state.step < max_steps and not stopped:
            rng_before_loader = capture_rng_state()  # iterating a loader draws its workers' seeds
            # one batch ahead: an image that cannot be read stops every rank after the step before its batch
            batches = BatchesAhead(loader.epoch(state.epoch, state.position), preemption.any_rank,
                                   report=logger.warning if rank == 0 else
                                   lambda line: print(f"rank {rank}: {line}", file=sys.stderr))
            for x, y in batches:
                # (B, C, H, W): images in [-1, 1] or scaled latents; (B, 2, C, h, w): a VAE posterior's mean, std
                x = x.to(device, non_blocking=True)
                image_ids = y  # a text model's COCO image ids, on the host (its captions are drawn there)
                y = y.to(device, non_blocking=True)  # (B,)
                apply_learning_rate(state.opt, lr_at(state.step))  # a host float: no device sync
                loss, t, losses = train_step(state, ddp_model, diffusion, x, y, args, rank, world_size,
                                             autocast_dtype, ema_update, posterior_latents, text, image_ids)
                monitor.after_step(t, losses)
                state.step += 1
                state.position += 1
                loss_log.add(loss)
                first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss),
                                             torch.full_like(first_bad_step, state.step), first_bad_step)
                at_log = state.step % args.log_every == 0
                at_ckpt = state.step % args.ckpt_every == 0 or state.step == max_steps
                # same answer on every rank, after the same step: a signal, or an image of a next batch unreadable
                stopping = preemption.stop_requested(failed=batches.unreadable is not None and state.step < max_steps)
                if at_log or at_ckpt or stopping:  # checked here only, to avoid a device sync every step
                    check_finite(first_bad_step, checkpoint_dir, world_size)
                if at_log:
                    monitor.at_log(state.step, loss_log.write(state.step, lr=state.opt.param_groups[0]["lr"]))
                if state.position == steps_per_epoch:
                    state.epoch, state.position = state.epoch + 1, 0
                grid = monitor.sample_grid(state.step, ema, state.settings["diffusion_config"], args.global_seed,
                                           state.settings["latent_scale"])
                if grid is not None:
                    logger.info(f"Saved EMA samples to {grid}")
                if at_ckpt or stopping:
                    save(state, args, loss_log, checkpoint_dir, rank, world_size, logger)
                if stopping and preemption.failed:
                    break
                if stopping:
                    logger.info(f"Stopped by {preemption.name} after step {state.step} of {max_steps}; "
                                f"run the same command with --resume auto (or --resume {checkpoint_dir}/"
                                f"{state.step:07d}.pt) to continue")
                    stopped = True
                if state.step >= max_steps or stopped:
                    break
            if batches.stopped_at_start or preemption.failed:
                stop_on_unreadable_image(batches, state, args, loss_log, checkpoint_dir, rank, world_size, logger,
                                         preemption, rng_before_loader)
        model.eval()
        monitor.close()
        if not stopped:
            logger.info("Done!")
        return experiment_dir
    except (RunFailure, FloatingPointError) as error:
        logger.error(str(error))  # into log.txt too, not only on stderr
        raise
    finally:
        close_logger(logger)


if __name__ == "__main__":
    run_command(main, build_parser(), parse_args)  # the flags and their checks: training/flags.py
