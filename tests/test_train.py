"""train.py end to end on a tiny DiT (hidden 32, depth 2, 8x8 inputs): checkpoints, exact resume, DDP, errors."""
import argparse
import glob
import json
import io
import os
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train
import training.step
from training.step import step_generator
from command_line import ranks_exited_with, run_cli
from float_comparison import intra_op_threads
from foundation.usage_error import UsageError
from launch.cli import run_command
from models import ROUTING_KINDS, build_from_config, model_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_pixel.yaml")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """24 random 10x10 RGB images in two class folders (center-cropped to 8x8 by the dataset)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


def run(*argv):
    """train.main in this process; returns the experiment folder."""
    return train.main(train.parse_args(["--config", TINY, *map(str, argv)]))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def ckpts(exp):
    return sorted(os.listdir(f"{exp}/checkpoints"))  # hidden temp files included


def assert_same_tensors(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


#################################################################################
#                                    Configs                                    #
#################################################################################

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_parses_and_names_a_valid_model(path):
    args = train.parse_args(["--config", path])
    train.validate_args(args)
    assert args.model in model_names() and args.routing in ROUTING_KINDS
    assert args.alpha > 0 and 0 < args.beta <= 1
    name = os.path.basename(path)
    if os.path.basename(os.path.dirname(path)).startswith(("table", "figure")):  # paper configs: the file
        # name says the routing: ..._dtr..., ..._rtr..., ..._vanilla
        expected = "dtr" if "_dtr" in name else "random" if "_rtr" in name else "none"
        assert args.routing == expected and ("_vanilla" in name) == (expected == "none"), name
    with torch.device("meta"):  # the real constructor validates routing against the width, without weights
        input_size = args.image_size if args.vae == "none" else args.image_size // 8
        text = {"context_dim": 768, "max_text_len": 77} if train.is_text_model(args.model) else None  # CLIP-L/14
        model = train.build_model(args, input_size, 4, args.num_classes, text)
    assert model.config["routing"] == args.routing and model.config["beta"] == args.beta


def test_paper_configs_match_the_paper_settings():
    table1 = {os.path.basename(p): train.parse_args(["--config", p]) for p in CONFIGS if "/table1/" in p}
    assert len(table1) == 15
    for name, args in table1.items():
        assert (args.lr, args.ema_decay, args.global_batch_size, args.noise_schedule) == (1e-4, 0.9999, 256, "squaredcos_cap_v2")
        assert args.beta == 0.8 and args.alpha == 4.0, name
        if name.startswith("coco"):  # text-to-image; the DiT size is our inference (README)
            assert (args.model, args.max_steps, args.text_encoder) == ("TextDiT-B/2", 400_000,
                                                                        "openai/clip-vit-large-patch14"), name
            assert args.captions.endswith("captions_train2014.json"), name
            continue
        steps, classes = (100_000, 1) if name.startswith("ffhq") else (400_000, 1000)
        model = {"ffhq256": "DiT-B/2", "imagenet256": "DiT-L/2", "ffhq64_": "ADM-FFHQ64", "imagenet64": "ADM-ImageNet64"}
        assert args.model == next(m for prefix, m in model.items() if name.startswith(prefix)), name
        assert (args.max_steps, args.num_classes) == (steps, classes), name
        if args.model.startswith("ADM"):  # pixel space at 64x64; FFHQ's nested folders read flat
            assert (args.vae, args.image_size, args.data_kind) == ("none", 64, "flat" if classes == 1 else "imagefolder")
    # the paper's FIDs (Table 1) in the headers
    paper_fid = {"ffhq64_adm_vanilla": 3.12, "ffhq64_adm_rtr": 3.33, "ffhq64_adm_dtr": 2.65,
                 "imagenet64_adm_vanilla": 6.34, "imagenet64_adm_rtr": 7.34, "imagenet64_adm_dtr": 4.91,
                 "coco256_dit_b2_vanilla": 7.70, "coco256_dit_b2_rtr": 10.49, "coco256_dit_b2_dtr": 7.04}
    for stem, fid in paper_fid.items():
        header = open(os.path.join(ROOT, "configs", "table1", f"{stem}.yaml")).read().split("\n")[:3]
        assert f"Paper FID-50K: {fid}" in " ".join(header), stem
    t3 = train.parse_args(["--config", os.path.join(ROOT, "configs/table3/imagenet256_dit_l2_dtr_ant_uw_2m.yaml")])
    assert (t3.model, t3.routing, t3.loss_weighting, t3.max_steps) == ("DiT-L/2", "dtr", "ant-uw", 2_000_000)


def test_model_args_in_a_config_round_trip_and_an_empty_mapping_means_none(tmp_path):
    config = tmp_path / "adm.yaml"
    config.write_text("model: ADM-FFHQ64\nmodel_args: {model_channels: 64, channel_mult: [1, 2, 2], "
                      "attention_resolutions: '32,16'}\n")
    args = train.parse_args(["--config", str(config), "--model-arg", "num_res_blocks=2"])
    assert train.model_overrides(args) == {"model_channels": 64, "channel_mult": [1, 2, 2],
                                           "attention_resolutions": "32,16", "num_res_blocks": 2}
    with torch.device("meta"):
        model = train.build_model(args, 64, 3, 1)
    assert (model.config["channel_mult"], model.config["attention_resolutions"]) == ((1, 2, 2), (32, 16))
    empty = tmp_path / "empty.yaml"
    empty.write_text("model: DiT-S/2\nmodel-args: null\n")  # what a run record of a run without overrides holds
    assert train.model_overrides(train.parse_args(["--config", str(empty)])) == {}


def test_config_unknown_key_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: DiT-S/2\nlearning-rate: 0.1\nalhpa: 3\n")
    with pytest.raises(ValueError, match="unknown keys in config .*alhpa, learning-rate"):
        train.parse_args(["--config", str(bad)])


def test_command_line_overrides_config_and_yaml_values_are_type_checked(tmp_path):
    args = train.parse_args(["--config", TINY, "--alpha", "2", "--lr", "3e-4", "--model-arg", "depth=3"])
    assert (args.alpha, args.lr, args.beta) == (2.0, 3e-4, 0.8)
    # the config's model_args mapping first, the command line's --model-arg after it (and winning)
    assert train.model_overrides(args) == {"hidden_size": 32, "depth": 3, "num_heads": 2, "patch_size": 2}
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing: sliding\n")
    with pytest.raises(SystemExit):  # argparse: invalid choice 'sliding'
        train.parse_args(["--config", str(bad)])


#################################################################################
#                             Checkpoints and resume                            #
#################################################################################

def test_checkpoint_has_contract_keys_and_rebuilds_the_model(tmp_path, images):
    exp = run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 3, "--ckpt-every", 2)
    assert os.path.basename(exp) == "000-DiT-S-2"
    assert ckpts(exp) == ["0000002.pt", "0000003.pt"]  # every 2 steps, plus the final step
    ckpt = load(f"{exp}/checkpoints/0000003.pt")
    assert {"model", "ema", "opt", "step", "args", "model_config", "diffusion_config", "vae", "image_size",
            "latent_scale", "loss_weighting", "rng", "data_state"} <= set(ckpt)
    assert ckpt["step"] == 3 and ckpt["vae"] == "none" and ckpt["image_size"] == 8
    assert ckpt["data_state"] == {"epoch": 0, "position": 3, "sampler_seed": 0, "global_batch_size": 4}
    assert ckpt["diffusion_config"]["noise_schedule"] == "squaredcos_cap_v2"
    config = dict(ckpt["model_config"])
    assert config.pop("model") == "DiT-S/2"
    assert (config["hidden_size"], config["depth"], config["in_channels"], config["routing"]) == (32, 2, 3, "dtr")
    model = build_from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["ema"])  # strict: exactly the official key set
    # EMA 0.9999 from a copy of the init: after 3 steps it is still (almost) the init, the model moved
    moved = max((ckpt["model"][k] - ckpt["ema"][k]).abs().max().item() for k in ckpt["model"])
    assert 0 < moved
    metrics = [json.loads(line) for line in open(f"{exp}/metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)
    log = open(f"{exp}/log.txt").read()
    assert "Train Loss" in log
    # the tiny config's 10 classes on 2 class folders: legal, but said in one line
    assert f"Warning: --num-classes 10 but the data ({images}) has 2 classes; classes 2..9 never train\n" in log


def test_resume_mid_epoch_matches_uninterrupted_bitwise(tmp_path, images):
    # 24 samples / global batch 4 = 6 steps per epoch: stop mid-epoch at 3, run on into epoch 2
    common = ["--data-path", images, "--ckpt-every", 100, "--loss-weighting", "ant-uw", "--ema-decay", "0.9"]
    straight = run(*common, "--results-dir", tmp_path / "a", "--max-steps", 8)
    half = run(*common, "--results-dir", tmp_path / "b", "--max-steps", 3)
    unseal(f"{half}/checkpoints/0000003.pt")  # no checksum: still resumes bit-exactly
    resumed = run(*common, "--results-dir", tmp_path / "b", "--max-steps", 8,
                  "--resume", f"{half}/checkpoints/0000003.pt")
    assert resumed == half  # continues in the same experiment folder
    a, b = load(f"{straight}/checkpoints/0000008.pt"), load(f"{resumed}/checkpoints/0000008.pt")
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    assert_same_tensors(a["loss_weighting"], b["loss_weighting"])
    assert a["data_state"] == b["data_state"] == {"epoch": 1, "position": 2, "sampler_seed": 0, "global_batch_size": 4}
    steps = [json.loads(line)["step"] for line in open(f"{resumed}/metrics.jsonl")]
    assert steps == list(range(1, 9))


def unseal(path):
    """Drop the checksum from a checkpoint's zip comment, leaving a plain torch.save file."""
    from storage.checkpoint_integrity import COMMENT_SIZE, stored_checksum
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-COMMENT_SIZE - 2] + b"\0\0")
    assert stored_checksum(path) is None and load(path)["step"] >= 0


