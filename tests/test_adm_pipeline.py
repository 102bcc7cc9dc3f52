"""ADM through the whole pipeline: train.py (pixel space, CFG label dropout), sample.py / sample_ddp.py, the
guided-diffusion state_dict layout loaded strictly, every routing kind (Table 1, pixel level 64x64)."""
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from models import ROUTING_KINDS, create_model
from models.adm import AttentionBlock, ResBlock
from models.routing import build_masks
import sample
import sample_ddp
from sampling.model_from_checkpoint import load_checkpoint
import train

TINY_ADM = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4],
                num_head_channels=16, dropout=0.0)


def write_images(root, folders, per_folder, seed=0):
    """Random 12x10 RGB images (center-cropped to 8x8 by the dataset) in the given subfolders."""
    rng = np.random.default_rng(seed)
    for folder in folders:
        os.makedirs(root / folder)
        for i in range(per_folder):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / folder / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("imagenet"), ["n01", "n02"], 8)


@pytest.fixture(scope="module")
def ffhq_tree(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("ffhq"), ["00000", "01000"], 4)  # FFHQ's nested layout


def tiny_config(tmp_path, model, num_classes, **extra):
    """A tiny ADM run: the zoo entry with model_args overrides, 8x8 pixels, DTR, 3 steps of batch 4."""
    config = {"model": model, "model_args": TINY_ADM, "image-size": 8, "num-classes": num_classes, "vae": "none",
              "global-batch-size": 4, "max-steps": 3, "log-every": 1, "ckpt-every": 3, "num-workers": 0,
              "routing": "dtr", "beta": 0.5, "results-dir": str(tmp_path / "results"), **extra}
    path = tmp_path / "tiny_adm.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def sample_npz(ckpt, sample_dir, *flags):
    """sample_ddp.main on 4 samples, 3 DDPM steps; returns (arr_0, arr_1, the run's config.json)."""
    argv = ["--ckpt", ckpt, "--sample-dir", str(sample_dir), "--num-fid-samples", "4", "--per-proc-batch-size", "2",
            "--num-sampling-steps", "3", *flags]
    sample_ddp.main(sample_ddp.build_parser().parse_args(argv))
    (npz,) = [f for f in os.listdir(sample_dir) if f.endswith(".npz")]
    (shards,) = [f for f in os.listdir(sample_dir) if f.endswith(".shards")]
    with np.load(os.path.join(sample_dir, npz)) as f, open(os.path.join(sample_dir, shards, "config.json")) as c:
        return f["arr_0"], f["arr_1"], json.load(c)


#################################################################################
#                      train.py -> sample_ddp.py / sample.py                    #
#################################################################################

def test_class_conditional_adm_with_dtr_trains_and_samples_with_cfg(tmp_path, class_folders):
    # lr 1e-2: three steps move the zero-initialised output convs enough for the label to show in samples
    exp = train.main(train.parse_args(["--config", tiny_config(tmp_path, "ADM-ImageNet64", 10),
                                       "--data-path", class_folders, "--lr", "1e-2"]))
    assert os.path.basename(exp) == "000-ADM-ImageNet64"
    ckpt_path = f"{exp}/checkpoints/0000003.pt"
    ckpt = load(ckpt_path)
    config = ckpt["model_config"]
    assert config["model"] == "ADM-ImageNet64" and config["model_channels"] == 32 and config["channel_mult"] == (1, 2)
    assert (config["routing"], config["beta"], config["input_size"], config["in_channels"]) == ("dtr", 0.5, 8, 3)
    assert config["class_dropout_prob"] == 0.1 and ckpt["model"]["label_emb.weight"].shape == (11, 128)  # null row
    assert ckpt["vae"] == "none" and ckpt["image_size"] == 8
    losses = [json.loads(line)["loss"] for line in open(f"{exp}/metrics.jsonl")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])  # it trained

    # sample_ddp.py: no model flags; conditional, so CFG 1.5 by default (the paper's FID setting). The raw
    # weights: the EMA of three steps is still the initialisation, whose output is zero for every label.
    guided, labels, run = sample_npz(ckpt_path, tmp_path / "cfg", "--use-model-weights")
    assert run["cfg_scale"] == 1.5 and run["model"] == "ADM-ImageNet64"
    assert guided.shape == (4, 8, 8, 3) and guided.dtype == np.uint8 and labels.min() >= 0 and labels.max() < 10
    unguided, labels_1, _ = sample_npz(ckpt_path, tmp_path / "nocfg", "--use-model-weights", "--cfg-scale", "1")
    assert np.array_equal(labels, labels_1) and not np.array_equal(guided, unguided)  # the null class acts

    # sample.py: a grid PNG from the same checkpoint, one 8x8 tile per label, no model flags either
    out = tmp_path / "grid.png"
    sample.main(sample.build_parser().parse_args(["--ckpt", ckpt_path, "--out", str(out), "--num-sampling-steps", "3",
                                                  "--class-labels", "0", "1", "--samples-per-class", "2"]))
    assert np.asarray(Image.open(out)).shape == (2 + 2 * 10, 2 + 2 * 10, 3)  # 2 x 2 tiles, padding 2


