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


def official_sections(num_timesteps, counts):
    """Improved DDPM / ADM section spacing from its description: equal sections (the first
    T mod n one step longer), each keeping `count` steps at a running float64 sum of the stride
    (size - 1) / (count - 1) from the section's start, rounded half to even; vectorised here with
    a sequential cumsum and np.round rather than the module's Python loop."""
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = num_timesteps // len(counts) + (1 if i < num_timesteps % len(counts) else 0)
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        positions = np.concatenate([[0.0], np.cumsum(np.full(count - 1, stride))])
        kept.extend((start + np.round(positions).astype(np.int64)).tolist())
        start += size
    return set(kept)


def test_every_single_section_count_keeps_the_official_steps():
    for count in range(1, 1001):
        kept = space_timesteps(1000, str(count))
        assert kept == official_sections(1000, [count]), count
        assert len(kept) == count and min(kept) == 0 and max(kept) == (999 if count > 1 else 0)


def test_21_steps_keep_499_like_official_not_500():
    # (999 / 20) * 10 = 499.5 rounds to 500, but ten running additions of 49.95 land at
    # 499.49999999999994 and round to 499: the case that separates the two formulas
    kept = space_timesteps(1000, "21")
    assert 499 in kept and 500 not in kept
    stride = 999 / 20
    naive = {round(j * stride) for j in range(21)}
    assert naive != kept and naive ^ kept == {499, 500}


@pytest.mark.parametrize("counts", [[10, 15, 20], [7, 3], [21, 21, 21], [1, 2, 3, 4, 5, 6, 7]])
def test_multi_section_strings_keep_the_official_steps(counts):
    for T in (300, 1000):
        assert space_timesteps(T, ",".join(map(str, counts))) == official_sections(T, counts)


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
    ("ddim1", "no integer stride"),  # official DiT's strides stop at T - 1: one step at t = 0 is refused
    ("600,600", "section of 500"),
])
def test_bad_respacing_is_a_value_error(respacing, message):
    with pytest.raises(ValueError, match=message):
        create_diffusion(respacing)