def test_resume_refuses_a_checkpoint_of_another_routing_or_model(tmp_path, images):
    exp = run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 1)
    path = f"{exp}/checkpoints/0000001.pt"
    with pytest.raises(ValueError, match="routing: checkpoint 'dtr' vs this run 'random'"):
        run("--data-path", images, "--max-steps", 2, "--resume", path, "--routing", "random")
    with pytest.raises(ValueError, match="depth: checkpoint 2 vs this run 3"):
        run("--data-path", images, "--max-steps", 2, "--resume", path, "--model-arg", "depth=3")


def test_crash_while_saving_keeps_the_previous_checkpoint_loadable(tmp_path, images, monkeypatch):
    real_save = torch.save
    calls = []

    def save_then_crash(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: write half a file, then die
            whole = io.BytesIO()
            real_save(obj, whole)
            f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="simulated"):
        run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 4, "--ckpt-every", 2)
    exp = f"{tmp_path}/000-DiT-S-2"
    assert ckpts(exp) == ["0000002.pt"]  # no partial 0000004.pt, no temp file left behind
    assert load(f"{exp}/checkpoints/0000002.pt")["step"] == 2


def test_non_finite_loss_stops_with_its_step_and_writes_no_bad_checkpoint(tmp_path, images, monkeypatch):
    real_create = train.create_diffusion

    def create_nan_from_step_3(**kwargs):
        diffusion = real_create(**kwargs)
        real_losses, calls = diffusion.training_losses, []

        def training_losses(*args, **kw):
            calls.append(1)
            out = real_losses(*args, **kw)
            if len(calls) >= 3:
                out["loss"] = out["loss"] * float("nan")
            return out
        diffusion.training_losses = training_losses
        return diffusion

    monkeypatch.setattr(train, "create_diffusion", create_nan_from_step_3)
    # checked at log/checkpoint steps only: found at step 4, reported as step 3 where it began
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3.*0000002\.pt"):
        run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 6, "--ckpt-every", 2,
            "--log-every", 10)
    assert ckpts(f"{tmp_path}/000-DiT-S-2") == ["0000002.pt"]