def test_unconditional_adm_trains_on_a_flat_ffhq_tree_and_samples_without_guidance(tmp_path, ffhq_tree):
    args = train.parse_args(["--config", tiny_config(tmp_path, "ADM-FFHQ64", 1), "--data-path", ffhq_tree,
                             "--data-kind", "flat", "--max-steps", "2", "--ckpt-every", "2"])
    exp = train.main(args)
    ckpt = load(f"{exp}/checkpoints/0000002.pt")
    assert ckpt["model_config"]["num_classes"] == 1 and ckpt["model_config"]["class_dropout_prob"] == 0.0
    assert not any(k.startswith("label_emb") for k in ckpt["model"])
    assert ckpt["dataset"]["num_samples"] == 8  # both subfolders, read as one unconditional set
    images, labels, run = sample_npz(f"{exp}/checkpoints/0000002.pt", tmp_path / "s")
    assert run["cfg_scale"] == 1.0 and images.shape == (4, 8, 8, 3) and not labels.any()
    with pytest.raises(ValueError, match="2 classes but --num-classes is 1"):  # the same tree read as class folders
        train.main(train.parse_args(["--config", tiny_config(tmp_path, "ADM-FFHQ64", 1), "--data-path", ffhq_tree]))


#################################################################################
#                       guided-diffusion's state_dict layout                    #
#################################################################################

