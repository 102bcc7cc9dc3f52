"""Gaussian diffusion for DiT / DTR: drop-in for official DiT's `diffusion` package, plus MTL loss weightings.

    from diffusion import create_diffusion
    diffusion = create_diffusion(timestep_respacing="")             # training: all 1000 steps
    sampler = create_diffusion("250", noise_schedule="squaredcos_cap_v2")   # paper: DDPM-250, cosine
    ddim = create_diffusion("ddim50")                                # ddim_sample_loop: 50 model calls
    fast = create_diffusion("trailing20")       # dpm_solver.dpm_solver_pp_sample_loop(fast, model, shape): 20 calls

The model is always called as model(x_t, t, **model_kwargs) with ORIGINAL-scale int64 t in
[0, diffusion_steps), also after respacing, so DTR masks are looked up by the true timestep.

How train.py uses the loss weighting (paper Table 2)
----------------------------------------------------
    diffusion = create_diffusion("", noise_schedule=args.noise_schedule,
                                 loss_weighting=args.loss_weighting,        # vanilla|min-snr|p2|ant-uw
                                 min_snr_gamma=5.0, p2_k=1.0, p2_gamma=1.0, ant_num_clusters=8, ant_lr=0.025)
    weighting = diffusion.loss_weighting.to(device)      # nn.Module; s_k for ant-uw, nothing to learn otherwise
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    for group in weighting.param_groups():               # [] unless ant-uw: [{"params": [s_k], "lr": 0.025,
        opt.add_param_group(group)                       #                     "weight_decay": 0.0}]
    sampler = diffusion.timestep_sampler                 # uniform; stratified over the 8 clusters for ant-uw
    gen = torch.Generator(device=device).manual_seed(seed)   # optional; checkpoint its state for exact resume
    ...
    t = sampler.sample_timesteps(x.shape[0], device, generator=gen)  # (N,) int64 (or official: t, _ = sampler.sample(N, device))
    loss_dict = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y))
    loss = loss_dict["loss"].mean()                      # weighting already applied per sample
    opt.zero_grad(); loss.backward()
    weighting.all_reduce_gradients()                     # DDP: s_k is outside the DDP model; averages its grad
    opt.step()
    checkpoint["loss_weighting"] = weighting.state_dict()        # {"log_vars": (K,)} for ant-uw, {} otherwise
    weighting.load_state_dict(checkpoint["loss_weighting"])      # on resume (opt state carries the s_k group)

loss_dict holds per-sample (N,) tensors: "mse" (raw), "weighted_mse", "vb" (learned sigma) and
"loss" = weighted_mse + vb; Min-SNR and P2 leave the VB term unweighted. ANT-UW weights the whole
loss as the ANT and DTR releases do: "loss" = ant_uw(mse + vb, t), whose mean over the global batch is
sum_k 0.5 * (exp(-s_k) L_k / K + s_k) over the clusters in the batch; with a batch size not
divisible by K the stratified sampler gives N mod K randomly chosen clusters one extra sample
(see timestep_sampler.StratifiedTimestepSampler). Min-SNR weights follow the prediction target
(eps: min(snr, g)/snr, x0: min(snr, g), v: min(snr, g)/(snr + 1)).

Guidance for sampling: diffusion.guidance.ClassifierFreeGuidance (see its module docstring).
"""

from . import gaussian_diffusion as gd
from .guidance import ClassifierFreeGuidance
from .loss_weighting import WEIGHTINGS
from .respace import SpacedDiffusion, space_timesteps
from .schedules import NUM_TIMESTEPS, PAPER_SCHEDULE, SCHEDULES, get_named_beta_schedule

__all__ = ["create_diffusion", "ClassifierFreeGuidance", "SpacedDiffusion", "space_timesteps",
           "get_named_beta_schedule", "WEIGHTINGS"]


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=NUM_TIMESTEPS,
    predict_v=False,
    loss_weighting="vanilla",
    min_snr_gamma=5.0,
    p2_k=1.0,
    p2_gamma=1.0,
    ant_num_clusters=8,
    ant_lr=0.025,
):
    """A SpacedDiffusion with official DiT's arguments and defaults, plus v-prediction and loss weighting."""
    if predict_xstart and predict_v:
        raise ValueError("predict_xstart and predict_v are exclusive: choose one prediction target")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if predict_xstart:
        mean_type = gd.ModelMeanType.START_X
    elif predict_v:
        mean_type = gd.ModelMeanType.VELOCITY
    else:
        mean_type = gd.ModelMeanType.EPSILON
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        loss_weighting=loss_weighting,
        loss_weighting_kwargs=dict(min_snr_gamma=min_snr_gamma, p2_k=p2_k, p2_gamma=p2_gamma,
                                   ant_num_clusters=ant_num_clusters, ant_lr=ant_lr),
    )
