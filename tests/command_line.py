"""Run a script's command line in this process, as a user would: (exit code, stderr) through launch.cli.run_command."""
import contextlib
import io

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
