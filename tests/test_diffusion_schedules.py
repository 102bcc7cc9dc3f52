"""Pins diffusion/schedules.py: linear and cosine betas against their closed forms."""

import math

import numpy as np
import pytest

from diffusion.schedules import get_named_beta_schedule


def test_linear_schedule_matches_ddpm_endpoints_and_is_linear():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.shape == (1000,) and betas.dtype == np.float64
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_linear_schedule_rescales_endpoints_with_step_count():
    betas = get_named_beta_schedule("linear", 250)
    assert betas[0] == pytest.approx(4e-4) and betas[-1] == pytest.approx(0.08)


def test_cosine_alpha_bar_matches_closed_form():
    T, s = 1000, 0.008
    betas = get_named_beta_schedule("squaredcos_cap_v2", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = np.cumprod(1 - betas)
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    # the 0.999 cap only touches the last steps; everywhere else alpha_bar is exactly f(t+1)/f(0)
    capped = betas >= 0.999 - 1e-12
    assert capped.sum() <= 2 and capped[-1]
    np.testing.assert_allclose(alpha_bar[~capped], expected[~capped], rtol=1e-9)
    assert (betas <= 0.999).all() and (betas > 0).all()


def test_cosine_is_another_name_for_squaredcos_cap_v2():
    # ADM and the DTR release call the improved-DDPM schedule "cosine"; their checkpoints store that name
    np.testing.assert_array_equal(get_named_beta_schedule("cosine", 1000),
                                  get_named_beta_schedule("squaredcos_cap_v2", 1000))
    assert not np.array_equal(get_named_beta_schedule("cosine", 1000), get_named_beta_schedule("linear", 1000))


@pytest.mark.parametrize("name", ["sigmoid", "Cosine", ""])
def test_unknown_schedule_is_a_value_error_listing_valid_names(name):
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        get_named_beta_schedule(name, 1000)


def test_non_positive_step_count_is_a_value_error():
    with pytest.raises(ValueError, match="diffusion_steps"):
        get_named_beta_schedule("linear", 0)
