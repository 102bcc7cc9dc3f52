"""Run a script's command line in this process, as a user would: (exit code, stderr) through launch.cli.run_command."""
import contextlib
import io
import re

from launch.cli import run_command


def run_cli(main, parser, argv, prog, parse_args=None):
    """`prog ARGV` in-process: main(parser.parse_args(argv)) under run_command; returns (exit code, stderr).

    parse_args(argv) replaces parser.parse_args for scripts that parse in steps (train.parse_args).
    Exit code 0 when main returns.
    """
    parser.prog = prog
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            run_command(main, parser, parse_args=lambda: (parse_args or parser.parse_args)([str(a) for a in argv]))
            code = 0
        except SystemExit as stop:
            code = stop.code
    return code, stderr.getvalue()


def ranks_exited_with(code, torchrun_stderr, nproc=2):
    """Whether torchrun's failure report says every rank that failed exited with `code`.

    A rank still running when the first one failed may be stopped by torchrun itself (SIGTERM: -15) before it
    exits on its own: a race of the launcher, not a bug of ours, so -15 is allowed beside at least one `code`.
    """
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", torchrun_stderr)]
    return code in codes and set(codes) <= {code, -15} and len(codes) <= nproc
