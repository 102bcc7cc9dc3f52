"""launch/cli.py and foundation/atomic_file.py: one-line errors with exit code 2, under torchrun too; honest writes."""
import argparse
import errno
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from command_line import ranks_exited_with
from foundation.atomic_file import atomic_write
from foundation.flag_types import finite_float
from foundation.usage_error import UsageError
from launch.cli import check_on_every_rank, make_output_dir, run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A script in the style of ours: it validates, creates its output folder and (rank 0) writes into it.
TOY = textwrap.dedent("""
    import argparse, os, sys
    import torch.distributed as dist
    from foundation.flag_types import finite_float
    from foundation.usage_error import UsageError
    from launch.cli import check_on_every_rank, make_output_dir, run_command
    from launch.process_group import setup_distributed

    def main(args):
        if args.scale < 0:
            raise UsageError(f"--scale must be >= 0, got {args.scale}")
        if args.bug:
            raise RuntimeError("a bug keeps its traceback")
        rank, world_size, _ = setup_distributed()
        check_on_every_rank(lambda: make_output_dir(args.out, "--out") if rank == args.writer else None)
        dist.barrier() if world_size > 1 else None  # every rank would wait here if one had left
        sys.stdout.write(f"done {rank}\\n")  # one write: the two ranks share the pipe
        if world_size > 1:  # as the scripts do: exiting with a live gloo group can abort ("terminate called")
            dist.destroy_process_group()

    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=finite_float, default=1.0)
    parser.add_argument("--out", type=str, default="out")
    parser.add_argument("--writer", type=int, default=0, help="the rank that creates --out")
    parser.add_argument("--bug", action="store_true")
    run_command(main, parser)
""")


def toy(tmp_path, *argv, nproc=None, timeout=120):
    """Run the toy script (plainly, or under torchrun with nproc gloo ranks); returns the CompletedProcess."""
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, str(script), *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=timeout)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error:" in line]


def test_usage_error_is_one_line_and_exit_code_2_and_a_bug_keeps_its_traceback(tmp_path):
    result = toy(tmp_path, "--scale", "-1")
    assert result.returncode == 2
    assert result.stderr == "toy.py: error: --scale must be >= 0, got -1.0\n"
    result = toy(tmp_path, "--bug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr
    assert not os.path.exists(tmp_path / "out")  # nothing written for a rejected command


def test_finite_float_is_rejected_by_argparse_itself_with_exit_code_2(capsys):
    parser = argparse.ArgumentParser(prog="toy.py")
    parser.add_argument("--scale", type=finite_float)
    for value in ("nan", "inf", "-inf", "abc"):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args([f"--scale={value}"])
        assert stop.value.code == 2
        assert f"toy.py: error: argument --scale: expected a finite number, got '{value}'" in capsys.readouterr().err
    for argv in (["--scale", "inf"], ["--nope"]):  # under run_command: one line, no usage block first
        with pytest.raises(SystemExit) as stop:
            run_command(lambda args: None, parser, lambda: parser.parse_args(argv))
        assert stop.value.code == 2
        assert capsys.readouterr().err == {"--nope": "toy.py: error: unrecognized arguments: --nope\n"}.get(
            argv[0], "toy.py: error: argument --scale: expected a finite number, got 'inf'\n")
    assert parser.parse_args(["--scale", "1e-4"]).scale == 1e-4 and finite_float("-3") == -3.0
    assert isinstance(UsageError("x"), ValueError)  # callers catching ValueError keep working
    assert check_on_every_rank(lambda a, b=0: a + b, 2, b=3) == 5  # no process group: just the call


def test_output_dir_that_cannot_be_created_names_flag_path_and_reason(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=rf"^--results-dir {blocker}/sub cannot be created: Not a directory$"):
        make_output_dir(str(blocker / "sub"), "--results-dir")
    assert make_output_dir(str(tmp_path / "x" / "y"), "--out") == str(tmp_path / "x" / "y")
    assert os.path.isdir(tmp_path / "x" / "y")
    if os.geteuid() != 0:  # root may write anywhere on a writable file system
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(UsageError, match="is not writable: permission denied"):
            make_output_dir(str(locked), "--out")


def test_under_torchrun_every_rank_exits_2_with_one_line_when_one_rank_fails(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # rank 1 alone creates the folder and fails; without the shared verdict rank 0 would wait in the barrier
    result = toy(tmp_path, "--out", str(blocker / "out"), "--writer", "1", nproc=2)
    assert result.returncode != 0
    assert ranks_exited_with(2, result.stderr)  # torchrun's report: no rank exited with a traceback (1)
    assert error_lines(result.stderr).count(f"toy.py: error: --out {blocker}/out cannot be created: "
                                            "Not a directory") == 1
    assert "done" not in result.stdout
    # the same validation error on both ranks: printed once (rank 0), both exit 2
    result = toy(tmp_path, "--scale", "-2", nproc=2)
    assert error_lines(result.stderr).count("toy.py: error: --scale must be >= 0, got -2.0") == 1
    assert ranks_exited_with(2, result.stderr) and "UsageError" not in result.stderr  # no traceback
    result = toy(tmp_path, "--out", str(tmp_path / "fine"), nproc=2)
    assert result.returncode == 0 and sorted(result.stdout.splitlines()) == ["done 0", "done 1"]


#################################################################################
#                                   atomic_write                                #
#################################################################################

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "wb") as f:
            f.write(b"x")
        atomic_write(str(tmp_path / "atomic"), lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "atomic").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == 0o666 & ~umask
    os.chmod(tmp_path / "atomic", 0o640)  # rewriting an existing file keeps its mode, as open() does
    atomic_write(str(tmp_path / "atomic"), lambda f: f.write(b"y"))
    assert stat.S_IMODE(os.stat(tmp_path / "atomic").st_mode) == 0o640


def test_atomic_write_names_the_path_and_reason_when_the_disk_refuses_a_checkpoint(tmp_path):
    # RLIMIT_FSIZE makes write(2) fail with EFBIG past 64 KiB (Python ignores SIGXFSZ), as a full disk fails
    # with ENOSPC; torch.save alone would say "[enforce fail at inline_container.cc] unexpected pos".
    code = textwrap.dedent(f"""
        import resource, torch
        from foundation.atomic_file import atomic_write
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        try:
            atomic_write({str(tmp_path / 'ckpt.pt')!r}, lambda f: torch.save({{"w": torch.zeros(1 << 16)}}, f))
        except OSError as error:
            print(error.errno, error.filename, error.strerror, sep="|")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.stdout.strip() == f"{errno.EFBIG}|{tmp_path / 'ckpt.pt'}|File too large", result.stderr
    assert os.listdir(tmp_path) == []  # neither the checkpoint nor a temp file is left
