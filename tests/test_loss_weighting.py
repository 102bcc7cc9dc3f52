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


def test_min_snr_weights_the_x0_loss_by_snr_clipped_at_gamma_in_each_targets_units():
    # Hang et al. Eq. 8: the x0-loss weight is min(snr, gamma); ||eps - eps_hat||^2 = snr ||x0 - x0_hat||^2 and
    # ||v - v_hat||^2 = (snr + 1) ||x0 - x0_hat||^2 carry it into the eps and v losses
    snr = _snr()[T_PROBE]
    high = snr > 5.0
    assert high.any() and (~high).any()  # T_PROBE reaches both sides of gamma
    alphas_cumprod = create_diffusion("", noise_schedule="squaredcos_cap_v2").alphas_cumprod
    weights = {prediction: build_loss_weighting("min-snr", alphas_cumprod, prediction=prediction,
                                                min_snr_gamma=5.0).weights(T_PROBE)
               for prediction in ("epsilon", "x_start", "velocity")}
    torch.testing.assert_close(weights["x_start"][high], torch.full_like(snr[high], 5.0))
    torch.testing.assert_close(weights["x_start"][~high], snr[~high])
    torch.testing.assert_close(weights["epsilon"][~high], torch.ones_like(snr[~high]))  # below gamma: plain loss
    torch.testing.assert_close(weights["epsilon"] * snr, weights["x_start"])
    torch.testing.assert_close(weights["velocity"] * (snr + 1), weights["x_start"])
    mse = torch.rand(len(T_PROBE), dtype=torch.float64)
    w = build_loss_weighting("min-snr", alphas_cumprod, prediction="epsilon", min_snr_gamma=5.0)
    torch.testing.assert_close(w(mse, T_PROBE), weights["epsilon"] * mse)  # per sample


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_p2_with_k_one_weights_by_one_minus_alpha_bar_to_the_gamma(gamma):
    # Choi et al. Eq. 8 with k = 1: 1 / (1 + snr)^gamma = (1 - alpha_bar)^gamma, since snr = alpha_bar / (1 - alpha_bar)
    d = create_diffusion("", noise_schedule="squaredcos_cap_v2", loss_weighting="p2", p2_k=1.0, p2_gamma=gamma)
    mse = torch.rand(len(T_PROBE), dtype=torch.float64)
    weighted = d.loss_weighting(mse, T_PROBE)
    assert weighted.shape == (len(T_PROBE),)
    one_minus_alpha_bar = torch.from_numpy(1 - d.alphas_cumprod)[T_PROBE]
    torch.testing.assert_close(weighted, mse * one_minus_alpha_bar ** gamma)


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


def test_ant_uw_batch_mean_is_the_release_objective_by_hand():
    d = create_diffusion("", loss_weighting="ant-uw")
    w = d.loss_weighting
    with torch.no_grad():
        w.log_vars.copy_(torch.linspace(-1, 1, 8))
    # unequal cluster counts: 3 samples in cluster 0, 1 in cluster 3, 2 in cluster 7
    t = torch.tensor([0, 50, 124, 400, 875, 999])
    loss = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.25, 0.75], dtype=torch.float64)
    s = torch.linspace(-1, 1, 8, dtype=torch.float64)  # s_0 = -1, s_3 = -1/7, s_7 = 1
    # sum over the clusters present of 0.5 * (exp(-s_k) * L_k / 8 + s_k), L_0 = 1, L_3 = 2, L_7 = 0.5
    by_hand = (0.5 * (np.e * 1.0 / 8 - 1) + 0.5 * (np.exp(1 / 7) * 2.0 / 8 - 1 / 7)
               + 0.5 * (np.exp(-1) * 0.5 / 8 + 1))
    assert w(loss, t).mean().item() == pytest.approx(by_hand, rel=1e-6)
    L = {0: loss[:3].mean(), 3: loss[3], 7: loss[4:].mean()}
    assert by_hand == pytest.approx(sum(0.5 * (torch.exp(-s[k]) * L[k] / 8 + s[k]) for k in L).item(), rel=1e-12)