#################################################################################
#                                  Bad input                                    #
#################################################################################

def test_model_arg_of_the_wrong_type_is_one_line_and_an_int_is_a_one_element_list(tmp_path, images):
    code, stderr = run_cli(train.main, train.build_parser(), ["--config", TINY, "--data-path", images, "--results-dir",
                           tmp_path, "--model-arg", "depth=1.5"], "train.py", parse_args=train.parse_args)
    assert (code, stderr) == (2, "train.py: error: DiT-S/2 argument depth expects an integer, got 1.5 (float)\n")
    assert os.listdir(tmp_path) == []
    args = train.parse_args(["--config", os.path.join(ROOT, "configs", "table1", "ffhq64_adm_dtr.yaml"),
                             "--model-arg", "attention_resolutions=8", "--model-arg", "model_channels=32"])
    train.validate_args(args)
    with torch.device("meta"):
        model = train.build_model(args, 64, 3, 1)
    assert model.config["attention_resolutions"] == (8,)


def test_bad_inputs_fail_before_training_with_clear_errors(tmp_path, images):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--data-path", tmp_path / "missing"], "--data-path does not exist"),
        (["--data-path", empty], "--data-path is empty"),
        (["--data-path", images, "--alpha", "0"], "--alpha must be a finite number > 0"),
        (["--data-path", images, "--beta", "1.5"], r"--beta must lie in \(0, 1\]"),
        (["--data-path", images, "--image-size", "9"], "input_size 9 is not divisible by patch_size 2"),
        (["--data-path", images, "--global-batch-size", "32"], "fewer than --global-batch-size"),
        (["--data-path", images, "--num-classes", "1"], "2 classes but --num-classes is 1"),
        (["--data-path", images, "--model-arg", "hiden_size=64"], r"DiT-S/2 \(DiT\) has no argument hiden_size"),
        (["--data-path", images, "--model-arg", "routing=dtr"], "routing=... is set by --routing"),
        (["--data-path", images, "--model-arg", "depth=0"], "depth must be an integer >= 1, got 0"),
        (["--data-path", images, "--model-arg", "num_heads=3"], "hidden_size 32 is not divisible by num_heads 3"),
        (["--data-path", images, "--snr-gamma", "0"], "--snr-gamma must be a finite number > 0, got 0.0"),
        (["--config", tmp_path / "nowhere.yaml"], "--config .*nowhere.yaml: No such file or directory"),
    ]
    for argv, message in cases:
        with pytest.raises(UsageError, match=message):
            run("--results-dir", tmp_path / "results", *argv)
    assert not os.path.exists(tmp_path / "results")  # nothing written for any of them
    for flag, value in (("--model", "DiT-M/2"), ("--routing", "sliding"), ("--model-arg", "depth")):
        with pytest.raises(SystemExit):  # argparse names the valid choices
            train.parse_args(["--config", TINY, flag, value])
    args = train.parse_args(["--config", TINY, "--data-path", images])
    args.model, args.routing = "DiT-M/2", "dtr"
    with pytest.raises(ValueError, match="unknown model 'DiT-M/2'"):
        train.validate_args(args)
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        train.train(train.parse_args(["--config", TINY, "--data-path", images]), 0, 3, torch.device("cpu"))


