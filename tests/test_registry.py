"""Pins models/registry.py: every zoo name of every family builds, overrides replace any argument, configs rebuild."""
from functools import partial

import pytest
import torch

from models import (ADM, ADM_models, DiT, DiT_models, MODEL_FAMILIES, TextDiT_models, build_from_config, create_model,
                    model_config, model_names)
from models.registry import ModelFamily
from sampling.model_from_checkpoint import load_checkpoint

TINY_DIT = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10)
TINY_ADM = dict(input_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                num_head_channels=16, dropout=0.0)


def randomize(model, seed=0):
    """Random weights everywhere (zero-initialised output layers would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_every_zoo_name_builds_its_family_with_the_preset():
    names = model_names()
    assert len(names) == 26 and {"DiT-XL/2", "DiT-S/8", "ADM-ImageNet64", "ADM-FFHQ64", "TextDiT-B/2"} <= set(names)
    zoos = {"DiT": DiT_models, "ADM": ADM_models, "TextDiT": TextDiT_models}  # official DiT's {name: callable}
    for name in names:
        family_name, family = next((k, f) for k, f in MODEL_FAMILIES.items() if name in f.presets)
        override = {"DiT": {"num_classes": 7}, "ADM": {"input_size": 32}, "TextDiT": {"context_dim": 16}}[family_name]
        with torch.device("meta"):
            model = create_model(name)
            called = zoos[family_name][name](**override)  # keyword arguments override the preset, as in official DiT
        assert isinstance(model, family.constructor)
        assert called.config == {**model.config, **override}
        assert {k: model.config[k] for k in family.presets[name]} == {
            k: tuple(v) if isinstance(v, list) else v for k, v in family.presets[name].items()}


def test_overrides_replace_any_constructor_argument_including_preset_ones():
    dit = create_model("DiT-XL/2", **TINY_DIT, patch_size=4)  # depth, width, heads, patch: all preset values
    assert isinstance(dit, DiT) and len(dit.blocks) == 2 and dit.patch_size == 4 and dit.config["hidden_size"] == 32
    adm = create_model("ADM-ImageNet64", **TINY_ADM, num_classes=10, class_dropout_prob=0.0)
    assert isinstance(adm, ADM) and adm.config["channel_mult"] == (1, 2) and adm.label_emb.weight.shape == (10, 128)


@pytest.mark.parametrize("name, bad", [("DiT-S/2", "channel_mult"), ("ADM-FFHQ64", "hidden_size")])
def test_unknown_override_names_it_and_the_valid_arguments(name, bad):
    with pytest.raises(ValueError, match=rf"{name} \(\w+\) has no argument {bad}; valid: .*routing"):
        create_model(name, **{bad: 3})


@pytest.mark.parametrize("name", ["DiT-S/2", "TextDiT-S/2"])
@pytest.mark.parametrize("bad, message", [
    (dict(depth=0), "depth must be an integer >= 1, got 0"),
    (dict(hidden_size=32, num_heads=3), "hidden_size 32 is not divisible by num_heads 3"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio must be a finite number > 0"),
    (dict(patch_size=2.0), r"argument patch_size expects an integer, got 2.0 \(float\)"),
])
def test_overrides_that_cannot_build_a_transformer_name_the_argument(name, bad, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **bad)


@pytest.mark.parametrize("name, bad, expected", [
    ("DiT-S/2", dict(depth=1.5), "an integer, got 1.5 (float)"),
    ("DiT-S/2", dict(learn_sigma=2), "true or false, got 2 (int)"),
    ("DiT-S/2", dict(alpha="big"), "a number, got 'big' (str)"),
    ("ADM-FFHQ64", dict(channel_mult=[1.5]), "an integer or a list of integers, e.g. 8 or [32, 16, 8], got [1.5] (list)"),
    ("ADM-FFHQ64", dict(class_dropout_prob="x"), "a number or null, got 'x' (str)"),
])
def test_override_of_the_wrong_type_names_the_argument_and_what_it_expects(name, bad, expected):
    (key,) = bad
    with pytest.raises(ValueError) as error:
        create_model(name, **bad)
    assert str(error.value) == f"{name} argument {key} expects {expected}"


def test_one_integer_is_a_one_element_tuple_for_adm_lists():
    # YAML reads --model-arg attention_resolutions=8 as the int 8: the natural value for a small UNet
    with torch.device("meta"):
        model = create_model("ADM-FFHQ64", input_size=8, model_channels=32, num_res_blocks=1,
                             attention_resolutions=8, channel_mult=2)
    assert model.config["attention_resolutions"] == (8,) and model.config["channel_mult"] == (2,)


def test_unknown_name_lists_every_family():
    with pytest.raises(ValueError, match="unknown model 'ADM-FFHQ256'; expected one of DiT-XL/2.*ADM-FFHQ64"):
        create_model("ADM-FFHQ256")


@pytest.mark.parametrize("name, overrides, x_shape", [
    ("DiT-S/2", dict(TINY_DIT, routing="random", routing_seed=3), (2, 4, 8, 8)),
    ("ADM-ImageNet64", dict(TINY_ADM, num_classes=10, routing="dtr", beta=0.5), (2, 3, 8, 8)),
    ("ADM-FFHQ64", dict(TINY_ADM, routing="dtr"), (2, 3, 8, 8)),
])
def test_model_config_rebuilds_the_same_function(name, overrides, x_shape):
    model = randomize(create_model(name, **overrides))
    config = model_config(name, model)
    assert config["model"] == name and set(config) - {"model"} == set(MODEL_FAMILIES[type(model).__name__].arguments())
    rebuilt = build_from_config(config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x, t, y = torch.randn(x_shape), torch.tensor([3, 900]), torch.tensor([1, 7])
    assert torch.equal(rebuilt(x, t, y), model(x, t, y))


@pytest.mark.parametrize("name, overrides, in_channels", [
    ("DiT-B/4", dict(TINY_DIT, patch_size=2, in_channels=3, routing="dtr"), 3),
    ("ADM-ImageNet64", dict(TINY_ADM, num_classes=10, routing="dtr"), 3),
    ("ADM-FFHQ64", dict(TINY_ADM, routing="random"), 3),
])
def test_checkpoints_of_every_family_load_for_sampling_without_model_flags(tmp_path, name, overrides, in_channels):
    model = randomize(create_model(name, **overrides))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 5, "args": {},
                "model_config": model_config(name, model),
                "diffusion_config": {"noise_schedule": "squaredcos_cap_v2", "learn_sigma": True},
                "vae": "none", "image_size": 8, "latent_scale": 1.0}, path)
    loaded, settings = load_checkpoint(str(path), {})  # no --model, no routing flags
    assert type(loaded) is type(model) and settings.model_name == name and settings.vae == "none"
    assert loaded.config == model.config
    x, t, y = torch.randn(2, in_channels, 8, 8), torch.tensor([0, 999]), torch.tensor([0, 3])
    assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_legacy_custom_dit_checkpoints_still_rebuild():
    model = randomize(DiT(**TINY_DIT))
    rebuilt = build_from_config({"model": "DiT-custom", **model.config}).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.config == model.config


def test_a_new_family_is_one_row_of_the_table(monkeypatch):
    monkeypatch.setitem(MODEL_FAMILIES, "Toy", ModelFamily(DiT, {"Toy-1": partial(DiT, **TINY_DIT, patch_size=4)}))
    assert "Toy-1" in model_names()
    model = create_model("Toy-1", depth=1)
    assert len(model.blocks) == 1 and model.patch_size == 4
    assert build_from_config(model_config("Toy-1", model)).config == model.config
