"""Pins diffusion/__init__.py: create_diffusion keeps official DiT's arguments, defaults and object API."""

import pytest
import torch

from diffusion import create_diffusion
from diffusion import gaussian_diffusion as gd
from diffusion.respace import SpacedDiffusion


def observable(d):
    """What a diffusion's arguments decide: its schedule, steps kept and the three enums."""
    return (d.betas.tolist(), d.timestep_map, d.model_mean_type, d.model_var_type, d.loss_type)


# official DiT's create_diffusion(timestep_respacing, noise_schedule, use_kl, sigma_small, predict_xstart,
# learn_sigma, rescale_learned_sigmas, diffusion_steps): each position, called positionally, means its name
OFFICIAL_ORDER = ("noise_schedule", "use_kl", "sigma_small", "predict_xstart", "learn_sigma",
                  "rescale_learned_sigmas", "diffusion_steps")
OFFICIAL_DEFAULTS = ("linear", False, False, False, True, False, 1000)


@pytest.mark.parametrize("changed", [
    {},  # create_diffusion("") is the official defaults spelled out
    dict(noise_schedule="squaredcos_cap_v2", diffusion_steps=50),
    dict(use_kl=True, predict_xstart=True),
    dict(sigma_small=True, learn_sigma=False),
    dict(rescale_learned_sigmas=True, diffusion_steps=100),
])
def test_official_positional_calls_mean_what_their_names_say(changed):
    values = [changed.get(name, default) for name, default in zip(OFFICIAL_ORDER, OFFICIAL_DEFAULTS)]
    positional = create_diffusion("10", *values) if changed else create_diffusion("10")
    named = create_diffusion("10", **{**dict(zip(OFFICIAL_ORDER, OFFICIAL_DEFAULTS)), **changed})
    assert observable(positional) == observable(named)


def test_default_diffusion_is_epsilon_learned_range_mse_linear():
    d = create_diffusion("")
    assert isinstance(d, SpacedDiffusion)
    assert d.model_mean_type == gd.ModelMeanType.EPSILON
    assert d.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert d.loss_type == gd.LossType.MSE
    assert d.betas[0] == pytest.approx(1e-4)
    t = torch.arange(0, 1000, 37)
    assert (d.loss_weighting.weights(t) == 1).all()  # no loss weighting unless asked for
    default_gamma = create_diffusion("", loss_weighting="min-snr").loss_weighting.weights(t)
    assert torch.equal(default_gamma, create_diffusion("", loss_weighting="min-snr", min_snr_gamma=5.0)
                       .loss_weighting.weights(t))  # Min-SNR-5, the paper's setting


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


def test_official_positional_method_calls_mean_what_their_names_say():
    # each official leading argument is given a value that changes the result, positionally and by name
    d = create_diffusion("10")
    g = torch.Generator().manual_seed(0)
    x0, x, noise = (torch.randn(2, 1, 2, 2, generator=g) * 3 for _ in range(3))
    t, y = torch.tensor([3, 9]), torch.tensor([1, 2])
    model = lambda x, t, y: torch.cat([0.5 * x + y.view(-1, 1, 1, 1), 0.3 * torch.ones_like(x)], 1)
    kw = {"y": y}
    denoise = lambda x0: x0 * 0.5
    cond = lambda x, t, y: 0.1 * x  # classifier guidance gradient
    calls = [
        (d.q_sample, (x0, t, noise), dict(x_start=x0, t=t, noise=noise)),
        (d.q_posterior_mean_variance, (x0, x, t), dict(x_start=x0, x_t=x, t=t)),
        (d.p_mean_variance, (model, x, t, False, denoise, kw),
         dict(model=model, x=x, t=t, clip_denoised=False, denoised_fn=denoise, model_kwargs=kw)),
        (d.training_losses, (model, x0, t, kw, noise), dict(model=model, x_start=x0, t=t, model_kwargs=kw,
                                                              noise=noise)),
        (d.p_sample, (model, x, t, False, denoise, cond, kw),
         dict(model=model, x=x, t=t, clip_denoised=False, denoised_fn=denoise, cond_fn=cond, model_kwargs=kw)),
        (d.p_sample_loop, (model, x.shape, x, False, denoise, cond, kw, "cpu", False),
         dict(model=model, shape=x.shape, noise=x, clip_denoised=False, denoised_fn=denoise, cond_fn=cond,
              model_kwargs=kw, device="cpu", progress=False)),
        (d.ddim_sample_loop, (model, x.shape, x, False, denoise, cond, kw, "cpu", False, 0.5),
         dict(model=model, shape=x.shape, noise=x, clip_denoised=False, denoised_fn=denoise, cond_fn=cond,
              model_kwargs=kw, device="cpu", progress=False, eta=0.5)),
    ]
    for method, args, kwargs in calls:
        torch.manual_seed(1)
        positional = tensors_of(method(*args))
        torch.manual_seed(1)
        named = tensors_of(method(**kwargs))
        assert positional.keys() == named.keys(), method.__name__
        for key in positional:
            assert torch.equal(positional[key], named[key]), (method.__name__, key)


def tensors_of(result):
    """{name: tensor} of a method's result: a tensor, a tuple of tensors or a dict (None entries left out)."""
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if v is not None}
    return dict(enumerate(result)) if isinstance(result, tuple) else {0: result}


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
