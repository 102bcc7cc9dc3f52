"""Pins imagedata/coco.py: COCO caption files, the COCO image dataset, per-step caption draws, COCO latents."""
import json
import os

import pytest
import torch
from PIL import Image

from imagedata import build_dataset, read_manifest
from imagedata.center_crop import center_crop_arr, to_model_range
from imagedata.coco import (LABEL_KIND, caption_uniforms, check_captions_cover, coco_image_dataset,
                            default_annotation_path, draw_captions, read_coco_captions)
from tiny_coco import write_tiny_coco


def test_captions_are_grouped_per_image_in_annotation_id_order(tmp_path):
    image_dir, path = write_tiny_coco(str(tmp_path), num_images=5, captions_per_image=(5, 4, 6))
    with open(path) as f:
        raw = json.load(f)
    coco = read_coco_captions(path)
    assert coco.image_ids == sorted(im["id"] for im in raw["images"])
    assert coco.num_captions == len(raw["annotations"]) == 5 + 4 + 6 + 5 + 4
    for image_id in coco.image_ids:  # the file lists annotations shuffled; we order them by annotation id
        by_hand = [a["caption"].strip() for a in sorted(raw["annotations"], key=lambda a: a["id"])
                   if a["image_id"] == image_id]
        assert coco.captions[image_id] == by_hand
    assert default_annotation_path(image_dir + "/") == path


def test_images_without_captions_are_left_out(tmp_path):
    _, path = write_tiny_coco(str(tmp_path), num_images=3)
    with open(path) as f:
        raw = json.load(f)
    raw["images"].append({"id": 999_999, "file_name": "uncaptioned.jpg"})
    with open(path, "w") as f:
        json.dump(raw, f)
    assert 999_999 not in read_coco_captions(path).image_ids


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "corrupt"),
    ({"images": []}, "needs 'images' and 'annotations'"),
    ({"images": [{"id": 1}], "annotations": []}, "malformed"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 5, "image_id": 2, "caption": "x"}]},
     "refers to image 2"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}, "no captions"),
])
def test_bad_annotation_files_fail_with_one_clear_error(tmp_path, content, message):
    path = tmp_path / "captions_x.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_coco_captions(str(path))


def test_coco_dataset_yields_center_cropped_images_labelled_by_image_id(tmp_path):
    image_dir, path = write_tiny_coco(str(tmp_path), num_images=4)
    coco = read_coco_captions(path)
    ds = coco_image_dataset(image_dir, image_size=8, flip=False)  # annotations found by the standard layout
    assert len(ds) == 4 and ds.label_kind == LABEL_KIND and ds.label_array().tolist() == coco.image_ids
    for i, image_id in enumerate(coco.image_ids):
        x, y = ds[i]
        with Image.open(os.path.join(image_dir, coco.file_names[image_id])) as im:
            expected = to_model_range(center_crop_arr(im.convert("RGB"), 8))
        assert int(y) == image_id and torch.equal(x, expected)
    same = build_dataset(data_path=image_dir, captions=path, image_size=8, flip=False)  # auto: captions -> coco
    assert same.label_array().tolist() == coco.image_ids


def test_coco_dataset_names_a_missing_image(tmp_path):
    image_dir, path = write_tiny_coco(str(tmp_path), num_images=3)
    gone = sorted(os.listdir(image_dir))[1]
    os.remove(os.path.join(image_dir, gone))
    with pytest.raises(FileNotFoundError, match=gone):
        build_dataset(data_path=image_dir, kind="coco", image_size=8)


def test_caption_draws_depend_on_seed_and_step_only_and_split_over_ranks_like_the_batch():
    u = caption_uniforms(3, 17, 8)
    assert u.shape == (8,) and torch.equal(u, caption_uniforms(3, 17, 8))
    assert not torch.equal(u, caption_uniforms(3, 18, 8)) and not torch.equal(u, caption_uniforms(4, 17, 8))
    # drawn for the whole global batch, so a rank's share u[r::W] does not depend on the rank's other samples
    assert torch.equal(caption_uniforms(3, 17, 16)[:8], u)


def test_draw_picks_caption_floor_u_times_n_and_reaches_all_captions_uniformly(tmp_path):
    _, path = write_tiny_coco(str(tmp_path), num_images=3, captions_per_image=(5, 4, 6))
    coco = read_coco_captions(path)
    ids = coco.image_ids
    u = torch.tensor([0.0, 0.999999, 0.5], dtype=torch.float64)
    picked = draw_captions(coco, ids, u)
    assert picked == [coco.captions[ids[0]][0], coco.captions[ids[1]][-1],
                      coco.captions[ids[2]][len(coco.captions[ids[2]]) // 2]]
    counts = {}
    steps = 3000
    for step in range(steps):
        (caption,) = draw_captions(coco, [ids[2]], caption_uniforms(0, step, 1))
        counts[caption] = counts.get(caption, 0) + 1
    n = len(coco.captions[ids[2]])
    assert len(counts) == n
    expected = steps / n  # each count is Binomial(3000, 1/n): 5 standard deviations is a loose bound
    assert all(abs(c - expected) < 5 * (steps * (1 / n) * (1 - 1 / n)) ** 0.5 for c in counts.values())
    with pytest.raises(KeyError, match="12345"):
        draw_captions(coco, [12345], u[:1])


def test_captions_must_cover_every_training_image(tmp_path):
    _, path = write_tiny_coco(str(tmp_path), num_images=3)
    coco = read_coco_captions(path)
    check_captions_cover(coco, coco.image_ids, "the latents")
    with pytest.raises(ValueError, match="first image id 424242"):
        check_captions_cover(coco, coco.image_ids + [424242], "the latents")


def test_extract_features_keys_coco_latents_by_image_id(tmp_path):
    import extract_features
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=16)
    vae.save_pretrained(str(tmp_path / "vae"))
    image_dir, path = write_tiny_coco(str(tmp_path / "coco"), num_images=5)
    from test_extract_features import run_args
    extract_features.main(run_args(image_dir, tmp_path / "feat", str(tmp_path / "vae"), data_kind="coco", captions=None,
                                   batch_size=2, shard_size=3, latent_stat="mean"))
    manifest = read_manifest(str(tmp_path / "feat"))
    assert manifest["label_kind"] == LABEL_KIND
    latents = build_dataset(feature_path=str(tmp_path / "feat"), flip=False)
    coco = read_coco_captions(path)
    assert latents.label_kind == LABEL_KIND and latents.label_array().tolist() == coco.image_ids
    images = coco_image_dataset(image_dir, image_size=16, flip=False)
    with torch.no_grad():  # latent i is the VAE posterior mean of image i (image ids agree)
        x = torch.stack([images[i][0] for i in range(len(images))])
        expected = vae.eval().encode(x).latent_dist.mean * 0.18215
    got = torch.stack([latents[i][0] for i in range(len(latents))])
    # batch of 5 here, extract_features' batches of 2 with flips there: fp32 rounding of this VAE is <= 2e-7 at
    # |latent| <= 0.22 (gap to a float64 encode), far inside atol=1e-5 (see test_extract_features)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
