"""One optimiser step of train.py on this rank's share of the global batch (App. C), with no host sync.

Every random draw of a step (timesteps, noise, label or caption drops, posterior latents) is made for the
whole global batch from a generator seeded by (global seed, step) on the device; each rank keeps its own
samples (rank r holds global samples r, r + world_size, ..., as the sampler deals them). So a global batch
is the same whatever the world size, a resumed run continues bit for bit, and ANT-UW counts its clusters
from the global timesteps on every rank without a collective.
"""
import numpy as np
import torch

from imagedata.latents import sample_posterior
from training.fast_path import autocast_model


def step_generator(global_seed, step, device):
    """Generator for one training step, seeded by (global_seed, step) only: no state to checkpoint."""
    seed = int(np.random.SeedSequence([global_seed, step]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def train_step(state, ddp_model, diffusion, x, y, args, rank, world_size, autocast_dtype, ema_update,
               posterior_latents=False, text=None, image_ids=None):
    """One optimiser step, then the EMA (ema_update: a training.ema.EMAUpdater of state.ema and state.model).

    Returns the loss (0-dim), and this rank's timesteps t (B,) and per-sample losses (B,) for the monitor.

    x: (B, C, H, W) images in [-1, 1] or scaled latents; with posterior_latents (B, 2, C, h, w), a VAE
    posterior's mean and std, from which this step draws its latent as official DiT's latent_dist.sample().
    text (a CaptionConditioning) conditions on a caption of each image in image_ids (B,) instead of y.
    """
    device, G = x.device, args.global_batch_size
    g = step_generator(args.global_seed, state.step, device)
    if args.timestep_range is not None:  # one expert of Table 6's multi-experts: only its own tasks
        lo, hi = args.timestep_range
        global_t = torch.randint(lo, hi + 1, (G,), generator=g, device=device)
    else:
        global_t = diffusion.timestep_sampler.sample_timesteps(G, device, generator=g)
    t = global_t[rank::world_size]
    noise = torch.randn((G, *x.shape[-3:]), generator=g, device=device)[rank::world_size]
    dropout_prob = state.model.config["class_dropout_prob" if text is None else "caption_dropout_prob"]
    drop = torch.rand(G, generator=g, device=device)[rank::world_size] < dropout_prob
    if posterior_latents:  # drawn last, so the other draws are those of a run on stored means
        eps = torch.randn((G, *x.shape[-3:]), generator=g, device=device)[rank::world_size]
        x = sample_posterior(x, eps)  # (B, C, h, w)
    model_kwargs = dict(y=y, force_drop_ids=drop.long() if dropout_prob > 0 else None)
    if text is not None:  # this step's caption of each image, encoded by the frozen CLIP model
        model_kwargs = text.training_kwargs(image_ids, args.global_seed, state.step, G, rank, world_size,
                                            model_kwargs["force_drop_ids"])
    # the model runs under autocast; its output and the whole loss are fp32 (training.fast_path)
    model_fn = autocast_model(ddp_model, device.type, autocast_dtype)
    losses = diffusion.training_losses(model_fn, x, t, model_kwargs, noise=noise, global_t=global_t)["loss"]
    loss = losses.mean()
    state.opt.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.weighting.all_reduce_gradients()  # ANT-UW's s_k are outside DDP
    state.scaler.step(state.opt)
    state.scaler.update()
    ema_update(args.ema_decay)
    return loss.detach(), t, losses.detach()
