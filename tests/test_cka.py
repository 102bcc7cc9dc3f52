"""analysis.cka: linear CKA's invariances and value against the centred-Gram formula; per-block timestep CKA."""
import numpy as np
import pytest
import torch

from analysis import cka
from analysis.cka import linear_cka
from command_line import run_cli
from diffusion import create_diffusion
from imagedata.latents import write_manifest, write_shard
from models import ADM, DiT
from models.routing import TaskRouter

# float64 throughout: CKA of n <= 2000 rows agrees with an independent float64 formula to ~1e-12; 1e-9 leaves room.
TOL = 1e-9


def correlated(n=300, p=12, q=7, seed=0):
    """Two feature sets sharing a latent factor, so their CKA lies strictly between 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g, dtype=torch.float64)
    X = z @ torch.randn(5, p, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, p, generator=g, dtype=torch.float64)
    Y = z @ torch.randn(5, q, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, q, generator=g, dtype=torch.float64)
    return X, Y


def random_orthogonal(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def gram_cka(X, Y):
    """Kornblith et al. 2019 Eq. 1-3 as written: HSIC with centred n x n Gram matrices, in numpy."""
    X, Y = X.numpy(), Y.numpy()
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L))


def test_cka_of_identical_inputs_is_one():
    X, _ = correlated()
    assert linear_cka(X, X) == pytest.approx(1.0, abs=TOL)
    assert linear_cka(X.float(), X.float()) == pytest.approx(1.0, abs=1e-6)  # float32 inputs are promoted


def test_cka_matches_centred_gram_formula():
    X, Y = correlated()
    value = linear_cka(X, Y)
    assert 0.05 < value < 0.95
    assert value == pytest.approx(gram_cka(X, Y), abs=TOL)


def test_cka_is_invariant_to_orthogonal_transforms_isotropic_scaling_and_offsets():
    X, Y = correlated()
    expected = linear_cka(X, Y)
    Xt = 3.7 * X @ random_orthogonal(X.shape[1], 1) + 5.0  # offsets vanish with the centring
    Yt = 0.02 * Y @ random_orthogonal(Y.shape[1], 2)
    assert linear_cka(Xt, Yt) == pytest.approx(expected, abs=TOL)
    # ... but not to an anisotropic scaling of the features
    assert abs(linear_cka(X * torch.linspace(0.1, 10, X.shape[1], dtype=torch.float64), Y) - expected) > 1e-3


def test_cka_of_independent_features_is_near_zero_for_many_samples():
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(20000, 8, generator=g), torch.randn(20000, 8, generator=g)
    # E[CKA] ~ sqrt(p q) / n = 4e-4 here; a shared factor of the same size would give ~0.25
    assert linear_cka(X, Y) < 5e-3


def test_cka_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.randn(10, 3), torch.randn(11, 3))


def test_cka_matrix_equals_pairwise_cka():
    sets = [correlated(seed=s)[0] for s in range(3)] + [correlated(seed=0)[1][:, :4]]
    matrix = cka.cka_matrix(sets)
    for i in range(4):
        for j in range(4):
            assert matrix[i, j] == pytest.approx(linear_cka(sets[i], sets[j]), abs=TOL)


def test_timestep_cka_hooks_every_block_and_removes_its_hooks():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                routing="dtr").eval()
    for p in model.parameters():  # random weights everywhere: adaLN-zero would make every block the identity
        p.data.normal_(0, 0.1)
    diffusion = create_diffusion("", noise_schedule="linear")
    x0, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    timesteps = [0, 500, 999]
    result = cka.timestep_cka(model, diffusion, x0, y, timesteps, seed=0, batch_size=4)
    assert result.shape == (2, 3, 3)
    assert np.allclose(result, result.transpose(0, 2, 1)) and np.allclose(np.diagonal(result, axis1=1, axis2=2), 1)
    assert all(not block._forward_hooks for block in model.blocks)
    # block 1's features at t = 500 are what the model's own blocks compute on x_500 (the hook saw the right thing)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    feats = cka.block_features(model, diffusion, x0, y, [500], noise, batch_size=6)[500]
    t = torch.full((6,), 500)
    with torch.no_grad():
        x = model.x_embedder(diffusion.q_sample(x0, t, noise=noise)) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        for block in model.blocks:
            x = block(x, c, t)
    torch.testing.assert_close(feats[1], x.reshape(-1, 32))
    assert cka.cka_matrix([feats[0], feats[0]])[0, 1] == pytest.approx(1.0)


def posterior_latents(path, n=6):
    """An extract_features.py folder with the default --latent-stat posterior: (n, 2, 4, 8, 8) means and stds."""
    path.mkdir()
    g = np.random.default_rng(0)
    means, stds = g.standard_normal((n, 2, 4, 8, 8)), 0.1 + g.random((n, 2, 4, 8, 8))
    write_shard(str(path), 0, means, np.arange(n) % 3, {"start": 0, "stop": n}, stds=stds)
    write_manifest(str(path), 1, latent_stat="posterior", vae="ema", latent_scale=0.18215, latent_shape=[4, 8, 8],
                   image_size=64, num_classes=3, shard_size=n)
    return means[:, 0]  # the unflipped means (n, 4, 8, 8)


def save_latent_checkpoint(path, model, name):
    """A train.py-format checkpoint of a model on 8x8x4 latents of 64 px images."""
    for p in model.parameters():  # random weights everywhere (zero-initialised outputs would hide the blocks)
        p.data.normal_(0, 0.1)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "args": {},
                "model_config": {"model": name, **model.config}, "vae": "ema", "image_size": 64,
                "diffusion_config": {"noise_schedule": "linear", "learn_sigma": True}, "latent_scale": 0.18215}, path)
    return str(path)


@pytest.mark.parametrize("family", ["DiT", "ADM"])
def test_command_line_reads_posterior_latent_folders_and_adm_blocks(tmp_path, family):
    pytest.importorskip("matplotlib")
    means = posterior_latents(tmp_path / "features")
    torch.manual_seed(0)
    if family == "DiT":
        model, name = DiT(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                          num_classes=3, routing="dtr"), "DiT-S/4"
    else:
        model, name = ADM(input_size=8, in_channels=4, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                          attention_resolutions=(4,), num_head_channels=16, num_classes=3, routing="dtr"), "ADM-ImageNet64"
    ckpt = save_latent_checkpoint(tmp_path / "model.pt", model.eval(), name)
    code, stderr = run_cli(cka.main, cka.build_parser(), ["--ckpt", ckpt, "--feature-path", tmp_path / "features",
                           "--num-images", 6, "--num-timesteps", 3, "--out", tmp_path / "cka"], "cka.py")
    assert code == 0 and stderr == ""
    with np.load(tmp_path / "cka" / "cka.npz") as f:
        result, timesteps = f["cka"], f["timesteps"]
    blocks = cka.routed_blocks(model)
    # ADM: every ResBlock and attention block (the up/down-sampling ResBlocks included): one per DTR router
    assert len(blocks) == sum(isinstance(m, TaskRouter) for m in model.modules()) == (2 if family == "DiT" else 14)
    assert result.shape == (len(blocks), 3, 3)
    # x_0 is the posterior mean of each image: the same numbers as CKA computed directly on the means
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    x0, y = torch.from_numpy(means).float()[order], torch.from_numpy(np.arange(6) % 3)[order]
    expected = cka.timestep_cka(model, create_diffusion("", noise_schedule="linear"), x0, y, timesteps, seed=0)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-12)
    assert 0 < result.min() < 0.999  # distant timesteps: not the identity map of a zero-initialised block