def train_cli(*argv, cwd=ROOT):
    """train.py as a user runs it; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, *map(str, argv)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=240)


def train_in_process(capsys, monkeypatch, *argv):
    """train.py's command-line entry (run_command) in this process; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", TINY, *map(str, argv)])  # argparse's prog
    with pytest.raises(SystemExit) as stop:
        run_command(train.main, train.build_parser(), train.parse_args)
    return stop.value.code, capsys.readouterr().err


def test_command_line_mistakes_exit_2_with_one_line_and_write_nothing(tmp_path, images, capsys, monkeypatch):
    results = tmp_path / "results"
    result = train_cli("--data-path", images, "--results-dir", results, "--alpha", "0")
    assert (result.returncode, result.stderr) == (2, "train.py: error: --alpha must be a finite number > 0, got 0.0\n")
    nan_config = tmp_path / "nan.yaml"
    nan_config.write_text("ema_decay: .nan\n")
    for argv, flag in ((["--lr=inf"], "--lr"), (["--config", nan_config], "--ema-decay")):  # a config's too
        assert train_in_process(capsys, monkeypatch, "--data-path", images, *argv) == (
            2, f"train.py: error: argument {flag}: expected a finite number, got '{'inf' if flag == '--lr' else 'nan'}'\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = train_cli("--data-path", images, "--results-dir", blocker / "results")
    assert result.returncode == 2
    assert result.stderr == f"train.py: error: --results-dir {blocker}/results cannot be created: Not a directory\n"
    assert not os.path.exists(results)


def test_damaged_images_stop_training_before_it_starts_and_name_the_files(tmp_path, images):
    data = tmp_path / "data"
    shutil.copytree(images, data)
    whole = (data / "a" / "0.png").read_bytes()
    (data / "a" / "0.png").write_bytes(b"")                 # a copy that never finished
    (data / "b" / "3.png").write_bytes(whole[: len(whole) // 2])  # cut short
    with pytest.raises(UsageError, match=rf"--data-path holds 2 unreadable image\(s\): {data}/a/0.png \(empty file "
                                         rf"\(0 bytes\)\); {data}/b/3.png \(truncated PNG \(no IEND chunk\)\)"):
        run("--data-path", data, "--results-dir", tmp_path / "results")
    assert not os.path.exists(tmp_path / "results")
    # a whole image passes (so the check cannot simply reject everything)
    from imagedata.image_folder import image_file_problem
    assert image_file_problem(str(data / "a" / "1.png")) is None


def damage_body(path):
    """XOR bytes in the middle of an image: it passes the pre-check (size, header, end marker), PIL fails on it."""
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 - 8:len(data) // 2 + 8] = bytes(b ^ 0x5A for b in data[len(data) // 2 - 8:len(data) // 2 + 8])
    open(path, "wb").write(bytes(data))


def test_an_image_damaged_in_its_body_stops_after_a_checkpoint_of_the_last_good_step_or_is_skipped(
        tmp_path, images, capsys, monkeypatch):
    from torch.utils.data.distributed import DistributedSampler
    from imagedata.image_folder import image_folder_dataset
    data = tmp_path / "data"
    shutil.copytree(images, data)
    paths = image_folder_dataset(str(data), 8).paths
    # global batch 5 of 24 images: 4 steps per epoch, 4 images left out of each epoch
    sampler = DistributedSampler(paths, num_replicas=1, rank=0, shuffle=True, seed=1, drop_last=True)
    order = [list(sampler) for epoch in (0, 1) if sampler.set_epoch(epoch) is None]
    a = paths[order[0][10]]  # in the batch of step 3
    b = paths[sorted(set(order[1][:5]) & set(order[0][20:]))[0]]  # the first batch of epoch 1 only: step 5
    whole_a = open(a, "rb").read()
    damage_body(a), damage_body(b)
    common = ["--data-path", data, "--global-batch-size", 5, "--global-seed", 1, "--ckpt-every", 100,
              "--results-dir", tmp_path / "r", "--exp-name", "bad"]
    exp = tmp_path / "r" / "bad"
    code, err = train_in_process(capsys, monkeypatch, *common, "--max-steps", 8)  # in the middle of an epoch
    reason = "broken data stream when reading image file"
    line = (f"cannot read image {a}: {reason}, in the batch of step 3; step 2 is saved in {exp}/checkpoints/0000002.pt. "
            "Replace or remove the file and run again with --resume, or pass --skip-bad-images")
    assert (code, err) == (1, f"train.py: error: {line}\n") and ckpts(exp) == ["0000002.pt"]
    assert line in open(exp / "log.txt").read()
    open(a, "wb").write(whole_a)
    code, err = train_in_process(capsys, monkeypatch, *common, "--max-steps", 8, "--resume", "auto")  # first batch
    assert (code, err.split(", in the batch")[0]) == (1, f"train.py: error: cannot read image {b}: {reason}")
    assert "in the batch of step 5; step 4 is saved" in err and ckpts(exp) == ["0000002.pt", "0000004.pt"]
    resumed = run(*common, "--max-steps", 6, "--resume", "auto", "--skip-bad-images")
    assert f"skipped {b}: {reason}, used sample " in open(f"{resumed}/log.txt").read()
    common[-1] = "straight"  # the same data (b damaged, skipped) without the stops: the same weights
    straight = run(*common, "--max-steps", 6, "--skip-bad-images")
    assert_same_tensors(load(f"{straight}/checkpoints/0000006.pt")["model"],
                        load(f"{resumed}/checkpoints/0000006.pt")["model"])


def test_two_ranks_stop_together_in_one_line_for_an_image_one_rank_cannot_read_and_a_full_disk(tmp_path, images):
    # rank 1 cannot decode an image of step 2's batch: both ranks stop after step 1 and save it; the disk refuses
    # the checkpoint (RLIMIT_FSIZE 64 KiB: EFBIG, as a full disk's ENOSPC). Rank 1 must not die in a barrier.
    from torch.utils.data.distributed import DistributedSampler
    from imagedata.image_folder import image_folder_dataset
    data = tmp_path / "data"
    shutil.copytree(images, data)
    paths = image_folder_dataset(str(data), 8).paths
    damage_body(paths[list(DistributedSampler(paths, num_replicas=2, rank=1, shuffle=True, seed=0))[4]])
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), "--config", TINY, "--data-path", str(data), "--results-dir",
                             str(tmp_path / "r"), "--exp-name", "full", "--global-batch-size", "8", "--max-steps", "3"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=240, preexec_fn=limit)
    path = f"{tmp_path}/r/full/checkpoints/0000001.pt"
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 1 and errors == [f"train.py: error: {path}: File too large"], result.stderr
    assert ranks_exited_with(1, result.stderr) and "Connection closed" not in result.stderr
    assert f"{path}: File too large" in open(f"{tmp_path}/r/full/log.txt").read()
    assert ckpts(f"{tmp_path}/r/full") == []  # no checkpoint and no temp file


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "middle"])
def test_resume_from_a_corrupt_checkpoint_is_one_line_naming_it(tmp_path, images, damage, capsys, monkeypatch):
    exp = run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 1)
    path = f"{exp}/checkpoints/0000001.pt"
    whole = open(path, "rb").read()
    middle = bytearray(whole)  # 4 KiB XORed in the middle: zip and torch.load check only the end
    middle[len(whole) // 2 - 2048:len(whole) // 2 + 2048] = bytes(b ^ 0x5A for b in middle[len(whole) // 2 - 2048:
                                                                                               len(whole) // 2 + 2048])
    damaged = {"empty": b"", "truncated": whole[: len(whole) // 2], "garbage": b"<html>not found</html>" * 100,
               "middle": bytes(middle)}[damage]
    with open(path, "wb") as f:
        f.write(damaged)
    reason = {"empty": r"empty \(0 bytes\)", "truncated": r"truncated \([\d,]+ bytes, the end of the archive is missing\)",
              "garbage": r"not a checkpoint file",
              "middle": r"damaged \(its content does not match the SHA-256 checksum stored in it\)"}[damage]
    with pytest.raises(UsageError, match=rf"^cannot read checkpoint {path}: {reason}"):
        run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 2, "--resume", path)
    assert ckpts(exp) == ["0000001.pt"]
    if damage == "middle":  # through the command lines: train.py --resume PATH and the sampler
        line = (f"cannot read checkpoint {path}: damaged (its content does not match the SHA-256 checksum stored "
                "in it)\n")
        code, err = train_in_process(capsys, monkeypatch, "--data-path", images, "--max-steps", 2, "--resume", path)
        assert (code, err) == (2, f"train.py: error: {line}")
        import sample
        monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", path, "--out", str(tmp_path / "grid.png")])
        with pytest.raises(SystemExit) as stop:
            run_command(sample.main, sample.build_parser())
        assert (stop.value.code, capsys.readouterr().err) == (2, f"sample.py: error: {line}")
        assert ckpts(exp) == ["0000001.pt"] and not os.path.exists(tmp_path / "grid.png")


def test_resume_of_a_file_that_is_not_a_train_checkpoint_says_what_it_is_and_lacks(tmp_path, images, capsys,
                                                                                    monkeypatch):
    exp = run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 1)
    ckpt = load(f"{exp}/checkpoints/0000001.pt")
    one_weight_less = {**ckpt, "model": {k: v for k, v in ckpt["model"].items() if k != "pos_embed"}}
    files = {  # name: (content, what the line says after "cannot resume PATH: ")
        "foo": ({"foo": 1}, "it is a dict with keys foo, not a checkpoint of train.py; resume needs a checkpoint "
                            "written by train.py; to sample from it, give it to sample.py --ckpt"),
        "raw": (ckpt["ema"], f"it is a raw state_dict ({len(ckpt['ema'])} tensors: weights only, like the released "
                             "DiT-XL-2-256x256.pt); resume needs a checkpoint written by train.py"),
        "official": ({"model": ckpt["model"], "ema": ckpt["ema"], "opt": ckpt["opt"], "args": argparse.Namespace(
            model="DiT-S/2")}, "it is an official DiT training checkpoint (args, ema, model, opt; no model_config); "
                               "resume needs a checkpoint written by train.py"),
        "ema_only": ({"ema": ckpt["ema"]}, "it is a file of weights only (ema); resume needs a checkpoint written by "
                                           "train.py"),
        "no_opt": ({k: v for k, v in ckpt.items() if k != "opt"}, "it is a train.py checkpoint without opt (edited "
                                                                  "or written by other code), so the run cannot "
                                                                  "continue exactly"),
        "no_weight": (one_weight_less, "its model weights do not fit the model its model_config describes: lacks "
                                       "(1): pos_embed"),
    }
    for name, (content, says) in files.items():
        path = tmp_path / f"{name}.pt"
        torch.save(content, path)
        code, err = train_in_process(capsys, monkeypatch, "--data-path", images, "--max-steps", 2, "--resume", path)
        assert code == 2 and err.startswith(f"train.py: error: cannot resume {path}: {says}") and err.count("\n") == 1, err
    assert ckpts(exp) == ["0000001.pt"]


