"""train.py's real training step under --compile, --mixed-precision bf16 and --grad-checkpointing, on the CPU.

Each variant, alone and all together, must give eager fp32's loss and updated weights within what its
numerics allow. The step's optimiser is SGD with lr 1 here, so the weight update is the gradient itself
(AdamW's first step is lr * sign(g), blind to the gradient's size). Tolerances, relative to the loss and
to the norm of the update:
  * activation checkpointing recomputes the same ops: identical, bit for bit;
  * torch.compile reorders and fuses fp32 arithmetic: 2^-14 (fp32's unit roundoff 2^-24 times the ~2^10
    roundings in series from input to loss, a bound no fusion choice can exceed on this model);
  * bf16 autocast rounds each matmul's inputs to 8 significant bits (unit roundoff 2^-9): loss 2^-6,
    update 2^-4 (a few roundings per block over 2 blocks, x4 margin; measured here 2.4e-4 and 4.1e-3).
Compiled with the aot_eager backend: dynamo tracing, AOT autograd and decompositions are what a GPU's
inductor runs on too (graph breaks, unsupported ops surface here); inductor's CPU C++ codegen would
add minutes of compile to the suite and is exercised by benchmarks/gpu_check.py on the GPU.
"""
import argparse
import copy

import pytest
import torch

from diffusion import create_diffusion
from models import DiT
from sampling.seeded import model_function
from storage.checkpoint import TrainingState
from training.ema import EMAUpdater
from training.fast_path import AUTOCAST_DTYPES, compile_for_training
from training.step import train_step

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, in_channels=4, num_classes=10,
            learn_sigma=True, routing="dtr")
ARGS = argparse.Namespace(global_batch_size=6, global_seed=3, timestep_range=None, ema_decay=0.9)
BACKEND = "aot_eager"


def tiny_dit(grad_checkpointing=False):
    """A tiny routed DiT with every output layer random (zero-initialised ones would hide paths)."""
    torch.manual_seed(0)
    model = DiT(**TINY, grad_checkpointing=grad_checkpointing)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model


def one_step(compile=False, precision="no", grad_checkpointing=False):
    """(loss, parameters after the step, EMA after the step) of two train_steps from the same start."""
    model = tiny_dit(grad_checkpointing).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = create_diffusion("", learn_sigma=True, loss_weighting="ant-uw")  # the longest loss path
    weighting = diffusion.loss_weighting
    opt = torch.optim.SGD([{"params": list(model.parameters())}, *weighting.param_groups()], lr=1.0)
    state = TrainingState(model, ema, opt, weighting, torch.amp.GradScaler("cpu", enabled=False), {})
    if compile:
        compile_for_training(model, diffusion, backend=BACKEND)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _, _ = train_step(state, model, diffusion, x, y, ARGS, 0, 1, AUTOCAST_DTYPES[precision],
                            EMAUpdater(ema, model))
    update = {k: v - start[k] for k, v in model.state_dict().items()}
    state.step += 1
    train_step(state, model, diffusion, x, y, ARGS, 0, 1, AUTOCAST_DTYPES[precision], EMAUpdater(ema, model))
    return loss, update, {k: v.clone() for k, v in ema.state_dict().items()}


def norm(tensors):
    return torch.sqrt(sum((v.double() ** 2).sum() for v in tensors.values()))


@pytest.fixture(scope="module")
def eager():
    return one_step()


@pytest.mark.parametrize("variant,loss_tol,update_tol", [
    (dict(grad_checkpointing=True), 0.0, 0.0),
    (dict(compile=True), 2**-14, 2**-14),
    (dict(precision="bf16"), 2**-6, 2**-4),
    (dict(compile=True, precision="bf16", grad_checkpointing=True), 2**-6, 2**-4),
])
def test_train_step_variant_matches_eager_fp32(eager, variant, loss_tol, update_tol):
    loss, update, ema = one_step(**variant)
    ref_loss, ref_update, ref_ema = eager
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss - ref_loss) <= loss_tol * abs(ref_loss), (loss.item(), ref_loss.item())
    diff = norm({k: update[k] - ref_update[k] for k in update})
    assert diff <= update_tol * norm(ref_update), (diff / norm(ref_update)).item()
    assert all(v.dtype == ref_ema[k].dtype for k, v in ema.items())  # EMA and parameters stay fp32
    if loss_tol == 0:
        assert all(torch.equal(ema[k], ref_ema[k]) for k in ema)


def test_ema_updater_is_official_dits_update():
    model, ema = tiny_dit(), tiny_dit()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    update = EMAUpdater(ema, model)
    update(0.9)
    for k, v in ema.state_dict().items():  # ema.mul_(decay).add_(param, alpha=1 - decay), up to fp32 rounding
        torch.testing.assert_close(v, before[k] * 0.9 + model.state_dict()[k] * 0.1, rtol=2**-22, atol=2**-22)
    update(0.0)  # decay 0 copies the model exactly; decay 1 keeps the EMA exactly
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ema.state_dict().items())
    frozen = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update(1.0)
    assert all(torch.equal(v, frozen[k]) for k, v in ema.state_dict().items())


def test_compiled_cfg_sampling_step_matches_eager():
    # sample_ddp.py --compile: the guided model call of every DDPM step, compiled once
    model = tiny_dit().eval()
    diffusion = create_diffusion("4", learn_sigma=True)
    guided = model_function(model, 1.5, "all", "no")
    compiled = model_function(model, 1.5, "all", "no", compile=True, compile_backend=BACKEND)
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    y = torch.tensor([1, 4, 7])
    with torch.no_grad():
        for i in (3, 2):  # two steps: the second reuses the compiled graph
            t = torch.full((3,), i, dtype=torch.long)
            eager_step = diffusion.p_sample(guided, x, t, model_kwargs={"y": y}, noise_fn=lambda _: noise)["sample"]
            compiled_step = diffusion.p_sample(compiled, x, t, model_kwargs={"y": y}, noise_fn=lambda _: noise)
            scale = eager_step.abs().max()
            assert (compiled_step["sample"] - eager_step).abs().max() <= 2**-14 * scale
