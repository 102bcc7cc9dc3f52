"""Pins diffusion/respace.py: kept steps, alpha_bar preserved, original-scale t reaches the model, step counts."""

import numpy as np
import pytest
import torch

from diffusion import ClassifierFreeGuidance, create_diffusion
from diffusion.respace import space_timesteps


class CallRecorder:
    """Records every call's timesteps and batch size; predicts zero noise with var_values 0."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y=None):
        self.calls.append((t.clone(), x.shape[0]))
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)


def test_250_steps_span_0_to_999_evenly():
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert set(np.diff(kept)) <= {4, 5}


def test_ddim_spacing_is_an_even_stride_from_zero():
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    assert sorted(space_timesteps(1000, "ddim25")) == list(range(0, 1000, 40))


def test_comma_list_takes_counts_per_equal_section():
    kept = sorted(space_timesteps(300, "10,15,20"))
    assert len(kept) == 45
    assert sum(k < 100 for k in kept) == 10 and sum(100 <= k < 200 for k in kept) == 15
    assert kept[0] == 0 and kept[9] == 99 and kept[10] == 100 and kept[-1] == 299


@pytest.mark.parametrize("respacing", ["250", "ddim50", "10,15,20", [7, 3]])
def test_respaced_betas_reproduce_alpha_bar_at_kept_steps(respacing):
    base = create_diffusion("", noise_schedule="squaredcos_cap_v2")
    spaced = create_diffusion(respacing, noise_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-7)
    assert spaced.num_timesteps == len(spaced.timestep_map)


@pytest.mark.parametrize("respacing", [None, ""])
def test_empty_respacing_keeps_every_step(respacing):
    d = create_diffusion(respacing)
    assert d.num_timesteps == 1000 and d.timestep_map == list(range(1000))


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_n_calls_the_model_exactly_n_times_with_original_t(steps):
    d = create_diffusion(f"ddim{steps}")
    model = CallRecorder()
    d.ddim_sample_loop(model, (3, 2, 4, 4))
    assert len(model.calls) == steps
    seen = [int(t[0]) for t, _ in model.calls]
    assert seen == list(range(0, 1000, 1000 // steps))[::-1]
    assert all(t.dtype == torch.long and (t == t[0]).all() for t, _ in model.calls)


def test_ddpm_250_calls_the_model_250_times_with_original_t():
    d = create_diffusion("250")
    model = CallRecorder()
    d.p_sample_loop(model, (2, 1, 2, 2))
    assert [int(t[0]) for t, _ in model.calls] == sorted(space_timesteps(1000, "250"), reverse=True)


def test_guided_ddim_doubles_the_batch_once_per_step():
    d = create_diffusion("ddim20")
    model = CallRecorder()
    guided = ClassifierFreeGuidance(model, 1.5, uncond_kwargs={"y": torch.full((3,), 10)})
    d.ddim_sample_loop(guided, (3, 2, 4, 4), model_kwargs={"y": torch.arange(3)})
    assert len(model.calls) == 20 and all(n == 6 for _, n in model.calls)


def test_training_losses_pass_original_t_to_the_model():
    d = create_diffusion("ddim10")
    model = CallRecorder()
    d.training_losses(model, torch.randn(4, 2, 2, 2), torch.tensor([0, 1, 5, 9]))
    assert model.calls[0][0].tolist() == [0, 100, 500, 900]


@pytest.mark.parametrize("respacing, message", [
    ("ddim2000", "only 1000"),
    ("1001", "section of 1000"),
    ("abc", "not an integer"),
    ("10,x", "not an integer"),
    ("ddim", "not an integer"),
    ("0", ">= 1"),
    ("ddim-5", ">= 1"),
    ("ddim999", "no integer stride"),
    ("600,600", "section of 500"),
])
def test_bad_respacing_is_a_value_error(respacing, message):
    with pytest.raises(ValueError, match=message):
        create_diffusion(respacing)
