"""storage/run_folder.py, storage/run_record.py: atomic numbering, --exp-name, --resume auto, --keep-last, records."""
import json
import os
import signal
import socket
import subprocess
import threading
import time
import zipfile

import pytest
import torch
import yaml

import train
from foundation.usage_error import UsageError
from storage.checkpoint import save_checkpoint
from storage.checkpoint_integrity import content_checksum, integrity_problem, stored_checksum
from storage.run_folder import (create_numbered_folder, newest_checkpoint, prune_checkpoints,
                                remove_stale_temp_files, resolve_run)
from storage.run_lock import RunFolderLock
from test_train import TINY, images, load, train_in_process  # noqa: F401  (the module-scoped image folder fixture)

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


def damage_middle(path):
    """XOR 4 KiB in the middle of a file: zip and torch.load, which check only the end, do not notice."""
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2 - 2048
    data[middle:middle + 4096] = bytes(b ^ 0x5A for b in data[middle:middle + 4096])
    open(path, "wb").write(bytes(data))


def test_exp_name_folder_is_reused_and_resume_auto_picks_the_newest_whole_checkpoint(tmp_path):
    run_dir, ckpt, removed, skipped = resolve_run(str(tmp_path), "DiT-S-2", "my-run", "auto")
    assert run_dir == str(tmp_path / "my-run") and ckpt is None and removed == skipped == []
    folder = os.path.join(run_dir, "checkpoints")
    legacy = touch_checkpoint(folder, 2)  # a plain torch.save file, no checksum: accepted
    newest_whole = os.path.join(folder, "0000004.pt")
    save_checkpoint({"step": 4, "w": torch.arange(4096.0)}, newest_whole)
    touch_checkpoint(folder, 6, data=open(newest_whole, "rb").read()[:100])  # cut short: not a whole zip
    touch_checkpoint(folder, 8, data=b"")
    damaged = os.path.join(folder, "0000009.pt")
    save_checkpoint({"step": 9, "w": torch.arange(4096.0)}, damaged)
    damage_middle(damaged)
    assert torch.load(damaged, weights_only=True)["step"] == 9  # loads, with wrong weights, without the checksum
    stale = os.path.join(folder, ".0000010.pt.abc123.tmp")
    open(stale, "wb").close()
    again, ckpt, removed, skipped = resolve_run(str(tmp_path), "DiT-S-2", "my-run", "auto")
    assert again == run_dir and ckpt == newest_whole and removed == [stale] and not os.path.exists(stale)
    assert [(os.path.basename(p), why.split(" (")[0]) for p, why in skipped] == [
        ("0000009.pt", "damaged"), ("0000008.pt", "empty"), ("0000006.pt", "truncated")]
    assert newest_checkpoint(str(tmp_path / "nowhere")) is None
    path_dir, path_ckpt, _, _ = resolve_run(str(tmp_path / "other"), "x", None, newest_whole)
    assert (path_dir, path_ckpt) == (run_dir, newest_whole)  # --resume PATH: that checkpoint's folder
    assert not os.path.exists(tmp_path / "other")
    with pytest.raises(UsageError, match=r"^cannot read checkpoint .*0000009.pt: damaged \(its content does not "
                                         r"match the SHA-256 checksum stored in it\)$"):
        resolve_run(str(tmp_path), "x", None, damaged)
    os.remove(newest_whole)
    assert resolve_run(str(tmp_path), "DiT-S-2", "my-run", "auto")[1] == legacy
    os.remove(legacy)
    with pytest.raises(UsageError, match=rf"^--resume auto: no readable checkpoint in {folder}, found only "
                                         r"0000009.pt \(damaged .*\); 0000008.pt \(empty \(0 bytes\)\); "
                                         r"0000006.pt \(truncated .*\); restore a good copy, or move them away"):
        resolve_run(str(tmp_path), "DiT-S-2", "my-run", "auto")


