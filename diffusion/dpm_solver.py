"""DPM-Solver++(2M): a second-order multistep solver of the diffusion ODE in data-prediction form.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Alg. 2.
With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t),
h_i = lambda_{t_i} - lambda_{t_{i-1}} and x0_i the model's data prediction at (x_{t_i}, t_i):

    x_{t_1} = (sigma_{t_1} / sigma_{t_0}) x_{t_0} - alpha_{t_1} (e^{-h_1} - 1) x0_0                (first order)
    D_i     = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2},   r_i = h_{i-1} / h_i
    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i           (i >= 2)

The first-order step is DDIM (eta = 0) exactly. The solver steps over the diffusion's kept timesteps, so the
model only sees the integer timesteps it was trained on; sampling scripts use create_diffusion("trailingN"):
N timesteps time-uniform from 999 (999, 949, ..., 49 for N = 20; "trailing" spacing, Lin et al. 2024), the
uniform-t steps Lu et al. use for guided sampling. The last step goes from the smallest kept timestep to the
data (alpha_bar = 1, lambda = +inf), where the multistep correction is undefined (r = 0): it is first order,
i.e. returns the x_0 prediction there, exactly as DDIM's last step does. N timesteps cost N model calls.

Any prediction target works (x_0 is derived from eps, x_0 or v); learned-sigma models use the eps half of their
output. Guidance composes by passing a guided model (diffusion.guidance.ClassifierFreeGuidance). The sampler
draws no noise: the result is a deterministic function of the initial noise.
"""
import math

import torch
from tqdm import tqdm

from .gaussian_diffusion import ModelMeanType, ModelVarType, split_learned_variance


def dpm_solver_pp_coefficients(alphas_cumprod, order=2):
    """Per-step update coefficients for a decreasing-noise sequence of alpha_bar values (M + 1 of them).

    Returns a list of M tuples (a, b, c) with x_next = a x + b x0_now + c x0_prev (c = 0 on first-order steps).
    An alpha_bar of 1 (the data, sigma = 0) may only come last; that step is x_next = x0_now.
    """
    if order not in (1, 2):
        raise ValueError(f"DPM-Solver++ order must be 1 or 2, got {order!r}")
    alphas_cumprod = [float(a) for a in alphas_cumprod]
    if len(alphas_cumprod) < 2 or not all(0 < a <= 1 for a in alphas_cumprod):
        raise ValueError("need at least two alpha_bar values in (0, 1]")
    if any(a >= b for a, b in zip(alphas_cumprod, alphas_cumprod[1:])) or 1.0 in alphas_cumprod[:-1]:
        raise ValueError("alpha_bar must increase strictly along the solver's steps (noise decreasing), "
                         "with alpha_bar = 1 (the data) only at the end")
    # in float64 on the host: scalars, so the sampling loop multiplies by Python floats (no device syncs)
    alpha = [math.sqrt(a) for a in alphas_cumprod]
    sigma = [math.sqrt(1.0 - a) for a in alphas_cumprod]
    lam = [math.log(al / s) if s > 0 else math.inf for al, s in zip(alpha, sigma)]
    coefficients, h_prev = [], None
    for i in range(len(alphas_cumprod) - 1):
        if sigma[i + 1] == 0.0:  # to the data: e^{-h} = 0, and r = h_prev / h = 0 makes D undefined
            coefficients.append((0.0, alpha[i + 1], 0.0))
            continue
        h = lam[i + 1] - lam[i]
        a = sigma[i + 1] / sigma[i]
        phi = -alpha[i + 1] * math.expm1(-h)  # -alpha_{t_i} (e^{-h_i} - 1) > 0
        if order == 1 or h_prev is None:
            coefficients.append((a, phi, 0.0))
        else:
            r = h_prev / h
            coefficients.append((a, phi * (1.0 + 0.5 / r), -phi * 0.5 / r))
        h_prev = h
    return coefficients


def dpm_solver_pp_sample_loop(diffusion, model, shape, noise=None, clip_denoised=False, denoised_fn=None,
                              model_kwargs=None, device=None, progress=False, order=2):
    """Sample x_0 with DPM-Solver++(2M) over the diffusion's kept timesteps, then the data (one model call each).

    Same arguments as GaussianDiffusion.ddim_sample_loop, plus the diffusion itself; order=1 is DDIM (eta = 0).
    clip_denoised / denoised_fn act on every x_0 prediction, as in the DDPM and DDIM samplers.
    """
    # original-scale timesteps of the kept steps; the spaced alphas_cumprod are the original ones there
    timesteps = list(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))
    alphas_cumprod = list(diffusion.alphas_cumprod[::-1]) + [1.0]  # noisiest kept timestep first, then the data
    coefficients = dpm_solver_pp_coefficients(alphas_cumprod, order)
    timesteps = timesteps[::-1]
    x, device = diffusion._initial_noise(model, shape, noise, device)
    x0_prev = None
    steps = tqdm(range(len(timesteps))) if progress else range(len(timesteps))
    for i in steps:
        t = torch.full((shape[0],), timesteps[i], device=device, dtype=torch.long)
        with torch.no_grad():
            x0 = predict_data(diffusion, model(x, t, **(model_kwargs or {})), x, alphas_cumprod[i])
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        a, b, c = coefficients[i]
        x = b * x0 if a == 0.0 else a * x + b * x0  # a = 0 on the last step: the data is the x_0 prediction
        if c != 0.0:  # the multistep correction from the previous x_0 prediction
            x = x + c * x0_prev
        x0_prev = x0
    return x


def predict_data(diffusion, model_output, x, alpha_bar):
    """x_0 from the model's output at noise level alpha_bar: eps (the eps half if sigma is learned), x_0 or v."""
    if diffusion.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
        model_output, _ = split_learned_variance(model_output, x.shape[1])
    elif model_output.shape[1] != x.shape[1]:
        raise ValueError(f"fixed variance needs {x.shape[1]} output channels, got {model_output.shape[1]}")
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if diffusion.model_mean_type == ModelMeanType.START_X:
        return model_output
    if diffusion.model_mean_type == ModelMeanType.VELOCITY:
        return alpha * x - sigma * model_output  # Salimans & Ho 2022, Sec. 4
    return (x - sigma * model_output) / alpha
