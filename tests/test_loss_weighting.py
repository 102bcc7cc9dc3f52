"""Pins diffusion/loss_weighting.py: each weighting's per-sample formula, VB unweighted, ANT-UW learnable state."""

import numpy as np
import pytest
import torch

from diffusion import create_diffusion
from diffusion.loss_weighting import ANTUncertaintyWeighting, build_loss_weighting


def _snr(schedule="squaredcos_cap_v2"):
    """Independent snr_t = alpha_bar_t / (1 - alpha_bar_t)."""
    betas = create_diffusion("", noise_schedule=schedule).betas
    ab = np.array([np.prod(1 - betas[: t + 1]) for t in range(len(betas))])
    return torch.from_numpy(ab / (1 - ab))


T_PROBE = torch.tensor([0, 1, 10, 120, 300, 640, 900, 999])


@pytest.mark.parametrize("prediction, formula", [
    ("epsilon", lambda snr, g: torch.clamp(snr, max=g) / snr),
    ("x_start", lambda snr, g: torch.clamp(snr, max=g)),
    ("velocity", lambda snr, g: torch.clamp(snr, max=g) / (snr + 1)),
])
def test_min_snr_weight_matches_formula_per_sample(prediction, formula):
    snr = _snr()
    w = build_loss_weighting("min-snr", create_diffusion("", noise_schedule="squaredcos_cap_v2").alphas_cumprod,
                             prediction=prediction, min_snr_gamma=5.0)
    mse = torch.rand(len(T_PROBE), dtype=torch.float64)
    torch.testing.assert_close(w(mse, T_PROBE), formula(snr[T_PROBE], 5.0) * mse)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_p2_weight_is_per_sample_and_matches_formula(gamma):
    snr = _snr()
    d = create_diffusion("", noise_schedule="squaredcos_cap_v2", loss_weighting="p2", p2_k=1.0, p2_gamma=gamma)
    mse = torch.rand(len(T_PROBE), dtype=torch.float64)
    weighted = d.loss_weighting(mse, T_PROBE)
    assert weighted.shape == (len(T_PROBE),)
    torch.testing.assert_close(weighted, mse / (1.0 + snr[T_PROBE]) ** gamma)


def test_weighting_rejects_non_per_sample_losses():
    # the authors' P2 broadcast its weight over the width axis; ours refuses anything but (N,)
    d = create_diffusion("", loss_weighting="p2")
    with pytest.raises(ValueError, match=r"per-sample"):
        d.loss_weighting(torch.rand(4, 8), torch.tensor([1, 2, 3, 4]))


@pytest.mark.parametrize("weighting", ["min-snr", "p2"])
def test_training_losses_weight_mse_only_and_keep_vb_unweighted(weighting):
    torch.manual_seed(0)
    vanilla = create_diffusion("")
    weighted = create_diffusion("", loss_weighting=weighting)
    x0, noise = torch.randn(8, 2, 2, 2, dtype=torch.float64), torch.randn(8, 2, 2, 2, dtype=torch.float64)
    model = lambda x, t: torch.cat([0.5 * x, 0.3 * torch.tanh(x)], dim=1)
    a = vanilla.training_losses(model, x0, T_PROBE, noise=noise)
    b = weighted.training_losses(model, x0, T_PROBE, noise=noise)
    torch.testing.assert_close(b["vb"], a["vb"])
    torch.testing.assert_close(b["mse"], a["mse"])
    w = weighted.loss_weighting.weights(T_PROBE)
    assert w.shape == (8,)
    torch.testing.assert_close(b["loss"], w * a["mse"] + a["vb"])


def test_min_snr_gives_the_same_loss_for_eps_x0_and_v_parameterisations():
    # min(snr, g) ||x0 - x0_hat||^2 is one objective; each target's weight must convert it exactly
    torch.manual_seed(1)
    x0, noise = torch.randn(8, 1, 3, 3, dtype=torch.float64), torch.randn(8, 1, 3, 3, dtype=torch.float64)
    x0_hat = x0 + 0.2 * torch.randn_like(x0)
    losses = {}
    for kind in ("eps", "x0", "v"):
        d = create_diffusion("", learn_sigma=False, predict_xstart=kind == "x0", predict_v=kind == "v",
                             loss_weighting="min-snr")
        ab = torch.from_numpy(d.alphas_cumprod)

        def model(x, t, kind=kind):
            a, sig = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
            eps_hat = (x - a * x0_hat) / sig
            return {"eps": eps_hat, "x0": x0_hat, "v": a * eps_hat - sig * x0_hat}[kind]

        losses[kind] = d.training_losses(model, x0, T_PROBE, noise=noise)["loss"]
    torch.testing.assert_close(losses["eps"], losses["x0"])
    torch.testing.assert_close(losses["v"], losses["x0"])