def test_a_sealed_checkpoint_is_an_ordinary_zip_and_torch_file_whose_checksum_covers_every_byte(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint({"w": torch.arange(10.0)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(10.0))
    assert zipfile.ZipFile(path).testzip() is None and stored_checksum(path) == content_checksum(path)
    size = os.path.getsize(path)
    for offset in (0, size // 3, size - 120):  # a header, the data, the central directory
        data = bytearray(open(path, "rb").read())
        data[offset] ^= 1
        open(tmp_path / "d.pt", "wb").write(bytes(data))
        assert integrity_problem(str(tmp_path / "d.pt")) is not None, offset


#################################################################################
#                         One job per run folder (lock)                         #
#################################################################################

def test_a_held_run_folder_refuses_a_second_start_in_one_line_and_a_killed_holder_frees_it(
        tmp_path, images, capsys, monkeypatch):
    folder = tmp_path / "same"
    folder.mkdir()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # the holder: takes the folder, says so, waits to be killed
        try:
            held = RunFolderLock()
            held.acquire(str(folder))
            os.write(ready_w, b"1")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        code, err = train_in_process(capsys, monkeypatch, "--data-path", images, "--results-dir", tmp_path,
                                     "--exp-name", "same", "--resume", "auto", "--max-steps", 1)
        assert code == 2 and err.count("\n") == 1
        assert err.startswith(f"train.py: error: run folder {folder} is in use by pid {child} on host "
                              f"{socket.gethostname()} (since ")
        assert err.endswith("): another train.py writes into it; wait for it to end or choose another --exp-name\n")
        assert sorted(os.listdir(folder)) == ["run.lock"]  # nothing written: no log, no checkpoints
        # a live writer's temp file in a folder nobody holds is left alone; a dead writer's is removed
        live = folder / f".0000001.pt.pid{child}@{socket.gethostname()}.x1.tmp"
        gone = subprocess.Popen(["true"])
        gone.wait()  # its pid is free now
        dead = folder / f".0000002.pt.pid{gone.pid}@{socket.gethostname()}.x2.tmp"
        for path in (live, dead):
            path.write_bytes(b"half")
        assert remove_stale_temp_files(str(folder)) == [str(dead)] and live.exists()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    with RunFolderLock() as lock:  # SIGKILL never leaves a folder stuck: the kernel dropped the flock
        lock.acquire(str(folder))
        assert open(folder / "run.lock").read().startswith(f"pid {os.getpid()} on host")
    assert remove_stale_temp_files(str(folder), held=True) == [str(live)]  # the holder's own cleanup: all of them


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

def test_train_keep_last_prunes_and_resume_auto_continues_bitwise(tmp_path, images, capsys, monkeypatch):
    common = ["--data-path", images, "--results-dir", tmp_path, "--ckpt-every", 1]
    straight = run(*common, "--exp-name", "straight", "--max-steps", 5)
    first = run(*common, "--exp-name", "requeued", "--resume", "auto", "--max-steps", 3, "--keep-last", 2)
    assert sorted(os.listdir(f"{first}/checkpoints")) == ["0000002.pt", "0000003.pt"]
    stale = f"{first}/checkpoints/.0000004.pt.killed.tmp"  # what a SIGKILL during a save leaves
    open(stale, "wb").write(b"half a checkpoint")
    damage_middle(f"{first}/checkpoints/0000003.pt")  # the newest is damaged: resume from step 2 instead
    second = run(*common, "--exp-name", "requeued", "--resume", "auto", "--max-steps", 5, "--keep-last", 2)
    assert second == first == str(tmp_path / "requeued")
    assert sorted(os.listdir(f"{second}/checkpoints")) == ["0000004.pt", "0000005.pt"]  # temp file gone
    a, b = load(f"{straight}/checkpoints/0000005.pt"), load(f"{second}/checkpoints/0000005.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    log = open(f"{second}/log.txt").read()
    assert "Removed" in log and f"Resumed from {first}/checkpoints/0000002.pt at step 2" in log
    assert (f"--resume auto: skipped {first}/checkpoints/0000003.pt: damaged (its content does not match the "
            "SHA-256 checksum stored in it)") in log
    for name in ("0000004.pt", "0000005.pt"):  # nothing readable left: stop, naming what is there
        damage_middle(f"{second}/checkpoints/{name}")
    code, err = train_in_process(capsys, monkeypatch, *common, "--exp-name", "requeued", "--resume", "auto",
                                 "--max-steps", 6)
    assert (code, err) == (2, f"train.py: error: --resume auto: no readable checkpoint in {second}/checkpoints, found "
                              "only 0000005.pt (damaged (its content does not match the SHA-256 checksum stored in "
                              "it)); 0000004.pt (damaged (its content does not match the SHA-256 checksum stored in "
                              "it)); restore a good copy, or move them away to start over from step 0\n")
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
    # the record holds the precision the run used: --mixed-precision auto is bf16 on a bf16 GPU, else no
    used = config["mixed-precision"]
    assert original.mixed_precision == "auto" and used in ("no", "bf16")
    assert vars(reloaded) == {**vars(original), "config": f"{exp}/config.yaml", "mixed_precision": used}
    (record,) = [json.loads(line) for line in open(f"{exp}/starts.jsonl")]
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["git"]["commit"] == head and isinstance(record["git"]["dirty"], bool)
    assert record["versions"]["torch"] == torch.__version__ and record["world_size"] == 1
    run("--data-path", images, "--results-dir", tmp_path, "--max-steps", 2, "--exp-name", "rec", "--resume", "auto")
    starts = [json.loads(line) for line in open(f"{exp}/starts.jsonl")]
    assert [s["step"] for s in starts] == [0, 1] and starts[1]["resumed_from"].endswith("0000001.pt")
