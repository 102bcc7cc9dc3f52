"""storage/run_folder.py, storage/run_record.py: atomic numbering, --exp-name, --resume auto, --keep-last, records."""
import json
import os
import subprocess
import threading

import pytest
import torch
import yaml

import train
from storage.run_folder import (create_numbered_folder, newest_checkpoint, prune_checkpoints,
                                remove_stale_temp_files, resolve_run)
from test_train import TINY, images, load  # noqa: F401  (the module-scoped image folder fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv):
    return train.main(train.parse_args(["--config", TINY, *map(str, argv)]))


def touch_checkpoint(folder, step, data=None):
    """A file named like a checkpoint: a real (tiny) torch.save zip, or raw bytes to fake a broken one."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{step:07d}.pt")
    if data is None:
        torch.save({"step": step}, path)
    else:
        with open(path, "wb") as f:
            f.write(data)
    return path


#################################################################################
#                                  Run folders                                  #
#################################################################################

def test_concurrent_starts_get_distinct_numbered_folders(tmp_path, monkeypatch):
    # Every thread lists the folder before any creates one (the barrier inside listdir), so all pick
    # the same first number: only the mkdir retry can keep them apart.
    threads_n = 6
    barrier = threading.Barrier(threads_n)
    real_listdir = os.listdir

    def listdir_then_wait(path):
        entries = real_listdir(path)
        barrier.wait(timeout=10)
        return entries

    monkeypatch.setattr(os, "listdir", listdir_then_wait)
    made = []
    workers = [threading.Thread(target=lambda: made.append(create_numbered_folder(str(tmp_path), "DiT-S-2")))
               for _ in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    monkeypatch.undo()
    assert sorted(os.path.basename(p) for p in made) == [f"{i:03d}-DiT-S-2" for i in range(threads_n)]
    assert create_numbered_folder(str(tmp_path), "DiT-S-2").endswith(f"{threads_n:03d}-DiT-S-2")


def test_exp_name_folder_is_reused_and_resume_auto_picks_the_newest_whole_checkpoint(tmp_path):
    run_dir, ckpt, removed = resolve_run(str(tmp_path), "DiT-S-2", "my-run", "auto")
    assert run_dir == str(tmp_path / "my-run") and ckpt is None and removed == []
    folder = os.path.join(run_dir, "checkpoints")
    touch_checkpoint(folder, 2)
    newest_whole = touch_checkpoint(folder, 4)
    touch_checkpoint(folder, 6, data=open(newest_whole, "rb").read()[:100])  # cut short: not a whole zip
    touch_checkpoint(folder, 8, data=b"")
    stale = os.path.join(folder, ".0000010.pt.abc123.tmp")
    open(stale, "wb").close()
    again, ckpt, removed = resolve_run(str(tmp_path), "DiT-S-2", "my-run", "auto")
    assert again == run_dir and ckpt == newest_whole and removed == [stale] and not os.path.exists(stale)
    assert newest_checkpoint(str(tmp_path / "nowhere")) is None
    path_dir, path_ckpt, _ = resolve_run(str(tmp_path / "other"), "x", None, newest_whole)
    assert (path_dir, path_ckpt) == (run_dir, newest_whole)  # --resume PATH: that checkpoint's folder
    assert not os.path.exists(tmp_path / "other")


def test_keep_last_keeps_the_newest_and_the_milestones(tmp_path):
    folder = str(tmp_path)
    for step in (1, 2, 3, 4, 5, 6, 7):
        touch_checkpoint(folder, step)
    removed = prune_checkpoints(folder, keep_last=2, keep_every=3)
    assert sorted(os.listdir(folder)) == ["0000003.pt", "0000006.pt", "0000007.pt"]
    assert sorted(os.path.basename(p) for p in removed) == ["0000001.pt", "0000002.pt", "0000004.pt", "0000005.pt"]
    assert remove_stale_temp_files(folder) == []


#################################################################################
#                               Through train.py                                #
#################################################################################

def test_train_keep_last_prunes_and_resume_auto_continues_bitwise(tmp_path, images):
    common = ["--data-path", images, "--results-dir", tmp_path, "--ckpt-every", 1]
    straight = run(*common, "--exp-name", "straight", "--max-steps", 5)
    first = run(*common, "--exp-name", "requeued", "--resume", "auto", "--max-steps", 3, "--keep-last", 2)
    assert sorted(os.listdir(f"{first}/checkpoints")) == ["0000002.pt", "0000003.pt"]
    stale = f"{first}/checkpoints/.0000004.pt.killed.tmp"  # what a SIGKILL during a save leaves
    open(stale, "wb").write(b"half a checkpoint")
    second = run(*common, "--exp-name", "requeued", "--resume", "auto", "--max-steps", 5, "--keep-last", 2)
    assert second == first == str(tmp_path / "requeued")
    assert sorted(os.listdir(f"{second}/checkpoints")) == ["0000004.pt", "0000005.pt"]  # temp file gone
    a, b = load(f"{straight}/checkpoints/0000005.pt"), load(f"{second}/checkpoints/0000005.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert "Removed" in open(f"{second}/log.txt").read()
    with pytest.raises(ValueError, match="--resume auto needs --exp-name"):
        run(*common, "--resume", "auto")
    with pytest.raises(ValueError, match="continues in its own run folder .*requeued, not --exp-name straight"):
        run(*common, "--exp-name", "straight", "--resume", f"{second}/checkpoints/0000005.pt")


def test_run_record_is_written_at_start_and_its_config_reproduces_the_flags(tmp_path, images):
    exp = run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 1, "--lr", "3e-4",
              "--exp-name", "rec", "--resume", "auto")
    with open(f"{exp}/config.yaml") as f:
        config = yaml.safe_load(f)
    assert config["lr"] == 3e-4 and config["model-args"]["hidden_size"] == 32 and "resume" not in config
    original = train.parse_args(["--config", TINY, "--data-path", images, "--results-dir", str(tmp_path),
                                 "--max-steps", "1", "--lr", "3e-4"])
    reloaded = train.parse_args(["--config", f"{exp}/config.yaml"])
    assert vars(reloaded) == {**vars(original), "config": f"{exp}/config.yaml"}
    (record,) = [json.loads(line) for line in open(f"{exp}/starts.jsonl")]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["git"]["commit"] == head and isinstance(record["git"]["dirty"], bool)
    assert record["versions"]["torch"] == torch.__version__ and record["world_size"] == 1
    run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 2, "--exp-name", "rec", "--resume", "auto")
    starts = [json.loads(line) for line in open(f"{exp}/starts.jsonl")]
    assert [s["step"] for s in starts] == [0, 1] and starts[1]["resumed_from"].endswith("0000001.pt")
