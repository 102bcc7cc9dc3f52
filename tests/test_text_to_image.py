"""Text-to-image end to end (MS-COCO setting, App. C): a generated COCO folder and a tiny offline CLIP train a tiny
TextDiT through train.py, then sample.py (prompt grid) and sample_ddp.py (validation captions) sample it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import create_diffusion
import sample
import sample_ddp
import train
from float_comparison import intra_op_threads
from foundation.usage_error import UsageError
from imagedata.caption_conditioning import CaptionConditioning
from imagedata.coco import caption_uniforms, draw_captions, read_coco_captions
from sampling.model_from_checkpoint import load_checkpoint
from sampling.seeded import generate, to_uint8, validation_captions
from tiny_clip import TINY_WIDTH
from tiny_coco import write_tiny_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TEXT = os.path.join(ROOT, "configs", "tiny_text.yaml")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """train2014 (8 images) and val2014 (3 images) in COCO's layout, 10x10 pixels (center-cropped to 8x8)."""
    root = str(tmp_path_factory.mktemp("coco"))
    train_dir, train_captions = write_tiny_coco(root, "train2014", num_images=8, size=(10, 10))
    val_dir, val_captions = write_tiny_coco(root, "val2014", num_images=3, size=(10, 10), seed=1)
    return {"train": train_dir, "train_captions": train_captions, "val": val_dir, "val_captions": val_captions}


def train_text(coco, clip, results, *argv):
    return train.main(train.parse_args(["--config", TINY_TEXT, "--data-path", coco["train"], "--captions",
                                        coco["train_captions"], "--text-encoder", clip, "--results-dir", str(results),
                                        *map(str, argv)]))


@pytest.fixture(scope="module")
def trained(coco, tiny_clip_path, tmp_path_factory):
    """Four steps of the tiny text model (checkpoints at steps 2 and 4)."""
    return train_text(coco, tiny_clip_path, tmp_path_factory.mktemp("runs"))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


#################################################################################
#                                    Training                                   #
#################################################################################

def test_training_records_the_text_encoder_and_learns_through_cross_attention(trained, coco, tiny_clip_path):
    ckpt = load(f"{trained}/checkpoints/0000004.pt")
    assert ckpt["text_encoder"] == tiny_clip_path and ckpt["captions"] == os.path.abspath(coco["train_captions"])
    config = ckpt["model_config"]
    assert config["model"] == "TextDiT-S/2" and config["routing"] == "dtr" and config["hidden_size"] == 32
    assert (config["context_dim"], config["max_text_len"], config["caption_dropout_prob"]) == (TINY_WIDTH, 77, 0.1)
    # the cross-attention output projections start at zero; after training they are not: captions reach the loss
    assert all(ckpt["model"][f"blocks.{i}.cross_attn.proj.weight"].abs().sum() > 0 for i in range(2))
    losses = [json.loads(line)["loss"] for line in open(f"{trained}/metrics.jsonl")]
    assert len(losses) == 4 and np.isfinite(losses).all()
    model, settings = load_checkpoint(f"{trained}/checkpoints/0000004.pt")  # the sampler rebuilds it from the file
    assert type(model).__name__ == "TextDiT" and settings.text_encoder == tiny_clip_path
    assert torch.equal(model.null_context, ckpt["ema"]["null_context"])