def test_ant_uw_batch_mean_is_cluster_average_of_uncertainty_loss():
    d = create_diffusion("", loss_weighting="ant-uw")
    w = d.loss_weighting
    with torch.no_grad():
        w.log_vars.copy_(torch.linspace(-1, 1, 8))
    # unequal cluster counts: 3 samples in cluster 0, 1 in cluster 3, 2 in cluster 7
    t = torch.tensor([0, 50, 124, 400, 875, 999])
    mse = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.25, 0.75])
    s = w.log_vars.detach()
    L = {0: mse[:3].mean(), 3: mse[3], 7: mse[4:].mean()}
    expected = sum(0.5 * (torch.exp(-s[k]) * L[k] + s[k]) for k in L) / 8
    assert w(mse, t).mean().item() == pytest.approx(expected.item(), rel=1e-6)


def test_ant_uw_gradient_reaches_log_variances_with_closed_form():
    d = create_diffusion("", loss_weighting="ant-uw")
    w = d.loss_weighting
    t = d.timestep_sampler.sample_timesteps(16, "cpu", generator=torch.Generator().manual_seed(0))
    mse = torch.rand(16)
    w(mse, t).mean().backward()
    k = w.cluster_index(t)
    L = torch.stack([mse[k == j].mean() for j in range(8)])
    # d/ds_k of (1/K) * 0.5 (exp(-s_k) L_k + s_k) at s = 0
    torch.testing.assert_close(w.log_vars.grad, (0.5 * (1 - L)) / 8)


def test_ant_uw_state_param_group_and_checkpoint_round_trip():
    d = create_diffusion("", loss_weighting="ant-uw")
    w = d.loss_weighting
    assert torch.equal(w.log_vars.detach(), torch.zeros(8))
    (group,) = w.param_groups()
    assert group["lr"] == 0.025 and group["weight_decay"] == 0.0 and group["params"][0] is w.log_vars
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    opt.add_param_group(group)
    w(torch.rand(8), torch.arange(0, 1000, 125)).mean().backward()
    opt.step()
    assert not torch.equal(w.log_vars.detach(), torch.zeros(8))
    state = w.state_dict()
    assert list(state) == ["log_vars"]
    fresh = create_diffusion("", loss_weighting="ant-uw").loss_weighting
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.log_vars, w.log_vars)


def test_non_learnable_weightings_have_no_state_or_param_groups():
    for name in ("vanilla", "min-snr", "p2"):
        w = create_diffusion("", loss_weighting=name).loss_weighting
        assert w.state_dict() == {} and w.param_groups() == [] and list(w.parameters()) == []
        w.load_state_dict({})


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_weighting="snr"), "unknown loss_weighting"),
    (dict(loss_weighting="min-snr", min_snr_gamma=0), "min_snr_gamma"),
    (dict(loss_weighting="min-snr", min_snr_gamma=-5), "min_snr_gamma"),
    (dict(loss_weighting="p2", p2_gamma=0.0), "p2_gamma"),
    (dict(loss_weighting="p2", p2_k=0.0), "p2_k"),
    (dict(loss_weighting="ant-uw", ant_num_clusters=0), "ant_num_clusters"),
    (dict(loss_weighting="ant-uw", ant_lr=0), "ant_lr"),
    (dict(loss_weighting="p2", use_kl=True), "needs an MSE loss"),
])
def test_bad_weighting_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_diffusion("", **kwargs)


def test_ant_cluster_index_splits_timesteps_into_equal_ranges():
    w = ANTUncertaintyWeighting(create_diffusion("").alphas_cumprod, num_clusters=8)
    k = w.cluster_index(torch.arange(1000))
    assert torch.equal(torch.bincount(k), torch.full((8,), 125))
    assert k[124] == 0 and k[125] == 1 and k[999] == 7