#################################################################################
#                              Latents and DDP                                  #
#################################################################################

def test_trains_on_latents_written_by_extract_features(tmp_path, images):
    from test_extract_features import run_args, tiny_vae  # noqa: F401  (the data engineer's 16px test VAE)
    import extract_features
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    feat = tmp_path / "features"
    extract_features.main(run_args(images, feat, str(tmp_path / "vae")))
    exp = train.main(train.parse_args(["--config", os.path.join(ROOT, "configs/tiny_latent.yaml"),
                                       "--feature-path", str(feat), "--results-dir", str(tmp_path / "r"),
                                       "--max-steps", "2"]))
    ckpt = load(f"{exp}/checkpoints/0000002.pt")
    assert ckpt["model_config"]["in_channels"] == 4 and ckpt["model_config"]["input_size"] == 8
    assert ckpt["vae"] == str(tmp_path / "vae") and ckpt["latent_scale"] == pytest.approx(0.18215)
    with pytest.raises(ValueError, match="extracted from 16px images but --image-size is 32"):
        train.main(train.parse_args(["--config", os.path.join(ROOT, "configs/tiny_latent.yaml"),
                                     "--feature-path", str(feat), "--image-size", "32"]))


def latent_run(feat, results, *argv):
    """train.main on a features folder with configs/tiny_latent.yaml; returns the experiment folder."""
    return train.main(train.parse_args(["--config", os.path.join(ROOT, "configs/tiny_latent.yaml"),
                                        "--feature-path", str(feat), "--results-dir", str(results),
                                        "--image-size", "16", *map(str, argv)]))


