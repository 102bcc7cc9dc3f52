"""Hot loops never wait on the host (STYLE.md): counted by monitoring.host_syncs on the meta device and the CPU.

On the meta device a constant copied from the host inside a step is a visible cpu -> meta copy, and a
scalar read or a data-dependent size is recorded before it would fail; so each test fails on the code of
issue 22 (respace's per-call timestep map, the CPU null label and per-step noise copies, ANT-UW's bincount).
"""
import pytest
import torch

from diffusion import create_diffusion
from diffusion.guidance import ClassifierFreeGuidance
from models import ADM, DiT, TextDiT
from monitoring.host_syncs import HostSyncCounter
from sampling.seeded import PerSampleNoise, null_condition

DIT = dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, in_channels=4, num_classes=10,
           learn_sigma=True, routing="dtr")
ADM_TINY = dict(input_size=8, in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions="4", num_head_channels=16, num_classes=10, class_dropout_prob=0.1,
                learn_sigma=True, routing="dtr")
TEXT_DIT = dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, in_channels=4, context_dim=16,
                max_text_len=5, learn_sigma=True, routing="dtr")


def condition(model, n):
    """Model kwargs on meta: class labels, or a text model's caption tokens and mask."""
    if isinstance(model, TextDiT):
        return {"context": torch.randn(n, 5, 16, device="meta"),
                "context_mask": torch.ones(n, 5, dtype=torch.bool, device="meta")}
    return {"y": torch.zeros(n, dtype=torch.long, device="meta")}


def test_counter_sees_each_kind_of_sync():
    # the counter itself must be able to fail: one of each cause, on the CPU and on meta
    with HostSyncCounter() as syncs:
        x = torch.arange(6)
        x.sum().item()
        torch.bincount(x)
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]))
        x[x > 2]
        torch.ones(3).to("meta")
    torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]), output_size=3)  # outside: not counted
    assert syncs.summary() == {"scalar read": 1, "data-dependent size": 3, "host data": 1,
                               "blocking copy cpu -> meta": 1}, syncs.events


@pytest.mark.parametrize("weighting", ["vanilla", "min-snr", "p2", "ant-uw"])
def test_training_loss_and_backward_have_no_host_sync(weighting):
    model = DiT(**DIT).to("meta").train()
    diffusion = create_diffusion("", learn_sigma=True, loss_weighting=weighting)  # spaced, as train.py's
    diffusion.loss_weighting.to("meta")
    diffusion.place_tables("meta")
    x, y = torch.randn(8, 4, 8, 8, device="meta"), torch.zeros(8, dtype=torch.long, device="meta")
    with HostSyncCounter() as syncs:
        global_t = diffusion.timestep_sampler.sample_timesteps(16, "meta")  # every rank draws the global batch
        t = global_t[0::2]  # this rank's share
        losses = diffusion.training_losses(model, x, t, dict(y=y, force_drop_ids=(t % 3 == 0).long()),
                                           global_t=global_t)["loss"]
        losses.mean().backward()
    assert syncs.events == []


@pytest.mark.parametrize("model_class,config", [(DiT, DIT), (ADM, ADM_TINY), (TextDiT, TEXT_DIT)])
def test_cfg_sampling_steps_have_no_host_sync(model_class, config):
    model = model_class(**config).to("meta").eval()
    diffusion = create_diffusion("4", learn_sigma=True)
    guided = ClassifierFreeGuidance(model, 1.5, null_condition(model))
    noise = PerSampleNoise(range(3), 0, "meta")  # per-sample CPU generators, as sample_ddp.py
    steps = diffusion.p_sample_loop_progressive(guided, (3, 4, 8, 8), noise=noise((3, 4, 8, 8)),
                                                model_kwargs=condition(model, 3), noise_fn=lambda x: noise(x.shape))
    with torch.no_grad():
        next(steps)  # the generator's first step also runs the loop's setup: tables to the device, once
        for _ in range(3):
            with HostSyncCounter() as syncs:
                next(steps)
            assert syncs.events == []


def test_per_sample_noise_depends_only_on_the_sample_across_chunks():
    # 70 calls cross a chunk boundary; sample 5's noise is the same alone and in any batch
    alone, batch = PerSampleNoise([5], 0), PerSampleNoise([2, 5, 9], 0)
    for _ in range(PerSampleNoise.CHUNK_CALLS + 6):
        torch.testing.assert_close(alone((1, 2, 3))[0], batch((3, 2, 3))[1], rtol=0, atol=0)
    fresh = PerSampleNoise([5], 0)
    calls = torch.stack([fresh((1, 2, 3))[0] for _ in range(3)])
    assert not torch.equal(calls[0], calls[1])  # a new draw per call
    assert not torch.equal(PerSampleNoise([5], 1)((1, 2, 3)), PerSampleNoise([5], 0)((1, 2, 3)))  # the seed counts
