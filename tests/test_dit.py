"""Pins models/dit.py: official DiT compatibility, the DTR block of Eq. 8, and the zoo."""
import math

import pytest
import torch
from torch import nn

from dit_closed_forms import official_parameter_count
from float_comparison import scale_one_guidance_bound
from models import DiT, DiT_models, create_model
from models.dit import modulate
from models.routing import build_masks

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def randomize(model, seed=0):
    """Replace the zero adaLN-Zero init by random weights so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def inputs(n=4, seed=1, channels=4, size=8, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, t, y


#################################################################################
#         An independent rendering of the official DiT, built from timm          #
#################################################################################
# Official DiT composes timm's PatchEmbed, Attention and Mlp; this reference does the same with the
# official forward pass, so agreement pins our own SDPA attention, patch embedding and block layout.

class ReferenceBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        from timm.layers import Mlp
        from timm.models.vision_transformer import Attention
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=d, hidden_features=4 * d, act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class ReferenceDiT(nn.Module):
    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes):
        super().__init__()
        from timm.layers import PatchEmbed
        d = hidden_size
        self.p, self.c = patch_size, 2 * in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, d, bias=True)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, d), requires_grad=False)
        self.blocks = nn.ModuleList([ReferenceBlock(d, num_heads) for _ in range(depth)])
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(d, patch_size ** 2 * self.c)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, t, y):
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1)) + self.y_embedder.embedding_table(y)
        x = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        n, h = x.shape[0], int(x.shape[1] ** 0.5)
        x = x.reshape(n, h, h, self.p, self.p, self.c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, self.c, h * self.p, h * self.p)


def test_official_state_dict_loads_strictly_and_gives_identical_outputs():
    reference = ReferenceDiT(**TINY).eval()
    randomize(reference, seed=5)
    with torch.no_grad():
        reference.pos_embed.copy_(torch.randn_like(reference.pos_embed))
    official_state = reference.state_dict()
    x, t, y = inputs()
    expected = reference(x, t, y)
    for routing_kwargs in (dict(routing="none"), dict(routing="dtr", beta=1.0)):
        ours = DiT(**TINY, **routing_kwargs).eval()
        ours.load_state_dict(official_state, strict=True)
        assert set(ours.state_dict()) == set(official_state)
        torch.testing.assert_close(ours(x, t, y), expected, rtol=1e-5, atol=1e-5)


def test_authors_dtr_checkpoint_masks_are_accepted_and_checked():
    model = DiT(**TINY, routing="dtr", alpha=4.0, beta=0.8)
    state = model.state_dict()
    for i in range(TINY["depth"]):
        state[f"blocks.{i}.routing._unit_mapping"] = build_masks("dtr", 1000, 32, 4.0, 0.8)
    DiT(**TINY, routing="dtr", alpha=4.0, beta=0.8).load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="differ"):
        DiT(**TINY, routing="dtr", alpha=2.0, beta=0.8).load_state_dict(dict(state), strict=True)
    with pytest.raises(ValueError, match="routing='none'"):
        DiT(**TINY, routing="none").load_state_dict(dict(state), strict=True)


def test_dtr_block_equals_eq8_computed_by_hand():
    model = randomize(DiT(**TINY, routing="dtr", alpha=4.0, beta=0.8))
    block = model.blocks[0]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 16, 32, generator=g)
    c = torch.randn(3, 32, generator=g)
    t = torch.tensor([0, 400, 999])
    m = build_masks("dtr", 1000, 32, 4.0, 0.8)[t].unsqueeze(1)  # (N, 1, D)

    # Eq. 7: z + Attn(m z) + MLP(m z + Attn(m z)), each with its adaLN-Zero gate and modulation.
    s1, sc1, g1, s2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
    mz = m * z
    attn = g1.unsqueeze(1) * block.attn(block.norm1(mz) * (1 + sc1.unsqueeze(1)) + s1.unsqueeze(1))
    h = mz + attn
    mlp = g2.unsqueeze(1) * block.mlp(block.norm2(h) * (1 + sc2.unsqueeze(1)) + s2.unsqueeze(1))
    by_hand = z + attn + mlp  # Eq. 7, which Eq. 8 rewrites as (1 - m) z + DiTBlock(m z)
    torch.testing.assert_close(block(z, c, t), by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block(z, c, t), (1 - m) * z + block.dit_block(mz, c), rtol=0, atol=0)


def test_masked_out_channels_cannot_change_the_block_branch():
    model = randomize(DiT(**TINY, routing="dtr", alpha=1.0, beta=0.5))
    block = model.blocks[1]
    z = torch.randn(2, 16, 32, requires_grad=True)
    c = torch.randn(2, 32)
    t = torch.tensor([10, 900])
    m = block.routing(t)  # (N, 1, D)
    branch = block(z, c, t) - (1 - m) * z  # what Eq. 8 routes through the DiT block
    (grad,) = torch.autograd.grad(branch.pow(2).sum(), z)
    off = (m == 0).expand_as(z)
    assert off.any() and (~off).any()
    assert torch.count_nonzero(grad[off]) == 0
    assert torch.count_nonzero(grad[~off]) > 0


def test_beta_one_equals_no_routing_exactly():
    x, t, y = inputs()
    base = randomize(DiT(**TINY, routing="none"))
    routed = DiT(**TINY, routing="dtr", beta=1.0).eval()
    routed.load_state_dict(base.state_dict())
    assert torch.equal(base(x, t, y), routed(x, t, y))


def test_routed_model_is_the_vanilla_trunk_with_eq8_and_its_own_table_in_every_block():
    # R-TR gives block i the table of seed + i: computed here from the vanilla model's own parts
    x, t, y = inputs()
    base = randomize(DiT(**TINY, routing="none"))
    routed = DiT(**TINY, routing="random", beta=0.5, routing_seed=7).eval()
    routed.load_state_dict(base.state_dict())
    with torch.no_grad():
        z = base.x_embedder(x) + base.pos_embed
        c = base.t_embedder(t) + base.y_embedder(y, train=False)
        for i, block in enumerate(base.blocks):
            m = build_masks("random", 1000, 32, beta=0.5, seed=7 + i)[t].unsqueeze(1)  # (N, 1, D)
            z = (1 - m) * z + block.dit_block(m * z, c)  # Eq. 8
        expected = base.unpatchify(base.final_layer(z, c))
        assert not torch.allclose(expected, base(x, t, y))  # the masks matter at this size
        # (1 - m) z and z - m z are the same numbers for a 0/1 mask, so the two agree exactly
        assert torch.equal(routed(x, t, y), expected)


@pytest.mark.parametrize("name", list(DiT_models))
def test_zoo_built_the_official_way_has_official_parameter_counts(name):
    sizes = {"XL": (28, 1152), "L": (24, 1024), "B": (12, 768), "S": (12, 384)}
    family, patch = name[len("DiT-"):].split("/")
    with torch.device("meta"):  # counts only: no memory, no init cost
        official = DiT_models[name](input_size=32, num_classes=1000)  # official DiT's train.py / sample.py call
        vanilla = create_model(name)
        routed = create_model(name, routing="dtr")
    count = sum(p.numel() for p in official.parameters())
    assert count == official_parameter_count(*sizes[family], int(patch))
    assert official.config == vanilla.config  # the zoo callable and create_model build the same model
    assert (len(official.blocks), official.config["hidden_size"], official.patch_size) == (*sizes[family], int(patch))
    assert sum(p.numel() for p in routed.parameters()) == count  # routing adds zero parameters
    published = {"DiT-XL/2": 675_129_632, "DiT-L/2": 458_102_816, "DiT-B/2": 130_512_416, "DiT-S/2": 32_963_360}
    if name in published:
        assert count == published[name]


def test_fresh_model_outputs_zeros_adaln_zero():
    x, t, y = inputs()
    for routing in ("none", "dtr"):
        out = DiT(**TINY, routing=routing)(x, t, y)
        assert out.shape == (4, 8, 8, 8)
        assert torch.count_nonzero(out) == 0


def test_unconditional_model_has_no_null_class_and_no_dropout():
    model = DiT(**{**TINY, "num_classes": 1})
    assert model.y_embedder.embedding_table.num_embeddings == 1
    assert model.y_embedder.dropout_prob == 0
    x, t, _ = inputs()
    with pytest.raises(ValueError, match="guidance"):
        model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.zeros(8, dtype=torch.long), 1.5)


def test_cfg_guides_all_channels_by_default_and_three_in_legacy_mode():
    model = randomize(DiT(**TINY, routing="dtr"))
    x, t, y = inputs(n=3)
    null = torch.full_like(y, TINY["num_classes"])
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
    # References from the same doubled batch forward_with_cfg runs: fp32 kernels block differently for 3 and
    # 6 samples and per CPU (AVX2 / AVX-512), and a batch-3 forward differs from its half by ~1e-4 here.
    both = model(x2, t2, y2)
    cond, uncond = both[:3], both[3:]
    scale = 2.5
    guided = uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4])

    out = model.forward_with_cfg(x2, t2, y2, scale)
    torch.testing.assert_close(out[:3, :4], guided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3:, :4], guided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:3, 4:], cond[:, 4:], rtol=1e-5, atol=1e-5)  # variances unguided

    legacy = model.forward_with_cfg(x2, t2, y2, scale, guide_channels=3)
    torch.testing.assert_close(legacy[:3, :3], guided[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(legacy[:3, 3], cond[:, 3], rtol=1e-5, atol=1e-5)  # 4th channel unguided

    torch.testing.assert_close(model.forward_with_cfg(x2, t2, y2, 1.0)[:3], cond, rtol=0,
                               atol=scale_one_guidance_bound(cond, uncond))
    with pytest.raises(ValueError, match="guide_channels"):
        model.forward_with_cfg(x2, t2, y2, scale, guide_channels=5)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, y = inputs()
    grads = []
    for flag in (False, True):
        model = randomize(DiT(**TINY, routing="dtr", grad_checkpointing=flag)).train()
        model.y_embedder.dropout_prob = 0.0  # deterministic labels for the comparison
        model(x, t, y).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_force_drop_ids_replace_labels_by_the_null_class():
    model = randomize(DiT(**TINY))
    x, t, y = inputs(n=2)
    null = torch.full_like(y, TINY["num_classes"])
    dropped = model(x, t, y, force_drop_ids=torch.tensor([1, 1]))
    torch.testing.assert_close(dropped, model(x, t, null))


def test_model_rejects_timesteps_outside_the_routing_table():
    model = DiT(**TINY, routing="dtr")
    x, _, y = inputs(n=1)
    with pytest.raises(ValueError, match="outside"):
        model(x, torch.tensor([1000]), y)


def test_compiled_model_rejects_bad_timesteps_with_the_eager_error():
    # the check runs once per forward outside the compiled graph (inside it, inductor's CPU bounds check
    # fails instead; aot_eager keeps this test fast and still runs the graph)
    model = DiT(**TINY, routing="dtr").eval()
    compiled = torch.compile(model, backend="aot_eager")
    x, _, y = inputs(n=2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, torch.tensor([0, 999]), y), model(x, torch.tensor([0, 999]), y))
        with pytest.raises(ValueError, match=r"timesteps \[1000\] lie outside \[0, 1000\)"):
            compiled(x, torch.tensor([3, 1000]), y)


@pytest.mark.parametrize("kwargs, message", [
    (dict(routing="sliding"), "unknown routing kind"),
    (dict(routing="dtr", alpha=0), "alpha"),
    (dict(routing="dtr", beta=1.5), "beta"),
    (dict(num_heads=3), "num_heads"),
    (dict(input_size=9), "patch_size"),
])
def test_bad_model_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiT(**{**TINY, **kwargs})


def test_unknown_model_name_lists_the_zoo():
    with pytest.raises(ValueError, match="DiT-XL/2"):
        create_model("DiT-M/2")


def test_config_rebuilds_an_identical_model():
    model = DiT(**TINY, routing="random", routing_seed=3)
    clone = DiT(**model.config)
    assert model.routing_config() == {"routing": "random", "alpha": 4.0, "beta": 0.8, "routing_seed": 3}
    for a, b in zip(model.blocks, clone.blocks):
        assert torch.equal(a.routing.masks, b.routing.masks)