def test_posterior_latents_are_drawn_each_step_from_that_steps_generator(tmp_path, monkeypatch):
    from test_imagedata import make_latent_dir
    feat = tmp_path / "feat"
    means, _, stds = make_latent_dir(feat, np.random.default_rng(0), counts=(4, 4), latent_stat="posterior")
    seen, real_create = [], train.create_diffusion

    def recording_diffusion(**kwargs):
        diffusion = real_create(**kwargs)
        real_losses = diffusion.training_losses
        diffusion.training_losses = lambda model, x, t, *a, **kw: seen.append(x.clone()) or real_losses(model, x, t, *a, **kw)
        return diffusion

    drawn, real_sample = [], training.step.sample_posterior
    monkeypatch.setattr(train, "create_diffusion", recording_diffusion)
    monkeypatch.setattr(training.step, "sample_posterior", lambda m, e: drawn.append((m.clone(), e.clone())) or real_sample(m, e))
    latent_run(feat, tmp_path / "r", "--max-steps", 3, "--global-seed", 5)
    assert len(drawn) == len(seen) == 3
    rows = {tuple(np.concatenate([means[i, f], stds[i, f]]).ravel()) for i in range(8) for f in (0, 1)}
    for step, ((moments, eps), x) in enumerate(zip(drawn, seen)):
        # the step's generator draws t, noise, label drops, then the posterior's eps, all for the global batch
        g = step_generator(5, step, torch.device("cpu"))
        torch.randint(0, 1000, (4,), generator=g), torch.randn(4, 4, 2, 2, generator=g), torch.rand(4, generator=g)
        assert torch.equal(eps, torch.randn(4, 4, 2, 2, generator=g))
        assert all(tuple(m.numpy().ravel()) in rows for m in moments)  # (mean, std) of a stored image or flip
        assert torch.equal(x, moments[:, 0] + moments[:, 1] * eps)
    assert not torch.equal(drawn[0][1], drawn[1][1])  # a fresh latent every step


