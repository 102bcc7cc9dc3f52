"""The project-wide error for mistakes a user can fix: a flag value, missing data, a checkpoint that does not fit.

Scripts end on it with `prog: error: <message>` and exit code 2 (launch.cli.run_command); library callers catch
it as the ValueError it is. Bugs stay ordinary exceptions and keep their traceback.
"""


class UsageError(ValueError):
    """A mistake the user can fix on the command line; run_command prints `prog: error: <message>`, exits 2."""