def test_ant_uw_weights_mse_plus_vb_like_the_release():
    torch.manual_seed(0)
    vanilla = create_diffusion("")
    ant = create_diffusion("", loss_weighting="ant-uw")
    x0, noise = torch.randn(8, 2, 2, 2, dtype=torch.float64), torch.randn(8, 2, 2, 2, dtype=torch.float64)
    model = lambda x, t: torch.cat([0.5 * x, 0.3 * torch.tanh(x)], dim=1)
    t = torch.arange(0, 1000, 125) + 7  # one sample per cluster
    a = vanilla.training_losses(model, x0, t, noise=noise)
    b = ant.training_losses(model, x0, t, noise=noise)
    assert (a["vb"] > 0).all()
    # s = 0, one sample per cluster: loss_i = 8 * 0.5 * (mse_i + vb_i) / 8
    torch.testing.assert_close(b["loss"], 0.5 * (a["mse"] + a["vb"]))


def test_ant_uw_settles_at_exp_s_equal_to_cluster_loss_over_k():
    w = ANTUncertaintyWeighting(create_diffusion("").alphas_cumprod, num_clusters=8)
    t = torch.arange(0, 1000, 125).repeat_interleave(2) + torch.tensor([0, 60] * 8)  # 2 per cluster
    loss = torch.linspace(0.05, 1.6, 16, dtype=torch.float64)
    L = loss.view(8, 2).mean(1)
    with torch.no_grad():
        w.log_vars.copy_(torch.log(L / 8))
    w(loss, t).mean().backward()
    # s_k is float32: its rounding (|ds| <= |s| 2^-24) leaves a gradient of at most 0.5 |ds| per cluster
    atol = 0.5 * w.log_vars.detach().abs().max().item() * 2.0 ** -23
    torch.testing.assert_close(w.log_vars.grad, torch.zeros(8), atol=atol, rtol=0)
    # and the literal Kendall form's stationary point exp(s_k) = L_k is not one of this objective
    w.log_vars.grad = None
    with torch.no_grad():
        w.log_vars.copy_(torch.log(L))
    w(loss, t).mean().backward()
    torch.testing.assert_close(w.log_vars.grad, torch.full((8,), 0.5 * (1 - 1 / 8)), rtol=1e-6, atol=0)


def test_ant_uw_gradient_reaches_log_variances_with_closed_form():
    d = create_diffusion("", loss_weighting="ant-uw")
    w = d.loss_weighting
    t = d.timestep_sampler.sample_timesteps(16, "cpu", generator=torch.Generator().manual_seed(0))
    loss = torch.rand(16)
    w(loss, t).mean().backward()
    k = w.cluster_index(t)
    L = torch.stack([loss[k == j].mean() for j in range(8)])
    # d/ds_k of 0.5 (exp(-s_k) L_k / K + s_k) at s = 0
    torch.testing.assert_close(w.log_vars.grad, 0.5 * (1 - L / 8))


def _ant_uw_rank(rank, world_size, init_file, loss, t, out):
    """One gloo rank: its strided share of the global batch through ANT-UW, gradient averaged like DDP."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    w = ANTUncertaintyWeighting(create_diffusion("").alphas_cumprod, num_clusters=8)
    with torch.no_grad():
        w.log_vars.copy_(torch.linspace(-0.5, 0.5, 8))
    value = w(loss[rank::world_size], t[rank::world_size]).mean()  # counts n_k with an all-reduce
    # train.py's path: every rank holds the global batch's timesteps and counts n_k itself, no collective
    without_collective = w(loss[rank::world_size], t[rank::world_size], global_t=t).mean()
    torch.testing.assert_close(without_collective, value, rtol=0, atol=0)
    value.backward()
    w.all_reduce_gradients()
    dist.all_reduce(value.detach())
    if rank == 0:
        torch.save({"value": value.detach() / world_size, "grad": w.log_vars.grad}, out)
    dist.destroy_process_group()


def test_ant_uw_on_two_gloo_ranks_matches_one_process_on_the_global_batch(tmp_path):
    gen = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (12,), generator=gen)  # uneven clusters, unevenly split over the ranks
    loss = torch.rand(12, generator=gen, dtype=torch.float64)
    torch.multiprocessing.spawn(_ant_uw_rank, args=(2, str(tmp_path / "init"), loss, t, str(tmp_path / "out.pt")),
                                nprocs=2)
    ddp = torch.load(tmp_path / "out.pt")
    w = ANTUncertaintyWeighting(create_diffusion("").alphas_cumprod, num_clusters=8)
    with torch.no_grad():
        w.log_vars.copy_(torch.linspace(-0.5, 0.5, 8))
    value = w(loss, t).mean()
    value.backward()
    torch.testing.assert_close(ddp["value"], value.detach())
    torch.testing.assert_close(ddp["grad"], w.log_vars.grad)


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