def test_resume_mid_run_matches_uninterrupted_bitwise(trained, coco, tiny_clip_path, tmp_path):
    first = train_text(coco, tiny_clip_path, tmp_path, "--max-steps", 2)
    resumed = train_text(coco, tiny_clip_path, tmp_path, "--resume", f"{first}/checkpoints/0000002.pt")
    a, b = load(f"{resumed}/checkpoints/0000004.pt"), load(f"{trained}/checkpoints/0000004.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key


def test_rank_slices_of_a_step_get_the_captions_of_the_global_batch(coco, tiny_clip_path):
    """World-size invariance of the caption draw: rank r of 2 conditions exactly as rows r, r + 2, ... of 1 rank."""
    text = CaptionConditioning.load(tiny_clip_path, coco["train_captions"])
    ids = torch.tensor(read_coco_captions(coco["train_captions"]).image_ids[:4])  # a global batch of 4 images
    drop = torch.tensor([0, 1, 0, 0])
    whole = text.training_kwargs(ids, 5, 11, 4, rank=0, world_size=1, drop_ids=drop)
    # the captions are the seeded draw of the annotation file (encoded by the same CLIP model)
    captions = draw_captions(text.coco, ids.tolist(), caption_uniforms(5, 11, 4))
    assert torch.equal(whole["context"], text.encoder(captions)[0])
    for rank in range(2):
        part = text.training_kwargs(ids[rank::2], 5, 11, 4, rank=rank, world_size=2, drop_ids=drop[rank::2])
        for key in ("context_mask", "force_drop_ids"):
            assert torch.equal(part[key], whole[key][rank::2]), key
        # a rank encodes its 2 captions, not 4: bitwise against the whole batch's captions r, r + 2 encoded
        # as the same batch of 2 (CLIP in fp32 rounds differently per batch size and CPU)
        assert torch.equal(part["context"], text.encoder(captions[rank::2])[0])


def test_two_gloo_ranks_match_one_rank_for_the_text_model(coco, tiny_clip_path, tmp_path):
    """Captions, caption drops, t and noise are drawn for the global batch: 2 ranks x 2 train like 1 rank x 4."""
    common = ["--config", TINY_TEXT, "--data-path", coco["train"], "--captions", coco["train_captions"],
              "--text-encoder", tiny_clip_path, "--max-steps", 2, "--ckpt-every", 100]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "train.py"), *map(str, common), "--results-dir", str(tmp_path / "ddp")],
                   check=True, env=env, cwd=ROOT, timeout=300)
    with intra_op_threads(1):  # the ranks' thread count, so only the batch split differs
        single = train.main(train.parse_args([*map(str, common), "--results-dir", str(tmp_path / "one")]))
    a = load(f"{tmp_path}/ddp/000-TextDiT-S-2/checkpoints/0000002.pt")
    b = load(f"{single}/checkpoints/0000002.pt")
    # fp32 rounding of the split forward and the all-reduce only (see test_train's DDP test for the 1e-6 bound);
    # a rank conditioning on other captions than the global batch's would move weights by ~lr = 1e-4
    for key in ("model", "ema"):
        for name in b[key]:
            torch.testing.assert_close(a[key][name], b[key][name], atol=1e-6, rtol=0, msg=name)


def test_trains_on_coco_latents_written_by_extract_features(coco, tiny_clip_path, tmp_path):
    import extract_features
    from diffusers import AutoencoderKL
    from test_extract_features import run_args
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    extract_features.main(run_args(coco["train"], tmp_path / "feat", str(tmp_path / "vae"), data_kind="coco",
                                   captions=None))
    exp = train.main(train.parse_args(["--config", TINY_TEXT, "--feature-path", str(tmp_path / "feat"), "--vae", "ema",
                                       "--image-size", "16", "--captions", coco["train_captions"], "--text-encoder",
                                       tiny_clip_path, "--results-dir", str(tmp_path / "r"), "--max-steps", "2"]))
    ckpt = load(f"{exp}/checkpoints/0000002.pt")
    assert ckpt["model_config"]["input_size"] == 8 and ckpt["vae"] == str(tmp_path / "vae")
    assert ckpt["text_encoder"] == tiny_clip_path
    # class latents (labels are classes, not COCO image ids) cannot condition a text model
    classes = tmp_path / "classes"
    for name in ("a", "b"):
        os.makedirs(classes / name)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(classes / name / f"{i}.png")
    extract_features.main(run_args(classes, tmp_path / "class_feat", str(tmp_path / "vae")))
    with pytest.raises(UsageError, match="not an MS-COCO dataset keyed by image id"):
        train.main(train.parse_args(["--config", TINY_TEXT, "--feature-path", str(tmp_path / "class_feat"),
                                     "--vae", "ema", "--image-size", "16", "--captions", coco["train_captions"],
                                     "--text-encoder", tiny_clip_path, "--results-dir", str(tmp_path / "r2")]))


def test_text_training_errors_are_clear_and_early(coco, tiny_clip_path, tmp_path):
    args = train.parse_args(["--config", TINY_TEXT, "--data-path", coco["train"], "--results-dir", str(tmp_path)])
    args.captions = None  # as if no config or flag gave it
    with pytest.raises(UsageError, match="TextDiT-S/2 is a text-to-image model: give --captions"):
        train.main(args)
    with pytest.raises(UsageError, match="--captions is for text-to-image models"):
        train.validate_args(train.parse_args(["--config", os.path.join(ROOT, "configs", "tiny_pixel.yaml"),
                                              "--captions", coco["train_captions"]]))
    with pytest.raises(UsageError, match="--text-encoder openai/clip-vit-base-patch32: .* hub cache"):
        train_text(coco, "openai/clip-vit-base-patch32", tmp_path)
    with pytest.raises(UsageError, match="listed in .*captions_val2014.json are not in .*train2014"):
        train.main(train.parse_args(["--config", TINY_TEXT, "--data-path", coco["train"], "--captions",
                                     coco["val_captions"], "--text-encoder", tiny_clip_path,
                                     "--results-dir", str(tmp_path)]))
    assert not os.listdir(tmp_path)  # nothing written by any of them


#################################################################################
#                                    Sampling                                   #
#################################################################################

