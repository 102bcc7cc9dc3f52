"""Pins diffusion/__init__.py: create_diffusion keeps official DiT's arguments, defaults and object API."""

import inspect

import pytest
import torch

from diffusion import create_diffusion
from diffusion import gaussian_diffusion as gd
from diffusion.respace import SpacedDiffusion


def test_create_diffusion_keeps_official_signature_order_and_defaults():
    params = inspect.signature(create_diffusion).parameters
    official = dict(noise_schedule="linear", use_kl=False, sigma_small=False, predict_xstart=False,
                    learn_sigma=True, rescale_learned_sigmas=False, diffusion_steps=1000)
    names = list(params)
    assert names[:8] == ["timestep_respacing", *official]
    assert params["timestep_respacing"].default is inspect.Parameter.empty
    assert {k: params[k].default for k in official} == official
    assert params["loss_weighting"].default == "vanilla" and params["min_snr_gamma"].default == 5.0


def test_default_diffusion_is_epsilon_learned_range_mse_linear():
    d = create_diffusion("")
    assert isinstance(d, SpacedDiffusion)
    assert d.model_mean_type == gd.ModelMeanType.EPSILON
    assert d.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert d.loss_type == gd.LossType.MSE
    assert d.betas[0] == pytest.approx(1e-4)


@pytest.mark.parametrize("kwargs, attr, value", [
    (dict(use_kl=True), "loss_type", gd.LossType.RESCALED_KL),
    (dict(rescale_learned_sigmas=True), "loss_type", gd.LossType.RESCALED_MSE),
    (dict(learn_sigma=False), "model_var_type", gd.ModelVarType.FIXED_LARGE),
    (dict(learn_sigma=False, sigma_small=True), "model_var_type", gd.ModelVarType.FIXED_SMALL),
    (dict(predict_xstart=True), "model_mean_type", gd.ModelMeanType.START_X),
    (dict(predict_v=True), "model_mean_type", gd.ModelMeanType.VELOCITY),
])
def test_flags_select_official_enum_members(kwargs, attr, value):
    assert getattr(create_diffusion("", **kwargs), attr) == value


def test_official_method_names_exist_with_official_leading_arguments():
    d = create_diffusion("")
    expected = {
        "q_sample": ["x_start", "t", "noise"],
        "q_posterior_mean_variance": ["x_start", "x_t", "t"],
        "p_mean_variance": ["model", "x", "t", "clip_denoised", "denoised_fn", "model_kwargs"],
        "training_losses": ["model", "x_start", "t", "model_kwargs", "noise"],
        "p_sample": ["model", "x", "t", "clip_denoised", "denoised_fn", "cond_fn", "model_kwargs"],
        "p_sample_loop": ["model", "shape", "noise", "clip_denoised", "denoised_fn", "cond_fn", "model_kwargs",
                          "device", "progress"],
        "ddim_sample_loop": ["model", "shape", "noise", "clip_denoised", "denoised_fn", "cond_fn", "model_kwargs",
                             "device", "progress", "eta"],
    }
    for name, args in expected.items():
        assert list(inspect.signature(getattr(d, name)).parameters)[: len(args)] == args, name


def test_kl_loss_is_rescaled_variational_bound():
    d_kl, d_mse = create_diffusion("", use_kl=True), create_diffusion("")
    torch.manual_seed(0)
    x0, noise, t = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.tensor([1, 300, 999])
    model = lambda x, t: torch.cat([0.9 * x, torch.zeros_like(x)], 1)
    kl = d_kl.training_losses(model, x0, t, noise=noise)
    mse = d_mse.training_losses(model, x0, t, noise=noise)
    assert set(kl) == {"loss"}
    # the MSE path detaches the mean for its VB term, but the value is the same bound
    torch.testing.assert_close(kl["loss"], mse["vb"] * 1000)


def test_rescaled_mse_scales_vb_by_steps_over_1000():
    torch.manual_seed(1)
    x0, noise, t = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.tensor([2, 100, 240])
    model = lambda x, t: torch.cat([0.9 * x, torch.zeros_like(x)], 1)
    plain = create_diffusion("", diffusion_steps=250).training_losses(model, x0, t, noise=noise)
    rescaled = create_diffusion("", diffusion_steps=250, rescale_learned_sigmas=True).training_losses(
        model, x0, t, noise=noise)
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * 0.25)


def test_exclusive_prediction_targets_are_a_value_error():
    with pytest.raises(ValueError, match="predict_xstart and predict_v"):
        create_diffusion("", predict_xstart=True, predict_v=True)


def test_unknown_schedule_is_a_value_error():
    with pytest.raises(ValueError, match="unknown noise_schedule 'sigmoid'"):
        create_diffusion("", noise_schedule="sigmoid")
