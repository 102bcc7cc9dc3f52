"""Pins diffusion/dpm_solver.py (DPM-Solver++(2M), Lu et al. 2022 Alg. 2) against the math of a Gaussian.

For data N(MU, S^2) the exact x_0 prediction is known in closed form, and so is the probability-flow ODE: along it
(x_t - a_t MU) / sqrt(a_t^2 S^2 + sig_t^2) is constant. The solver's error against that exact flow must vanish
at second order (first order for order=1), and its first-order step must be DDIM's.
"""
import math

import numpy as np
import pytest
import torch

from diffusion import create_diffusion
from diffusion.dpm_solver import dpm_solver_pp_coefficients, dpm_solver_pp_sample_loop

MU, S = 0.8, 0.5


def exact_x0(x, alpha_bar):
    """E[x_0 | x_t] for data N(MU, S^2): MU + a S^2 / (a^2 S^2 + sig^2) (x_t - a MU)."""
    a2 = alpha_bar
    return MU + math.sqrt(a2) * S * S / (a2 * S * S + 1 - a2) * (x - math.sqrt(a2) * MU)


def exact_flow(x, alpha_bar_from, alpha_bar_to):
    """The probability-flow ODE's exact map between two noise levels for data N(MU, S^2)."""
    a, b = math.sqrt(alpha_bar_from), math.sqrt(alpha_bar_to)
    scale = math.sqrt((b * b * S * S + 1 - alpha_bar_to) / (a * a * S * S + 1 - alpha_bar_from))
    return b * MU + scale * (x - a * MU)


def solve(alphas_cumprod, x, order):
    """Integrate with the solver's coefficients and the exact x_0 prediction (float64)."""
    x0_prev = None
    for i, (a, b, c) in enumerate(dpm_solver_pp_coefficients(alphas_cumprod, order)):
        x0 = exact_x0(x, alphas_cumprod[i])
        x = a * x + b * x0 + (c * x0_prev if c else 0.0)
        x0_prev = x0
    return x


def lambda_uniform(steps, lam_start=-3.0, lam_end=3.0):
    """alpha_bar on a grid uniform in lambda = log(alpha / sigma): alpha_bar = sigmoid(2 lambda)."""
    return [1 / (1 + math.exp(-2 * lam)) for lam in np.linspace(lam_start, lam_end, steps + 1)]


@pytest.mark.parametrize("order", [1, 2])
def test_error_vanishes_at_the_solvers_order_when_steps_double(order):
    x = np.linspace(-3, 3, 7)
    errors = []
    for steps in (16, 32, 64, 128):
        grid = lambda_uniform(steps)
        errors.append(np.abs(solve(grid, x, order) - exact_flow(x, grid[0], grid[-1])).max())
    ratios = [errors[k] / errors[k + 1] for k in range(len(errors) - 1)]
    # a method of order p divides its global error by 2^p when the step halves (asymptotically)
    assert 2 ** order * 0.8 < ratios[-1] < 2 ** order * 1.25, (errors, ratios)
    assert all(r > 2 ** order * 0.7 for r in ratios), ratios


def test_sampler_on_the_discrete_grid_converges_to_the_exact_flow():
    """Full sampler (eps model, learned sigma, 1000-step linear schedule): error against exact ODE + final denoise."""
    base = create_diffusion("").alphas_cumprod
    z = torch.linspace(-3, 3, 13, dtype=torch.float64).view(-1, 1)

    def oracle_eps(x, t):  # the eps half, var channels ignored by the solver
        a2 = torch.from_numpy(base)[t].view(-1, 1)
        x0 = MU + a2.sqrt() * S * S / (a2 * S * S + 1 - a2) * (x - a2.sqrt() * MU)
        return torch.cat([(x - a2.sqrt() * x0) / (1 - a2).sqrt(), torch.zeros_like(x)], dim=1)

    # exact: flow from t = 999 to t = 0, then the same final x_0 prediction the sampler ends with
    expected = exact_x0(exact_flow(z, base[-1], base[0]), base[0])
    errors = []
    for steps in (20, 40, 80, 160):  # "N" keeps N timesteps from 999 to 0, so the last step starts at t = 0
        d = create_diffusion(str(steps))
        errors.append((dpm_solver_pp_sample_loop(d, oracle_eps, z.shape, noise=z) - expected).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-2] / errors[-1] > 3, errors


def test_first_order_step_is_ddim_and_second_order_sampler_is_deterministic():
    d = create_diffusion("trailing7", noise_schedule="squaredcos_cap_v2")  # learned sigma: the solver takes eps

    def model(x, t):  # a smooth nonlinear eps(x, t) that mixes pixels, with a variance half
        eps = torch.tanh(0.7 * x + 0.3 * x.roll(1, dims=-1) + t.view(-1, 1, 1, 1) / 1000)
        return torch.cat([eps, torch.ones_like(eps)], dim=1)

    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for clip in (False, True):
        ddim = d.ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=clip, eta=0.0)
        first = dpm_solver_pp_sample_loop(d, model, noise.shape, noise=noise, clip_denoised=clip, order=1)
        torch.testing.assert_close(first, ddim, rtol=1e-10, atol=1e-10)
    second = dpm_solver_pp_sample_loop(d, model, noise.shape, noise=noise)
    assert not torch.allclose(second, first)
    assert torch.equal(second, dpm_solver_pp_sample_loop(d, model, noise.shape, noise=noise.clone()))


def test_trailing_respacing_keeps_uniform_steps_down_from_the_last_timestep():
    assert create_diffusion("trailing20").timestep_map == list(range(49, 1000, 50))
    assert create_diffusion("trailing3").timestep_map == [332, 666, 999]
    assert len(create_diffusion("trailing1000").timestep_map) == 1000
    with pytest.raises(ValueError, match="1001 steps"):
        create_diffusion("trailing1001")


def test_bad_grids_and_orders_are_refused():
    with pytest.raises(ValueError, match="order"):
        dpm_solver_pp_coefficients([0.1, 0.5], order=3)
    with pytest.raises(ValueError, match="increase"):
        dpm_solver_pp_coefficients([0.5, 0.1])
    with pytest.raises(ValueError, match="increase"):
        dpm_solver_pp_coefficients([0.5, 1.0, 1.0])


def test_whole_guided_solve_has_no_host_sync():
    # on the meta device any scalar read, data-dependent size or host -> device copy would be recorded
    from diffusion.guidance import ClassifierFreeGuidance
    from models import DiT
    from monitoring.host_syncs import HostSyncCounter
    from sampling.seeded import null_condition
    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, in_channels=4, num_classes=10,
                learn_sigma=True, routing="dtr").to("meta").eval()
    guided = ClassifierFreeGuidance(model, 1.5, null_condition(model))
    noise = torch.zeros(3, 4, 8, 8, device="meta")
    y = torch.zeros(3, dtype=torch.long, device="meta")
    diffusion = create_diffusion("trailing4")
    with torch.no_grad():
        # the first solve also moves the model's constants to the device, once; the second must not sync at all
        dpm_solver_pp_sample_loop(diffusion, guided, noise.shape, noise=noise, model_kwargs={"y": y})
        with HostSyncCounter() as syncs:
            dpm_solver_pp_sample_loop(diffusion, guided, noise.shape, noise=noise, clip_denoised=True,
                                      model_kwargs={"y": y})
    assert syncs.events == []