def test_posterior_latents_resume_bitwise_and_means_only_folders_still_train(tmp_path):
    from test_imagedata import make_latent_dir
    make_latent_dir(tmp_path / "post", np.random.default_rng(1), counts=(4, 4), latent_stat="posterior")
    common = ["--ckpt-every", 100, "--ema-decay", "0.9"]
    straight = latent_run(tmp_path / "post", tmp_path / "a", *common, "--max-steps", 5)
    half = latent_run(tmp_path / "post", tmp_path / "b", *common, "--max-steps", 3)
    resumed = latent_run(tmp_path / "post", tmp_path / "b", *common, "--max-steps", 5,
                         "--resume", f"{half}/checkpoints/0000003.pt")
    a, b = load(f"{straight}/checkpoints/0000005.pt"), load(f"{resumed}/checkpoints/0000005.pt")
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(a["ema"], b["ema"])
    make_latent_dir(tmp_path / "means", np.random.default_rng(1), counts=(4, 4))  # same means, no stds
    means_only = load(f"{latent_run(tmp_path / 'means', tmp_path / 'c', *common, '--max-steps', 5)}/checkpoints/0000005.pt")
    assert all(torch.isfinite(v).all() for v in means_only["model"].values())
    assert any(not torch.equal(means_only["model"][k], a["model"][k]) for k in a["model"])  # the std did enter


