"""Pins diffusion/gaussian_diffusion.py: q, posterior, parameterisations, losses and sampler accuracy."""

import numpy as np
import pytest
import torch

from diffusion import create_diffusion

MU, S = 0.8, 0.5  # data ~ N(MU, S^2) for the exact-denoiser sampling tests


def _alpha_bar(schedule="linear"):
    """Independent alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    betas = create_diffusion("", noise_schedule=schedule).betas
    return np.array([np.prod(1 - betas[: t + 1]) for t in range(len(betas))])


class NoiseOracle:
    """Returns the true target (eps, x0 or v) and var_values = -1, i.e. the posterior variance."""

    def __init__(self, target, learn_sigma=True):
        self.target, self.learn_sigma = target, learn_sigma
        self.seen_t = []

    def __call__(self, x, t):
        self.seen_t.append(t.clone())
        out = self.target
        return torch.cat([out, -torch.ones_like(out)], dim=1) if self.learn_sigma else out


def gaussian_denoiser(diffusion, learn_sigma):
    """Exact E[eps | x_t] for data N(MU, S^2) and, with learn_sigma, the exact reverse variance as var_values.

    x_t = a x_0 + sig eps with a^2 = alpha_bar(t) at the ORIGINAL t the model receives; x_t ~ N(a MU, v),
    v = a^2 S^2 + sig^2, so E[eps | x_t] = sig (x_t - a MU) / v. Because everything is Gaussian the true
    q(x_prev | x_t) has variance beta_tilde + coef1^2 Var[x_0 | x_t]; it is mapped into the learned range.
    """
    alpha_bar_orig = torch.from_numpy(create_diffusion("").alphas_cumprod)
    index_of = torch.full((len(alpha_bar_orig),), -1, dtype=torch.long)
    index_of[torch.tensor(diffusion.timestep_map)] = torch.arange(diffusion.num_timesteps)
    ab_prev = torch.from_numpy(diffusion.alphas_cumprod_prev)
    min_log = torch.from_numpy(diffusion.posterior_log_variance_clipped)
    max_log = torch.from_numpy(np.log(diffusion.betas))

    def model(x, t):
        ab = alpha_bar_orig[t].view(-1, 1)
        sig2 = 1 - ab
        v = ab * S ** 2 + sig2
        eps = sig2.sqrt() / v * (x - ab.sqrt() * MU)
        if not learn_sigma:
            return eps
        i = index_of[t]
        assert (i >= 0).all(), "model received a timestep that is not an original kept step"
        abp = ab_prev[i].view(-1, 1)
        beta = 1 - ab / abp
        true_var = beta * (1 - abp) / (1 - ab) + (abp.sqrt() * beta / (1 - ab)) ** 2 * S ** 2 * sig2 / v
        lo, hi = min_log[i].view(-1, 1), max_log[i].view(-1, 1)
        return torch.cat([eps, 2 * (true_var.log() - lo) / (hi - lo) - 1], dim=1)

    return model


# ---------------------------------------------------------------------------- forward process


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_is_cumulative_product_of_one_minus_beta(schedule):
    d = create_diffusion("", noise_schedule=schedule)
    np.testing.assert_allclose(d.alphas_cumprod, _alpha_bar(schedule), rtol=1e-12)
    assert d.num_timesteps == 1000


def test_q_sample_has_closed_form_mean_and_variance():
    d = create_diffusion("")
    torch.manual_seed(0)
    ab = _alpha_bar()
    x0 = torch.full((20000, 1), 1.5, dtype=torch.float64)
    for step in (0, 300, 999):
        t = torch.full((20000,), step)
        xt = d.q_sample(x0, t)
        assert xt.mean().item() == pytest.approx(np.sqrt(ab[step]) * 1.5, abs=4 * np.sqrt(1 - ab[step]) / 141 + 1e-6)
        assert xt.var().item() == pytest.approx(1 - ab[step], rel=0.05)
        mean, var, log_var = d.q_mean_variance(x0[:3], t[:3])
        torch.testing.assert_close(mean, torch.full_like(mean, np.sqrt(ab[step]) * 1.5))
        torch.testing.assert_close(var, torch.full_like(var, 1 - ab[step]))
        torch.testing.assert_close(log_var, var.log())


def test_posterior_matches_product_of_gaussians():
    # q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(ab_{t-1}) x_0, 1 - ab_{t-1})
    d = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    ab, betas = _alpha_bar("squaredcos_cap_v2"), d.betas
    torch.manual_seed(1)
    x0, xt = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([1, 10, 400, 998, 999])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for row, step in enumerate(t.tolist()):
        alpha, ab_prev = 1 - betas[step], ab[step - 1]
        precision = alpha / betas[step] + 1 / (1 - ab_prev)
        exp_mean = (np.sqrt(alpha) * xt[row] / betas[step] + np.sqrt(ab_prev) * x0[row] / (1 - ab_prev)) / precision
        torch.testing.assert_close(mean[row], exp_mean)
        torch.testing.assert_close(var[row], torch.full((2,), 1 / precision, dtype=torch.float64))
        torch.testing.assert_close(log_var[row], var[row].log())


def test_posterior_at_t0_returns_x0_and_clips_log_variance():
    d = create_diffusion("")
    x0, xt = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (var == 0).all()
    torch.testing.assert_close(log_var, torch.full_like(log_var, np.log(d.posterior_variance[1])))


# ---------------------------------------------------------------------------- losses


@pytest.mark.parametrize("prediction", ["epsilon", "x_start", "velocity"])
def test_oracle_with_true_target_and_posterior_variance_gets_zero_loss(prediction):
    d = create_diffusion("", predict_xstart=prediction == "x_start", predict_v=prediction == "velocity")
    ab = torch.from_numpy(_alpha_bar())
    torch.manual_seed(2)
    x0, noise = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([1, 5, 100, 500, 900, 999])
    a, sig = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
    target = {"epsilon": noise, "x_start": x0, "velocity": a * noise - sig * x0}[prediction]
    losses = d.training_losses(NoiseOracle(target), x0, t, noise=noise)
    assert set(losses) >= {"loss", "mse", "vb"} and all(v.shape == (6,) for v in losses.values())
    torch.testing.assert_close(losses["mse"], torch.zeros(6, dtype=torch.float64), atol=1e-20, rtol=0)
    torch.testing.assert_close(losses["vb"], torch.zeros(6, dtype=torch.float64), atol=1e-9, rtol=0)
    # and the reverse process recovers x_0 exactly from the true target
    out = d.p_mean_variance(NoiseOracle(target), d.q_sample(x0, t, noise), t, clip_denoised=False)
    torch.testing.assert_close(out["pred_xstart"], x0)


def test_wrong_variance_makes_vb_positive_and_vb_ignores_mean_gradient():
    d = create_diffusion("")
    torch.manual_seed(3)
    x0, noise = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    t = torch.tensor([3, 50, 500, 990])
    out = torch.cat([noise + 0.1, torch.zeros_like(noise)], dim=1).requires_grad_(True)
    losses = d.training_losses(lambda x, t: out, x0, t, noise=noise)
    assert (losses["vb"] > 0).all()
    losses["vb"].sum().backward()
    # improved DDPM: the VB term trains only the variance; the mean gets no gradient from it
    assert (out.grad[:, :2] == 0).all() and (out.grad[:, 2:].abs() > 0).any()


def test_learned_range_interpolates_between_posterior_and_beta():
    d = create_diffusion("")
    x = torch.randn(3, 1, dtype=torch.float64)
    t = torch.tensor([2, 200, 999])
    for v, expected in ((-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas)),
                        (0.0, 0.5 * (d.posterior_log_variance_clipped + np.log(d.betas)))):
        out = d.p_mean_variance(lambda x, t: torch.cat([x, torch.full_like(x, v)], 1), x, t, clip_denoised=False)
        torch.testing.assert_close(out["log_variance"].squeeze(1), torch.from_numpy(expected[t.numpy()]))


def test_fixed_variances_are_posterior_and_beta():
    x, t = torch.randn(2, 1, dtype=torch.float64), torch.tensor([0, 600])
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    large = create_diffusion("", learn_sigma=False)
    out_small = small.p_mean_variance(lambda x, t: x, x, t, clip_denoised=False)
    out_large = large.p_mean_variance(lambda x, t: x, x, t, clip_denoised=False)
    assert out_small["variance"][1].item() == pytest.approx(small.posterior_variance[600])
    assert out_large["variance"][1].item() == pytest.approx(large.betas[600])
    # at t = 0 beta_tilde_0 = 0, so fixed-large uses beta_tilde_1 to keep the decoder finite
    assert out_large["variance"][0].item() == pytest.approx(large.posterior_variance[1])


def test_wrong_output_channel_count_is_a_value_error():
    d = create_diffusion("")
    x, t = torch.randn(2, 4, 2, 2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="8 output channels"):
        d.training_losses(lambda x, t: x, x, t)


# ---------------------------------------------------------------------------- samplers


def test_ddim_eta_one_equals_ddpm_with_posterior_variance():
    # DDIM Eq. 16 with eta = 1 gives sigma^2 = beta_tilde and the posterior mean (DDIM Sec. 4.1)
    d = create_diffusion("ddim25", learn_sigma=False, sigma_small=True)
    model = lambda x, t: torch.sin(x) + t.view(-1, 1).to(x.dtype) / 1000
    x, t = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 3, 12, 24])
    torch.manual_seed(4)
    ddim = d.ddim_sample(model, x, t, eta=1.0, clip_denoised=False)["sample"]
    torch.manual_seed(4)
    ddpm = d.p_sample(model, x, t, clip_denoised=False)["sample"]
    torch.testing.assert_close(ddim, ddpm)


def test_ddpm250_with_exact_gaussian_denoiser_recovers_data_distribution():
    d = create_diffusion("250", learn_sigma=True)
    torch.manual_seed(5)
    n = 8000
    x = d.p_sample_loop(gaussian_denoiser(d, learn_sigma=True), (n, 1), noise=torch.randn(n, 1, dtype=torch.float64), clip_denoised=False)
    # Monte-Carlo standard errors at n = 8000: 0.0056 (mean), 0.004 (std); tolerances are ~4-5 of them
    assert abs(x.mean().item() - MU) < 0.025
    assert abs(x.std().item() - S) < 0.02


def test_ddim50_with_exact_gaussian_denoiser_matches_closed_form_and_data_distribution():
    d = create_diffusion("ddim50", learn_sigma=False)
    torch.manual_seed(6)
    z = torch.randn(4000, 1, dtype=torch.float64)
    x = d.ddim_sample_loop(gaussian_denoiser(d, learn_sigma=False), (4000, 1), noise=z, eta=0.0, clip_denoised=False)
    # With a Gaussian and the exact eps, each DDIM step is affine: x' - a' MU = g (x - a MU) with
    # g = (a'/a)(1 - sig^2/v) + sig' sig / v. Compose it independently and compare sample by sample.
    ab, ab_prev = d.alphas_cumprod, d.alphas_cumprod_prev
    gain = 1.0
    for i in range(d.num_timesteps):
        a, sig, a_p, sig_p = np.sqrt(ab[i]), np.sqrt(1 - ab[i]), np.sqrt(ab_prev[i]), np.sqrt(1 - ab_prev[i])
        v = a * a * S * S + sig * sig
        gain *= (a_p / a) * (1 - sig * sig / v) + sig_p * sig / v
    expected = MU + gain * (z - np.sqrt(ab[-1]) * MU)
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-9)
    # deterministic DDIM-50 under-disperses slightly (gain - S = -0.028 here); mean is unbiased
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() - S) < 0.04


def test_progressive_loop_yields_every_step_and_progress_bar_runs(capsys):
    d = create_diffusion("ddim10")
    model = lambda x, t: torch.cat([x, torch.zeros_like(x)], 1)
    steps = list(d.ddim_sample_loop_progressive(model, (2, 1), progress=True))
    assert len(steps) == 10 and all(set(s) == {"sample", "pred_xstart"} for s in steps)
    assert "10/10" in capsys.readouterr().err


def test_noise_fn_replaces_the_step_draw_of_ddpm_and_ddim():
    d = create_diffusion("10", learn_sigma=False)
    model = lambda x, t: 0.3 * x
    x, t = torch.randn(3, 1, 4, 4), torch.tensor([0, 4, 9])
    for step, kwargs in ((d.p_sample, {}), (d.ddim_sample, {"eta": 1.0})):
        torch.manual_seed(3)
        z = torch.randn_like(x)
        torch.manual_seed(3)
        default = step(model, x, t, clip_denoised=False, **kwargs)["sample"]  # draws z itself
        torch.manual_seed(4)  # an ignored noise_fn would draw other noise from this seed
        given = step(model, x, t, clip_denoised=False, noise_fn=lambda like: z, **kwargs)["sample"]
        assert torch.equal(given, default), step.__name__
        # z and -z land symmetrically about the noiseless step, except at t = 0, which gets no noise
        flipped = step(model, x, t, clip_denoised=False, noise_fn=lambda like: -z, **kwargs)["sample"]
        assert torch.equal(given[0], flipped[0]) and (given[1:] != flipped[1:]).all(), step.__name__
        mean = step(model, x, t, clip_denoised=False, noise_fn=torch.zeros_like, **kwargs)["sample"]
        torch.testing.assert_close((given + flipped) / 2, mean)
