"""Pins models/text_dit.py and models/text_encoder.py: the text-conditional DiT of appendix C with DTR (Eq. 8)."""
import json

import pytest
import torch

from diffusion.guidance import ClassifierFreeGuidance
from float_comparison import scale_one_guidance_bound
from models import DiT_models, build_from_config, create_model, model_config, model_names
from models.text_dit import TextDiT

L, D_TEXT = 6, 16  # caption tokens and text-encoder width of the tiny test model
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
            context_dim=D_TEXT, max_text_len=L)


def randomize(model, seed=0):
    """Replace the zero initialisations by random weights so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    context = torch.randn(n, L, D_TEXT, generator=g)
    lengths = torch.tensor([L, 3, 2][:n])
    context_mask = torch.arange(L)[None] < lengths[:, None]  # (N, L), padding after the caption
    return x, t, context, context_mask


@pytest.mark.parametrize("learn_sigma, channels", [(True, 8), (False, 4)])
def test_output_shape_is_out_channels_by_input_size(learn_sigma, channels):
    x, t, context, mask = inputs()
    model = TextDiT(**TINY, learn_sigma=learn_sigma)
    assert model.out_channels == channels
    assert model(x, t, context, mask).shape == (3, channels, 8, 8)


def test_fresh_model_outputs_zeros_and_blocks_start_as_identity():
    x, t, context, mask = inputs()
    model = TextDiT(**TINY, routing="dtr").eval()
    assert torch.count_nonzero(model(x, t, context, mask)) == 0
    z = torch.randn(3, 16, 32)
    c = model.t_embedder(t)
    for block in model.blocks:  # adaLN-Zero and the zeroed cross-attention output: Block(z) = z
        assert torch.equal(block.dit_block(z, c, context, mask), z)


def test_beta_one_equals_no_routing_exactly():
    x, t, context, mask = inputs()
    base = randomize(TextDiT(**TINY, routing="none"))
    routed = TextDiT(**TINY, routing="dtr", beta=1.0).eval()
    routed.load_state_dict(base.state_dict())
    assert torch.equal(base(x, t, context, mask), routed(x, t, context, mask))
    routed_08 = TextDiT(**TINY, routing="dtr", beta=0.8).eval()
    routed_08.load_state_dict(base.state_dict())
    assert not torch.allclose(base(x, t, context, mask), routed_08(x, t, context, mask))


def test_masked_out_channels_cannot_change_the_block_branch():
    model = randomize(TextDiT(**TINY, routing="dtr", alpha=1.0, beta=0.5))
    block = model.blocks[1]
    _, _, context, mask = inputs(n=2)
    z = torch.randn(2, 16, 32, requires_grad=True)
    c = torch.randn(2, 32)
    t = torch.tensor([10, 900])
    m = block.routing(t)  # (N, 1, D)
    branch = block(z, c, t, context, mask) - (1 - m) * z  # what Eq. 8 routes through the whole block
    (grad,) = torch.autograd.grad(branch.pow(2).sum(), z)
    off = (m == 0).expand_as(z)
    assert off.any() and (~off).any()
    assert torch.count_nonzero(grad[off]) == 0
    assert torch.count_nonzero(grad[~off]) > 0


def test_routed_block_equals_eq8_and_masks_follow_the_original_timestep():
    model = randomize(TextDiT(**TINY, routing="dtr"))
    block = model.blocks[0]
    _, _, context, mask = inputs(n=2)
    z, c, t = torch.randn(2, 16, 32), torch.randn(2, 32), torch.tensor([0, 999])
    m = model.blocks[0].routing.masks[t].float().unsqueeze(1)  # (N, 1, D) rows 0 and 999
    assert not torch.equal(m[0], m[1])
    expected = (1 - m) * z + block.dit_block(m * z, c, context, mask)
    torch.testing.assert_close(block(z, c, t, context, mask), expected, rtol=0, atol=0)


def test_caption_changes_the_output():
    x, t, context, mask = inputs()
    model = randomize(TextDiT(**TINY))
    other = torch.randn_like(context)
    delta = (model(x, t, context, mask) - model(x, t, other, mask)).abs().amax(dim=(1, 2, 3))
    assert (delta > 1e-3).all()


def test_padding_tokens_masked_out_cannot_change_the_output():
    x, t, context, mask = inputs()
    model = randomize(TextDiT(**TINY, routing="dtr"))
    changed = torch.where(mask[..., None], context, torch.randn_like(context))  # new values on padding only
    assert torch.equal(model(x, t, context, mask), model(x, t, changed, mask))
    # Without the mask the same padding values do reach the output (rows 1 and 2 have padding).
    assert not torch.allclose(model(x, t, context)[1:], model(x, t, changed)[1:])


def test_integer_tokenizer_mask_equals_boolean_mask():
    x, t, context, mask = inputs()
    model = randomize(TextDiT(**TINY))
    assert torch.equal(model(x, t, context, mask), model(x, t, context, mask.long()))


def test_force_drop_ids_replace_the_caption_by_the_null_caption():
    x, t, context, mask = inputs()
    model = randomize(TextDiT(**TINY))
    drop = torch.tensor([1, 0, 1])
    null = model.null_context.detach().expand_as(context)
    by_hand = torch.where(drop[:, None, None] == 1, null, context)
    mask_by_hand = mask | (drop[:, None] == 1)  # the null caption attends all its tokens
    out = model(x, t, context, mask, force_drop_ids=drop)
    assert torch.equal(out, model(x, t, by_hand, mask_by_hand))
    assert torch.equal(out[1], model(x, t, context, mask)[1])
    assert not torch.allclose(out[0], model(x, t, context, mask)[0])


def test_training_drops_captions_with_the_given_probability():
    x, t, context, mask = inputs()
    always = randomize(TextDiT(**TINY, caption_dropout_prob=1.0)).train()
    null_out = always(x, t, context, mask, force_drop_ids=torch.ones(3, dtype=torch.long))
    assert torch.equal(always(x, t, context, mask), null_out)
    never = TextDiT(**TINY, caption_dropout_prob=0.0)
    assert never.null_context is None
    randomize(never).train()
    with torch.no_grad():  # eval and train agree without dropout: the caption is never replaced
        assert torch.equal(never(x, t, context, mask), never.eval()(x, t, context, mask))


def doubled_forward(model, x, t, context, mask=None):
    """(cond, uncond) from one forward on the doubled batch the CFG wrapper runs; uncond via force_drop_ids.

    fp32 kernels block differently for 3 and 6 samples and per CPU (AVX2 / AVX-512): a batch-3 forward
    differs from the same samples inside a batch of 6 by ~1e-4 at these activations (|out| ~ 30), so the
    references share the wrapper's batch composition.
    """
    drop = torch.cat([torch.zeros(len(x), dtype=torch.long), torch.ones(len(x), dtype=torch.long)])
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, context]),
                 None if mask is None else torch.cat([mask, mask]), force_drop_ids=drop)
    return both[: len(x)], both[len(x):]


def test_cfg_wrapper_at_scale_one_equals_the_conditional_model():
    x, t, context, mask = inputs()
    model = randomize(TextDiT(**TINY, routing="dtr"))
    cond, uncond = doubled_forward(model, x, t, context, mask)
    guided = ClassifierFreeGuidance(model, 1.0, uncond_kwargs=model.null_condition(with_mask=True))
    torch.testing.assert_close(guided(x, t, context=context, context_mask=mask), cond,
                               rtol=0, atol=scale_one_guidance_bound(cond, uncond))
    cond, uncond = doubled_forward(model, x, t, context)
    guided = ClassifierFreeGuidance(model, 1.0, uncond_kwargs={"context": model.null_context.detach()})
    torch.testing.assert_close(guided(x, t, context=context), cond, rtol=0, atol=scale_one_guidance_bound(cond, uncond))


def test_cfg_wrapper_extrapolates_from_the_null_caption():
    x, t, context, mask = inputs()
    model = randomize(TextDiT(**TINY))
    cond, uncond = doubled_forward(model, x, t, context, mask)
    guided = ClassifierFreeGuidance(model, 4.0, uncond_kwargs=model.null_condition(with_mask=True))
    out = guided(x, t, context=context, context_mask=mask)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 4:], cond[:, 4:], rtol=1e-5, atol=1e-5)  # variances from the conditional half


def test_fresh_model_learns_through_the_zeroed_cross_attention_in_the_diffusion_loss():
    from diffusion import create_diffusion
    x, t, context, mask = inputs()
    model = TextDiT(**TINY, routing="dtr").train()
    model.final_layer.linear.weight.data.normal_(std=0.02)  # one step past adaLN-Zero's all-zero output
    for block in model.blocks:
        block.adaLN_modulation[-1].weight.data.normal_(std=0.02)
    losses = create_diffusion("").training_losses(model, x, t, model_kwargs={"context": context, "context_mask": mask})
    losses["loss"].mean().backward()
    assert losses["loss"].shape == (3,) and torch.isfinite(losses["loss"]).all()
    for block in model.blocks:  # the zero-initialised projection gets a gradient, so captions start to matter
        assert block.cross_attn.proj.weight.grad.abs().sum() > 0


def test_routing_adds_no_parameters_and_no_state_dict_keys():
    base, routed = TextDiT(**TINY), TextDiT(**TINY, routing="dtr")
    assert sum(p.numel() for p in routed.parameters()) == sum(p.numel() for p in base.parameters())
    assert list(routed.state_dict()) == list(base.state_dict())


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, context, mask = inputs()
    grads = []
    for flag in (False, True):
        model = randomize(TextDiT(**TINY, routing="dtr", grad_checkpointing=flag)).train()
        model(x, t, context, mask, force_drop_ids=torch.tensor([0, 1, 0])).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_config_rebuilds_an_identical_model():
    x, t, context, mask = inputs()
    model = randomize(TextDiT(**TINY, routing="random", routing_seed=3))
    rebuilt = TextDiT(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(model(x, t, context, mask), rebuilt(x, t, context, mask))
    assert model.routing_config() == {"routing": "random", "alpha": 4.0, "beta": 0.8, "routing_seed": 3}


def test_registry_names_give_the_official_dit_shapes():
    assert [n for n in model_names() if n.startswith("TextDiT-")] == ["TextDiT-" + n[4:] for n in DiT_models]
    for name in DiT_models:
        with torch.device("meta"):
            dit = create_model(name, input_size=32)
            text = create_model("Text" + name, input_size=32, routing="dtr")
        assert isinstance(text, TextDiT) and len(text.blocks) == len(dit.blocks)
        assert text.x_embedder.proj.weight.shape == dit.x_embedder.proj.weight.shape  # width and patch
        assert text.blocks[0].attn.num_heads == dit.blocks[0].attn.num_heads
        assert text.config["routing"] == "dtr"


def test_checkpoint_config_rebuilds_a_registry_text_model():
    x, t, context, mask = inputs()
    model = randomize(create_model("TextDiT-S/2", **{**TINY, "depth": 2}, routing="random", routing_seed=3))
    rebuilt = build_from_config(model_config("TextDiT-S/2", model)).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(model(x, t, context, mask), rebuilt(x, t, context, mask))


def test_unknown_zoo_name_lists_the_zoo():
    with pytest.raises(ValueError, match="TextDiT-XL/2"):
        create_model("TextDiT-M/2")
    with pytest.raises(ValueError, match="num_classes"):  # a text model has no classes
        create_model("TextDiT-S/2", num_classes=10)


@pytest.mark.parametrize("kwargs, message", [
    (dict(routing="dtrr"), "routing"),
    (dict(beta=0.0), "beta"),
    (dict(context_dim=0), "context_dim"),
    (dict(max_text_len=1.5), "max_text_len"),
    (dict(caption_dropout_prob=1.5), "caption_dropout_prob"),
    (dict(num_heads=5), "num_heads"),
])
def test_bad_model_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextDiT(**{**TINY, **kwargs})


def test_bad_inputs_are_rejected():
    x, t, context, mask = inputs()
    model = TextDiT(**TINY, routing="dtr").eval()
    with pytest.raises(ValueError, match="context must have shape"):
        model(x, t, context[:, :4])
    with pytest.raises(ValueError, match="context must have shape"):
        model(x, t, context[:2])
    with pytest.raises(ValueError, match="context_mask must have shape"):
        model(x, t, context, mask[:, :4])
    with pytest.raises(ValueError, match="masks every token"):
        model(x, t, context, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="outside"):
        model(x, torch.tensor([0, 1, 1000]), context)
    no_null = TextDiT(**TINY, caption_dropout_prob=0.0)
    with pytest.raises(ValueError, match="caption_dropout_prob"):
        no_null(x, t, context, force_drop_ids=torch.ones(3))
    with pytest.raises(ValueError, match="caption_dropout_prob"):
        no_null.null_condition()


#################################################################################
#                   Frozen CLIP text encoder (tiny, fully offline)              #
#################################################################################

@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random 2-layer CLIP text model and a BPE tokenizer with a hand-written vocab, saved like a hub repo."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny_clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(ch + "</w>" for ch in letters), "ca", "cat</w>"]
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tokenizer = transformers.CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tokenizer.save_pretrained(path)
    config = transformers.CLIPTextConfig(vocab_size=len(tokens), hidden_size=D_TEXT, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=L,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(path)
    return path


def test_clip_encoder_returns_hidden_states_and_padding_mask(tiny_clip_dir):
    from transformers import CLIPTextModel

    from models.text_encoder import FrozenCLIPTextEncoder
    encoder = FrozenCLIPTextEncoder(str(tiny_clip_dir), max_length=L)
    hidden, mask = encoder(["a cat", "", "dog"])
    assert hidden.shape == (3, L, D_TEXT) and mask.dtype == torch.bool
    # BOS + tokens + EOS: "a cat" -> a</w> cat</w> (one merge), "" -> nothing, "dog" -> d o g</w>.
    assert mask.sum(dim=1).tolist() == [4, 2, 5]
    # Same as calling the saved CLIP text model on the tokenizer's ids directly.
    ids = encoder.tokenizer(["a cat", "", "dog"], padding="max_length", max_length=L, return_tensors="pt").input_ids
    reference = CLIPTextModel.from_pretrained(str(tiny_clip_dir)).eval()
    torch.testing.assert_close(hidden, reference(input_ids=ids).last_hidden_state)


def test_clip_encoder_is_frozen_and_stays_in_eval(tiny_clip_dir):
    from models.text_encoder import FrozenCLIPTextEncoder
    encoder = FrozenCLIPTextEncoder(str(tiny_clip_dir), max_length=L)
    encoder.train()
    assert not encoder.training and not encoder.transformer.training
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match="max_length"):
        FrozenCLIPTextEncoder(str(tiny_clip_dir), max_length=L + 1)
    with pytest.raises(ValueError, match="list of strings"):
        encoder("a cat")


def test_clip_captions_condition_the_text_dit_end_to_end(tiny_clip_dir):
    from models.text_encoder import FrozenCLIPTextEncoder
    encoder = FrozenCLIPTextEncoder(str(tiny_clip_dir), max_length=L)
    model = randomize(TextDiT(**{**TINY, "context_dim": encoder.width}, routing="dtr"))
    x, t, _, _ = inputs(n=2)
    context, mask = encoder(["a cat", "a dog"])
    x, t = x[:1].expand(2, -1, -1, -1), t[:1].expand(2)  # same noise and timestep, different captions
    out = model(x, t, context, mask)
    assert not torch.allclose(out[0], out[1])
    # each output follows its own caption: encoding the captions in the other order swaps the outputs
    swapped = model(x, t, *encoder(["a dog", "a cat"]))
    torch.testing.assert_close(swapped, out.flip(0))
