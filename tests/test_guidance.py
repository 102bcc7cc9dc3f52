"""Pins diffusion/guidance.py: classifier-free guidance formula, channel modes and generic null conditions."""

import pytest
import torch

from diffusion import ClassifierFreeGuidance, create_diffusion

NULL = 10  # null label of a 10-class model


class ClassModel(torch.nn.Module):
    """Class-conditional toy: 2C output channels [eps, var] that depend on x, t and y.

    Elementwise in the batch (no matmul, no reduction), so a sample's output does not depend on the batch it
    is in, up to an ulp of vectorised sin / tanh: the default fp32 tolerances hold for CFG's doubled batch.
    """

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(NULL + 1, 8)
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        e = self.embed(y)[:, :, None, None]  # (N, 8, 1, 1)
        eps = torch.sin(x + e[:, :4]) + t.view(-1, 1, 1, 1) / 1000
        var = torch.tanh(x * e[:, 4:])
        return torch.cat([eps, var], dim=1)  # (N, 8, H, W)


def _inputs():
    torch.manual_seed(0)
    return torch.randn(3, 4, 2, 2), torch.tensor([5, 500, 999]), torch.tensor([1, 2, 3])


def test_scale_one_equals_the_conditional_model():
    model, (x, t, y) = ClassModel(), _inputs()
    guided = ClassifierFreeGuidance(model, 1.0, uncond_kwargs={"y": torch.full((3,), NULL)})
    with torch.no_grad():
        torch.testing.assert_close(guided(x, t, y=y), model(x, t, y))


def test_all_mode_guides_every_prediction_channel_and_keeps_conditional_variance():
    model, (x, t, y) = ClassModel(), _inputs()
    guided = ClassifierFreeGuidance(model, 1.5, uncond_kwargs={"y": torch.tensor(NULL)})
    with torch.no_grad():
        out = guided(x, t, y=y)
        cond, uncond = model(x, t, y), model(x, t, torch.full((3,), NULL))
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 1.5 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])


def test_three_channel_mode_equals_official_dit_formula():
    model, (x, t, y) = ClassModel(), _inputs()
    guided = ClassifierFreeGuidance(model, 4.0, uncond_kwargs={"y": torch.full((3,), NULL)}, guide_channels=3)
    with torch.no_grad():
        ours = guided(x, t, y=y)
        # official DiT forward_with_cfg on the doubled batch, written out independently
        model_out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full((3,), NULL)]))
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + 4.0 * (cond_eps - uncond_eps)
        official = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)[:3]
    torch.testing.assert_close(ours, official)


def test_one_doubled_forward_per_call():
    model, (x, t, y) = ClassModel(), _inputs()
    ClassifierFreeGuidance(model, 1.5, uncond_kwargs={"y": torch.full((3,), NULL)})(x, t, y=y)
    assert model.calls == 1


def test_text_model_takes_null_embedding_and_passes_shared_kwargs_through():
    seen = {}

    def text_model(x, t, context, scale):
        seen["context"], seen["scale"] = context, scale
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) * scale

    x, t = torch.randn(2, 4, 2, 2), torch.tensor([1, 2])
    context, null = torch.randn(2, 5, 8), torch.zeros(5, 8)  # null text embedding has no batch dimension
    guided = ClassifierFreeGuidance(text_model, 2.0, uncond_kwargs={"context": null})
    out = guided(x, t, context=context, scale=3.0)
    assert seen["context"].shape == (4, 5, 8) and torch.equal(seen["context"][2:], torch.zeros(2, 5, 8))
    assert seen["scale"] == 3.0
    cond = text_model(x, t, context, 3.0)
    torch.testing.assert_close(out, 2.0 * cond)  # unconditional output is 0 here


def test_guided_sampling_runs_through_the_diffusion_with_guidance_applied():
    model = ClassModel()
    d = create_diffusion("ddim5")
    noise = torch.randn(2, 4, 2, 2)
    y = torch.tensor([0, 1])
    with torch.no_grad():
        plain = d.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs={"y": y})
        at_one = d.ddim_sample_loop(ClassifierFreeGuidance(model, 1.0, {"y": torch.full((2,), NULL)}), noise.shape,
                                    noise=noise, model_kwargs={"y": y})
        at_four = d.ddim_sample_loop(ClassifierFreeGuidance(model, 4.0, {"y": torch.full((2,), NULL)}), noise.shape,
                                     noise=noise, model_kwargs={"y": y})
    torch.testing.assert_close(at_one, plain)
    assert (at_four - plain).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance_scale=1.5, uncond_kwargs={}), "uncond_kwargs"),
    (dict(guidance_scale=1.5, uncond_kwargs={"y": torch.tensor(NULL)}, guide_channels="eps"), "guide_channels"),
    (dict(guidance_scale="1.5", uncond_kwargs={"y": torch.tensor(NULL)}), "guidance_scale"),
])
def test_bad_guidance_arguments_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierFreeGuidance(ClassModel(), **kwargs)


def test_uncond_key_missing_from_model_kwargs_is_a_value_error():
    x, t, y = _inputs()
    guided = ClassifierFreeGuidance(ClassModel(), 1.5, uncond_kwargs={"label": torch.tensor(NULL)})
    with pytest.raises(ValueError, match="label"):
        guided(x, t, y=y)


def test_uncond_value_with_wrong_shape_is_a_value_error():
    x, t, y = _inputs()
    guided = ClassifierFreeGuidance(ClassModel(), 1.5, uncond_kwargs={"y": torch.full((2,), NULL)})
    with pytest.raises(ValueError, match="shape"):
        guided(x, t, y=y)
