"""Pins benchmarks/ant_uw_equilibrium.py: each objective's s_k settles at its closed-form equilibrium."""
import argparse

import torch

from benchmarks import ant_uw_equilibrium


def test_release_settles_at_loss_over_k_and_kendall_at_loss():
    args = argparse.Namespace(num_samples=64, num_clusters=4, data_std=0.5, steps=700, lr=0.025, seed=0)
    report = ant_uw_equilibrium.main(args)
    mse, whole = torch.tensor(report["cluster_mse"]), torch.tensor(report["cluster_mse_plus_vb"])
    assert (mse[1:] < mse[:-1]).all()  # the eps-loss falls with t, so the clusters need different weights
    torch.testing.assert_close(torch.tensor(report["release_exp_s"]), whole / 4, rtol=2e-3, atol=0)
    torch.testing.assert_close(torch.tensor(report["kendall_exp_s"]), mse, rtol=2e-3, atol=0)
    # at equilibrium the release weights each cluster's loss by 0.5 / L_k, K times Kendall's 0.5 / (K L_k)
    torch.testing.assert_close(torch.tensor(report["release_model_weight"]), 0.5 / whole, rtol=2e-3, atol=0)
    torch.testing.assert_close(torch.tensor(report["kendall_model_weight"]), 0.5 / (4 * mse), rtol=2e-3, atol=0)