@pytest.mark.parametrize("family", ["dit", "adm", "text_dit"])
def test_every_buffer_is_a_fixed_routing_table_so_ddp_need_not_broadcast_buffers(family):
    # train.py builds DDP with broadcast_buffers=False: sound only while no buffer changes in training
    from models import ADM, DiT
    from models.text_dit import TextDiT
    torch.manual_seed(0)
    common = dict(input_size=8, routing="dtr")
    model, extra = {
        "dit": (lambda: (DiT(patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10, **common),
                         {"y": torch.tensor([1, 2])})),
        "adm": (lambda: (ADM(in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                             attention_resolutions="4", num_head_channels=16, num_classes=10, **common),
                         {"y": torch.tensor([1, 2])})),
        "text_dit": (lambda: (TextDiT(patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, context_dim=16,
                                      max_text_len=5, **common), {"context": torch.randn(2, 5, 16)})),
    }[family]()
    names = [name for name, _ in model.named_buffers()]
    assert names and all(name.endswith("routing.masks") for name in names)
    assert not any(name in model.state_dict() for name in names)  # non-persistent: rebuilt from the config
    before = {name: b.clone() for name, b in model.named_buffers()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), **extra).square().mean().backward()
    opt.step()
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())


def test_two_gloo_ranks_match_one_rank_with_the_same_global_batch(tmp_path, images):
    # with an image damaged in its body, skipped: its substitute is the same whatever the world size
    data = tmp_path / "data"
    shutil.copytree(images, data)
    damage_body(data / "b" / "5.png")
    common = ["--data-path", data, "--global-batch-size", 8, "--max-steps", 3, "--ckpt-every", 100,
              "--skip-bad-images"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "train.py"), "--config", TINY, "--results-dir", str(tmp_path / "ddp"),
                    *map(str, common)], check=True, env=env, cwd=ROOT, timeout=240)
    with intra_op_threads(1):  # the ranks' thread count, so only the batch split differs
        single = run(*common, "--results-dir", tmp_path / "one")
    a = load(f"{tmp_path}/ddp/000-DiT-S-2/checkpoints/0000003.pt")
    b = load(f"{single}/checkpoints/0000003.pt")
    # Same samples, t, noise and label drops per step. The forwards run on 4 samples per rank instead of 8
    # and the all-reduce sums in another order, so gradients differ by fp32 rounding, a relative error
    # ~1e-6. Adam divides each element's step by its own gradient scale, so that error moves a weight by
    # ~lr * 1e-6 and only an element whose gradient cancels to near its rounding moves further: the worst
    # measured is 1.5e-8 (AVX-512 and AVX2, 1 or 2 threads), so 1e-6 has a 60x margin, while a rank
    # stepping on unsynchronised gradients moves thousands of elements by ~lr = 1e-4.
    assert_same_tensors(a["model"], b["model"], atol=1e-6)
    assert_same_tensors(a["ema"], b["ema"], atol=1e-6)
    loss_ddp = [json.loads(line)["loss"] for line in open(f"{tmp_path}/ddp/000-DiT-S-2/metrics.jsonl")]
    loss_one = [json.loads(line)["loss"] for line in open(f"{single}/metrics.jsonl")]
    np.testing.assert_allclose(loss_ddp, loss_one, rtol=1e-5)
    assert f"skipped {data}/b/5.png: broken data stream" in open(f"{single}/log.txt").read()


def test_two_gloo_ranks_match_one_rank_on_posterior_latents_with_ant_uw(tmp_path):
    # each step's latent draw and ANT-UW's cluster counts are global-batch quantities: 2 ranks x 4 = 1 rank x 8
    from test_imagedata import make_latent_dir
    feat = tmp_path / "feat"
    make_latent_dir(feat, np.random.default_rng(2), counts=(4, 4), latent_stat="posterior")
    common = ["--feature-path", feat, "--image-size", 16, "--global-batch-size", 8, "--max-steps", 3,
              "--ckpt-every", 100, "--loss-weighting", "ant-uw"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny_latent.yaml"),
                    "--results-dir", str(tmp_path / "ddp"), *map(str, common)], check=True, env=env, cwd=ROOT, timeout=240)
    with intra_op_threads(1):
        single = latent_run(feat, tmp_path / "one", *common[2:])
    (ddp,) = glob.glob(f"{tmp_path}/ddp/*/checkpoints/0000003.pt")
    a, b = load(ddp), load(f"{single}/checkpoints/0000003.pt")
    # fp32 rounding of the batch split only, as in the test above (1e-6 >> the 1.5e-8 measured there)
    assert_same_tensors(a["model"], b["model"], atol=1e-6)
    assert_same_tensors(a["loss_weighting"], b["loss_weighting"], atol=1e-6)