def guided_diffusion_layout(model_channels, channel_mult, num_res_blocks, attention_resolutions, image_size,
                            num_classes, in_channels=3, learn_sigma=True):
    """{key: shape} of guided-diffusion's UNetModel (resblock_updown, scale-shift norm), from its naming rules."""
    C, E = model_channels, 4 * model_channels
    layout = {"time_embed.0.weight": (E, C), "time_embed.0.bias": (E,), "time_embed.2.weight": (E, E),
              "time_embed.2.bias": (E,)}
    if num_classes is not None:
        layout["label_emb.weight"] = (num_classes, E)

    def norm(prefix, ch):
        layout.update({f"{prefix}.weight": (ch,), f"{prefix}.bias": (ch,)})

    def conv(prefix, out, inp, k):
        layout.update({f"{prefix}.weight": (out, inp, *[k] * (2 if k == 3 or prefix.endswith("skip_connection") else 1)),
                       f"{prefix}.bias": (out,)})

    def res(prefix, ch, out):
        norm(f"{prefix}.in_layers.0", ch)
        conv(f"{prefix}.in_layers.2", out, ch, 3)
        layout.update({f"{prefix}.emb_layers.1.weight": (2 * out, E), f"{prefix}.emb_layers.1.bias": (2 * out,)})
        norm(f"{prefix}.out_layers.0", out)
        conv(f"{prefix}.out_layers.3", out, out, 3)
        if out != ch:
            conv(f"{prefix}.skip_connection", out, ch, 1)

    def attn(prefix, ch):
        norm(f"{prefix}.norm", ch)
        conv(f"{prefix}.qkv", 3 * ch, ch, 1)
        conv(f"{prefix}.proj_out", ch, ch, 1)

    attention_ds = {image_size // r for r in attention_resolutions}
    ch, ds, skips, block = C * channel_mult[0], 1, [], 1
    conv("input_blocks.0.0", ch, in_channels, 3)
    skips.append(ch)
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            res(f"input_blocks.{block}.0", ch, mult * C)
            ch = mult * C
            if ds in attention_ds:
                attn(f"input_blocks.{block}.1", ch)
            skips.append(ch)
            block += 1
        if level != len(channel_mult) - 1:
            res(f"input_blocks.{block}.0", ch, ch)  # the down-sampling ResBlock
            skips.append(ch)
            block, ds = block + 1, ds * 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    block = 0
    for level, mult in list(enumerate(channel_mult))[::-1]:
        for i in range(num_res_blocks + 1):
            res(f"output_blocks.{block}.0", ch + skips.pop(), mult * C)
            ch, layer = mult * C, 1
            if ds in attention_ds:
                attn(f"output_blocks.{block}.1", ch)
                layer += 1
            if level and i == num_res_blocks:
                res(f"output_blocks.{block}.{layer}", ch, ch)  # the up-sampling ResBlock
                ds //= 2
            block += 1
    norm("out.0", ch)
    conv("out.2", 2 * in_channels if learn_sigma else in_channels, ch, 3)
    return layout


def test_released_imagenet64_layout_is_the_registry_model_without_label_dropout():
    # guided-diffusion's 64x64 ImageNet model: 192 channels, mult (1, 2, 3, 4), 3 res blocks, attention 32, 16, 8
    expected = guided_diffusion_layout(192, (1, 2, 3, 4), 3, (32, 16, 8), 64, 1000)
    with torch.device("meta"):
        released = create_model("ADM-ImageNet64", class_dropout_prob=0)
        with_cfg = create_model("ADM-ImageNet64")
    assert {k: tuple(v.shape) for k, v in released.state_dict().items()} == expected
    assert sum(np.prod(s) for s in expected.values()) == sum(p.numel() for p in released.parameters())
    assert tuple(with_cfg.state_dict()["label_emb.weight"].shape) == (1001, 768)  # + the null class row


def test_guided_diffusion_state_dict_loads_strictly_in_sample_ddp_with_model_flag(tmp_path):
    layout = guided_diffusion_layout(32, (1, 2), 1, (4,), 8, 10)
    g = torch.Generator().manual_seed(0)
    state_dict = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in layout.items()}
    path = str(tmp_path / "64x64_diffusion.pt")
    torch.save(state_dict, path)
    flags = {"model": "ADM-ImageNet64", "image_size": 8, "num_classes": 10, "model_args": TINY_ADM}
    model, settings = load_checkpoint(path, flags)  # strict load inside
    assert model.config["class_dropout_prob"] == 0.0 and settings.vae == "none"
    assert settings.diffusion_config["noise_schedule"] == "squaredcos_cap_v2"  # as guided-diffusion trained it
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_dict.items())
    argv = ["--model", "ADM-ImageNet64", "--image-size", "8", "--num-classes", "10",
            *[f"--model-arg={k}={json.dumps(v)}" for k, v in TINY_ADM.items()]]
    images, _, run = sample_npz(path, tmp_path / "s", *argv)
    assert run["cfg_scale"] == 1.0 and images.shape == (4, 8, 8, 3)  # no null class: no guidance by default
    with pytest.raises(ValueError, match="no null class"):
        sample_npz(path, tmp_path / "s2", *argv, "--cfg-scale", "1.5")


#################################################################################
#                                Routing kinds                                  #
#################################################################################

@pytest.mark.parametrize("kind", ROUTING_KINDS)
def test_every_routing_kind_gives_each_adm_block_its_kinds_table_at_the_blocks_width(kind):
    torch.manual_seed(0)
    vanilla = create_model("ADM-FFHQ64", **TINY_ADM, input_size=8).eval()
    routed = create_model("ADM-FFHQ64", **TINY_ADM, input_size=8, routing=kind, beta=0.5, routing_seed=3).eval()
    routed.load_state_dict(vanilla.state_dict(), strict=True)  # routing adds no parameters or keys
    blocks = [m for m in routed.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    assert len(blocks) == 14  # 10 ResBlocks, 4 attention blocks (tests/test_adm.py lists them)
    for index, block in enumerate(blocks):  # R-TR: block i draws with seed + i, in build order
        if kind == "none":
            assert block.routing is None
            continue
        seed = 3 + index if kind == "random" else 3
        assert torch.equal(block.routing.masks.float(), build_masks(kind, 1000, block.channels, 4.0, 0.5, seed))
    with torch.no_grad():
        for p in vanilla.parameters():
            p.normal_(0, 0.1)
    routed.load_state_dict(vanilla.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 990])
    with torch.no_grad():
        out, reference = routed(x, t), vanilla(x, t)
    assert torch.isfinite(out).all()
    assert torch.equal(out, reference) == (kind == "none")  # masks change the function, except no routing
