"""Noise schedules: beta_t for t = 0..T-1 (DDPM Sec. 4; improved DDPM Sec. 3.2)."""

import math

import numpy as np

NUM_TIMESTEPS = 1000  # T, the diffusion steps of training (DDPM, ADM, DiT and the paper)
# "cosine" is ADM's and the DTR release's name for squaredcos_cap_v2
SCHEDULES = ("linear", "squaredcos_cap_v2", "cosine")
PAPER_SCHEDULE = "squaredcos_cap_v2"  # the paper trains with the cosine schedule (App. C); official DiT with linear


def linear_beta_schedule(num_diffusion_timesteps):
    """Linear betas from 1e-4 to 0.02 at T = 1000 (DDPM Sec. 4), rescaled so other T keep the same alpha_bar(1)."""
    # ADM's rescaling: scale the endpoints by 1000 / T so that T = 4000 behaves like T = 1000
    scale = 1000.0 / num_diffusion_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)


def cosine_alpha_bar(t):
    """alpha_bar(t) for t in [0, 1]: cos^2(((t + s) / (1 + s)) * pi / 2) with s = 0.008 (improved DDPM Eq. 17)."""
    s = 0.008
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t), capped at max_beta (improved DDPM Sec. 3.2)."""
    T = num_diffusion_timesteps
    # the cap keeps the last step from being singular (beta = 1 at alpha_bar(1) = 0)
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas for a named schedule: "linear" (DDPM, official DiT default) or "squaredcos_cap_v2" = "cosine"."""
    if not isinstance(num_diffusion_timesteps, int) or num_diffusion_timesteps < 1:
        raise ValueError(f"diffusion_steps must be a positive int, got {num_diffusion_timesteps!r}")
    if schedule_name == "linear":
        return linear_beta_schedule(num_diffusion_timesteps)
    if schedule_name in ("squaredcos_cap_v2", "cosine"):
        return betas_for_alpha_bar(num_diffusion_timesteps, cosine_alpha_bar)
    raise ValueError(f"unknown noise_schedule {schedule_name!r}; expected one of {SCHEDULES}")
