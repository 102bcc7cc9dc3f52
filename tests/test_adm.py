"""Pins models/adm.py: the guided-diffusion UNet layout and DTR placed after the first norm (appendix A.1)."""
import pytest
import torch
import torch.nn.functional as F

from models import create_model
from models.adm import ADM, ADM_IMAGENET64, ADM_models, AttentionBlock, ResBlock
from models.routing import TaskRouter, build_masks

TINY = dict(input_size=8, in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions="4", num_head_channels=16, dropout=0.0, num_classes=10)


def randomize(module, seed=0):
    """Replace the zero-initialised output convs by random weights so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def inputs(n=3, seed=1, channels=3, size=8, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    t = torch.tensor([0, 437, 999, 250][:n])
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, t, y


def routed_blocks(model):
    return [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]


def test_output_shape_and_zero_output_at_init():
    x, t, y = inputs()
    out = ADM(**TINY)(x, t, y)
    assert out.shape == (3, 6, 8, 8)  # learn_sigma: [eps, var_values]
    assert torch.equal(out, torch.zeros_like(out))  # the final conv is zero-initialised
    # The other guided-diffusion variants: conv resampling layers and additive timestep embedding.
    plain_unet = ADM(**{**TINY, "learn_sigma": False, "resblock_updown": False, "use_scale_shift_norm": False})
    assert plain_unet(x, t, y).shape == (3, 3, 8, 8)
    assert "input_blocks.2.0.op.weight" in plain_unet.state_dict()  # Downsample conv, guided-diffusion name


def test_beta_one_dtr_equals_unrouted_model():
    x, t, y = inputs()
    plain = randomize(ADM(**TINY))
    expected = plain(x, t, y)
    for kind in ("dtr", "random"):
        routed = ADM(**TINY, routing=kind, beta=1.0).eval()
        routed.load_state_dict(plain.state_dict(), strict=True)
        torch.testing.assert_close(routed(x, t, y), expected, rtol=0, atol=0)
    masked = ADM(**TINY, routing="dtr", beta=0.5).eval()
    masked.load_state_dict(plain.state_dict())
    assert not torch.allclose(masked(x, t, y), expected)  # so the equality above is not vacuous


def test_masked_out_channels_after_first_norm_cannot_reach_residual_branch():
    block = randomize(ResBlock(32, 16, 0.0, out_channels=64, use_scale_shift_norm=True,
                               router=TaskRouter("dtr", 1000, 32, beta=0.5)))
    x, emb, t = torch.randn(2, 32, 8, 8), torch.randn(2, 16), torch.tensor([3, 998])
    seen = {}

    def keep(module, args, output):  # the SiLU right after the first GroupNorm
        output.retain_grad()
        seen["h"] = output

    block.in_layers[1].register_forward_hook(keep)
    block(x, emb, t).square().sum().backward()
    mask = build_masks("dtr", 1000, 32, beta=0.5)[t]  # (N, C)
    grad = seen["h"].grad.abs().sum(dim=(2, 3))  # (N, C)
    assert torch.all(grad[mask == 0] == 0)
    assert torch.all(grad[mask == 1] > 0)
    assert not torch.equal(mask[0], mask[1])  # the two samples use different rows of the table


@pytest.mark.parametrize("updown", ["none", "down", "up"])
def test_resblock_is_unmasked_skip_plus_branch_of_masked_activation(updown):
    c_in, c_out, e = 32, 64, 16
    router = TaskRouter("dtr", 1000, c_in, beta=0.75)
    block = randomize(ResBlock(c_in, e, 0.0, out_channels=c_out, use_scale_shift_norm=True,
                               up=updown == "up", down=updown == "down", router=router))
    x, emb, t = torch.randn(3, c_in, 8, 8), torch.randn(3, e), torch.tensor([0, 500, 999])
    resample = {"none": lambda z: z, "down": lambda z: F.avg_pool2d(z, 2),
                "up": lambda z: F.interpolate(z, scale_factor=2, mode="nearest")}[updown]
    norm1, _, conv1 = block.in_layers
    norm2, _, _, conv2 = block.out_layers
    mask = build_masks("dtr", 1000, c_in, beta=0.75)[t][:, :, None, None]  # (N, C_in, 1, 1)
    h = mask * F.silu(F.group_norm(x, 32, norm1.weight, norm1.bias))
    h = F.conv2d(resample(h), conv1.weight, conv1.bias, padding=1)
    scale, shift = F.linear(F.silu(emb), block.emb_layers[1].weight, block.emb_layers[1].bias).chunk(2, dim=1)
    h = F.group_norm(h, 32, norm2.weight, norm2.bias) * (1 + scale[..., None, None]) + shift[..., None, None]
    h = F.conv2d(F.silu(h), conv2.weight, conv2.bias, padding=1)
    skip = F.conv2d(resample(x), block.skip_connection.weight, block.skip_connection.bias)  # unmasked x
    torch.testing.assert_close(block(x, emb, t), skip + h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_softmax_attention_on_masked_norm(new_order):
    c, heads, d = 64, 4, 16
    router = TaskRouter("dtr", 1000, c)
    block = randomize(AttentionBlock(c, num_head_channels=d, use_new_attention_order=new_order, router=router))
    x, t = torch.randn(2, c, 4, 4), torch.tensor([10, 900])
    mask = build_masks("dtr", 1000, c)[t][:, :, None]  # (N, C, 1)
    h = mask * F.group_norm(x.flatten(2), 32, block.norm.weight, block.norm.bias)
    qkv = F.conv1d(h, block.qkv.weight, block.qkv.bias)  # (N, 3C, L)
    if new_order:  # [q; k; v], each split into heads
        q, k, v = (z.reshape(2, heads, d, 16) for z in qkv.chunk(3, dim=1))
    else:  # per head [q, k, v]
        q, k, v = qkv.reshape(2, heads, 3 * d, 16).split(d, dim=2)
    weights = torch.softmax(torch.einsum("nhdi,nhdj->nhij", q, k) / d ** 0.5, dim=-1)  # (N, heads, L, L)
    a = torch.einsum("nhij,nhdj->nhdi", weights, v).reshape(2, c, 16)
    expected = x.flatten(2) + F.conv1d(a, block.proj_out.weight, block.proj_out.bias)
    torch.testing.assert_close(block(x, t), expected.reshape(x.shape), rtol=1e-5, atol=1e-5)


def test_every_resblock_and_attention_block_routed_by_its_input_channels():
    model = ADM(**TINY, routing="dtr")
    blocks = routed_blocks(model)
    # input: 2 res + 1 down-res + 1 attn; middle: 2 res + 1 attn; output: 4 res + 2 attn + 1 up-res
    assert len(blocks) == 14
    for block in blocks:
        assert block.routing.channels == block.channels
        assert torch.equal(block.routing.masks.float(), build_masks("dtr", 1000, block.channels))
    concat = model.output_blocks[0][0]
    assert concat.channels == 128 and concat.routing.channels == 128  # mask sized to the concatenated input


def test_routing_adds_no_parameters_and_no_state_dict_keys():
    plain = ADM(**TINY)
    keys = list(plain.state_dict())
    n = sum(p.numel() for p in plain.parameters())
    for kind in ("dtr", "random", "cdtr"):
        routed = ADM(**TINY, routing=kind)
        assert list(routed.state_dict()) == keys
        assert sum(p.numel() for p in routed.parameters()) == n
    assert "input_blocks.1.0.in_layers.0.weight" in keys and "middle_block.1.qkv.weight" in keys
    assert "out.2.weight" in keys and "time_embed.2.weight" in keys and "label_emb.weight" in keys


def test_random_routing_draws_a_table_per_block_reproducibly():
    a, b = ADM(**TINY, routing="random"), ADM(**TINY, routing="random")
    other = ADM(**TINY, routing="random", routing_seed=1)
    tables = [blk.routing.masks for blk in routed_blocks(a)]
    same_width = [m for m in tables if m.shape[1] == 64]
    assert len(same_width) >= 2 and not torch.equal(same_width[0], same_width[1])
    for ma, mb, mo in zip(tables, [blk.routing.masks for blk in routed_blocks(b)],
                          [blk.routing.masks for blk in routed_blocks(other)]):
        assert torch.equal(ma, mb)
    assert not torch.equal(tables[0], routed_blocks(other)[0].routing.masks)
    # DTR tables depend only on the width: same-width blocks share the same window schedule.
    dtr = [blk.routing.masks for blk in routed_blocks(ADM(**TINY, routing="dtr")) if blk.channels == 64]
    assert all(torch.equal(dtr[0], m) for m in dtr[1:])


def test_unconditional_model_has_no_label_embedding_and_ignores_y():
    x, t, _ = inputs()
    for num_classes in (None, 1):
        model = randomize(ADM(**{**TINY, "num_classes": num_classes}))
        assert model.num_classes == 1 and not hasattr(model, "label_emb")
        assert not any(k.startswith("label_emb") for k in model.state_dict())
        torch.testing.assert_close(model(x, t), model(x, t, torch.zeros(3, dtype=torch.long)))
    conditional = randomize(ADM(**TINY))
    with pytest.raises(ValueError, match="pass labels y"):
        conditional(x, t)
    assert not torch.allclose(conditional(x, t, torch.zeros(3, dtype=torch.long)),
                              conditional(x, t, torch.ones(3, dtype=torch.long)))


def test_config_rebuilds_the_same_model():
    x, t, y = inputs()
    model = randomize(ADM(**TINY, routing="random", beta=0.5, routing_seed=7))
    rebuilt = ADM(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(rebuilt(x, t, y), model(x, t, y), rtol=0, atol=0)
    assert model.routing_config() == {"routing": "random", "alpha": 4.0, "beta": 0.5, "routing_seed": 7}
    assert model.config["attention_resolutions"] == (4,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(routing="bogus"), "unknown routing kind"),
    (dict(channel_mult=()), "channel_mult is empty"),
    (dict(attention_resolutions="3"), r"attention_resolutions \[3\] are not reached"),
    (dict(attention_resolutions=(16,)), "not reached"),
    (dict(num_head_channels=24), "not divisible by num_head_channels 24"),
    (dict(model_channels=48), "divisible by 32"),
    (dict(input_size=7, attention_resolutions="7"), "must be divisible by"),
    (dict(routing="dtr", beta=0.0), "beta"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ADM(**{**TINY, **kwargs})


@pytest.mark.parametrize("routing", ["none", "dtr"])
def test_timestep_outside_table_raises(routing):
    model = ADM(**TINY, routing=routing)
    x, _, y = inputs(n=2)
    for bad in (1000, -1):
        with pytest.raises(ValueError, match="outside"):
            model(x, torch.tensor([5, bad]), y)


def test_presets_match_adm_parameter_counts():
    with torch.device("meta"):  # no memory or init time for the 296M weights
        imagenet = create_model("ADM-ImageNet64", class_dropout_prob=0)  # guided-diffusion's exact layout
        ffhq = create_model("ADM-FFHQ64", routing="dtr")
        imagenet_cfg = create_model("ADM-ImageNet64")
    n_imagenet = sum(p.numel() for p in imagenet.parameters())
    n_ffhq = sum(p.numel() for p in ffhq.parameters())
    assert abs(n_imagenet - 296e6) / 296e6 < 0.005  # ADM paper: 296M for ImageNet 64x64
    assert n_imagenet - n_ffhq == 1000 * 4 * 192  # only the label embedding differs; DTR adds nothing
    assert sum(p.numel() for p in imagenet_cfg.parameters()) - n_imagenet == 4 * 192  # one null-class row
    assert imagenet.out_channels == 6 and ffhq.num_classes == 1 and set(ADM_models) == {"ADM-ImageNet64", "ADM-FFHQ64"}
    assert imagenet.config == {**imagenet.config, **ADM_IMAGENET64}
    with pytest.raises(ValueError, match="ADM-FFHQ64"):
        create_model("ADM-FFHQ256")


def test_grad_checkpointing_gives_the_same_gradients():
    x, t, y = inputs(n=2)
    grads = []
    for flag in (False, True):
        model = randomize(ADM(**TINY, routing="dtr", grad_checkpointing=flag)).train()
        torch.manual_seed(0)  # the same random label drops (class_dropout_prob 0.1) in both runs
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_label_dropout_uses_the_null_class_row():
    x, t, y = inputs()
    model = randomize(ADM(**TINY)).train()  # conditional: class_dropout_prob defaults to 0.1
    assert model.config["class_dropout_prob"] == 0.1 and model.label_emb.weight.shape[0] == 11
    null = torch.full_like(y, 10)
    dropped = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 1]))
    # The references drop nothing explicitly: in train mode an unforced call would drop each label at random
    # with p = 0.1 from the global RNG, which made this test depend on the order tests ran in.
    keep = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(dropped, model(x, t, torch.where(torch.tensor([True, False, True]), null, y),
                                              force_drop_ids=keep), rtol=0, atol=0)
    assert not torch.allclose(dropped, model(x, t, y, force_drop_ids=keep))
    exact = ADM(**TINY, class_dropout_prob=0)  # guided-diffusion's layout: no null row, no dropout
    assert exact.label_emb.weight.shape[0] == 10
    with pytest.raises(ValueError, match="no null class"):
        exact(x, t, y, force_drop_ids=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        ADM(**{**TINY, "num_classes": 1}, class_dropout_prob=0.1)