def test_prompt_grid_holds_the_samples_of_the_prompts_with_captions_under_them(trained, tmp_path):
    ckpt = f"{trained}/checkpoints/0000004.pt"
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("two dogs\n\n")
    out = str(tmp_path / "grid.png")
    args = sample.build_parser().parse_args(["--ckpt", ckpt, "--prompt", "a red bus", "--prompts-file",
                                             str(prompts_file), "--samples-per-prompt", "2",
                                             "--num-sampling-steps", "3", "--seed", "4", "--out", out])
    sample.main(args)
    grid = np.array(Image.open(out))
    # independently: the same captions encoded and sampled with the same seeds and CFG 4
    model, settings = load_checkpoint(ckpt)
    text = CaptionConditioning.load(settings.text_encoder)
    captions = ["a red bus", "a red bus", "two dogs", "two dogs"]
    samples = generate(model, create_diffusion(**{**settings.diffusion_config, "timestep_respacing": "3"}), "ddpm",
                       [0, 1, 2, 3], text.encode(captions), 4, cfg_scale=4.0, clip_denoised=True)
    images = to_uint8(samples)  # (4, 8, 8, 3)
    rows = 2
    cell_height = (grid.shape[0] - 2) // rows  # image + caption strip + padding
    assert grid.shape[1] == 2 + 2 * (8 + 2) and cell_height > 8 + 2  # two per row, with room for the caption
    for i, image in enumerate(images):
        top, left = 2 + (i // 2) * cell_height, 2 + (i % 2) * 10
        np.testing.assert_array_equal(grid[top:top + 8, left:left + 8], image)
        strip = grid[top + 8:top + cell_height - 2, left:left + 8]
        assert (strip < 128).any()  # ink of the caption under the image
    assert not np.array_equal(images[0], images[2])  # different prompts, different images


def test_sample_ddp_draws_validation_captions_and_records_them_beside_the_npz(trained, coco, tmp_path):
    ckpt = f"{trained}/checkpoints/0000004.pt"

    def run(sample_dir, *flags):
        argv = ["--ckpt", ckpt, "--captions", coco["val_captions"], "--sample-dir", str(sample_dir),
                "--num-fid-samples", "5", "--shard-size", "2", "--per-proc-batch-size", "2",
                "--num-sampling-steps", "3", "--global-seed", "3", *flags]
        sample_ddp.main(sample_ddp.build_parser().parse_args(argv))

    run(tmp_path / "a")
    (npz,) = [f for f in os.listdir(tmp_path / "a") if f.endswith(".npz")]
    with np.load(tmp_path / "a" / npz) as f:
        arr_0, arr_1 = f["arr_0"], f["arr_1"]
    with open(tmp_path / "a" / npz.replace(".npz", ".captions.json")) as f:
        listing = json.load(f)
    coco_val = read_coco_captions(coco["val_captions"])
    expected = validation_captions(range(5), coco_val, 3)
    assert listing == expected and arr_1.tolist() == [p["image_id"] for p in expected]
    assert all(p["caption"] in coco_val.captions[p["image_id"]] for p in listing)
    assert arr_0.shape == (5, 8, 8, 3) and arr_0.dtype == np.uint8
    # sample 4 is the caption's image from the CFG 1.5 sampler; bitwise because it is alone in its batch
    # [4, 5) of sample_ddp's grid, as here (fp32 rounding changes with the batch composition)
    model, settings = load_checkpoint(ckpt)
    text = CaptionConditioning.load(settings.text_encoder)
    alone = generate(model, create_diffusion(**{**settings.diffusion_config, "timestep_respacing": "3"}), "ddpm",
                     [4], text.encode([expected[4]["caption"]]), 3, cfg_scale=1.5, clip_denoised=True)
    np.testing.assert_array_equal(to_uint8(alone)[0], arr_0[4])
    # resumable: a stop after one shard, then the same command, gives the byte-identical files
    run(tmp_path / "b", "--max-shards", "1")
    run(tmp_path / "b")
    for name in (npz, npz.replace(".npz", ".captions.json")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_sampling_errors_name_the_missing_input(trained, tmp_path):
    ckpt = f"{trained}/checkpoints/0000004.pt"
    with pytest.raises(UsageError, match="--prompt"):
        sample.main(sample.build_parser().parse_args(["--ckpt", ckpt, "--out", str(tmp_path / "x.png")]))
    with pytest.raises(UsageError, match="--captions"):
        sample_ddp.main(sample_ddp.build_parser().parse_args(["--ckpt", ckpt, "--sample-dir", str(tmp_path)]))
    with pytest.raises(UsageError, match="--text-encoder /nonexistent/clip"):
        sample.main(sample.build_parser().parse_args(["--ckpt", ckpt, "--prompt", "a cat", "--text-encoder",
                                                      "/nonexistent/clip", "--out", str(tmp_path / "x.png")]))
    assert not os.path.exists(tmp_path / "x.png")
