"""The run folder of a training job: its name, its checkpoints, what survives a kill and what is pruned.

<results-dir>/NAME with --exp-name NAME (a requeued job finds its own folder again), otherwise official
DiT's <results-dir>/NNN-<model>, numbered by an os.mkdir that fails if the name is taken, so two jobs
started together never share a folder. Checkpoints are <run>/checkpoints/<step:07d>.pt, written through
storage.atomic_file, so a file with that name is always complete; a kill during a save leaves a hidden
.<step:07d>.pt.*.tmp sibling, removed at the next start.
"""
import os
import re
import zipfile

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")  # <step:07d>.pt (more digits past 9,999,999 steps)
STALE_TEMP = re.compile(r"^\..+\.tmp$")            # atomic_write's temp files: .<name>.<random>.tmp


def create_numbered_folder(results_dir, label):
    """Create <results_dir>/<NNN>-<label> with the next free number; atomic, so concurrent jobs differ."""
    os.makedirs(results_dir, exist_ok=True)
    index = len(os.listdir(results_dir))  # official DiT's numbering: entries already there
    while True:
        path = os.path.join(results_dir, f"{index:03d}-{label}")
        try:
            os.mkdir(path)  # fails if another job took this number between listdir and here
            return path
        except FileExistsError:
            index += 1


def run_folder(results_dir, label, exp_name=None):
    """The run folder: <results_dir>/<exp_name> (reused as is) or a new <results_dir>/<NNN>-<label>."""
    if exp_name is None:
        return create_numbered_folder(results_dir, label)
    path = os.path.join(results_dir, exp_name)
    os.makedirs(path, exist_ok=True)
    return path


def checkpoint_steps(checkpoint_dir):
    """{step: path} of the complete checkpoints in checkpoint_dir (temp files are not checkpoints)."""
    if not os.path.isdir(checkpoint_dir):
        return {}
    found = {}
    for name in os.listdir(checkpoint_dir):
        match = CHECKPOINT_NAME.match(name)
        if match:
            found[int(match.group(1))] = os.path.join(checkpoint_dir, name)
    return found


def newest_checkpoint(checkpoint_dir):
    """Path of the newest readable checkpoint, or None; a file cut short (not a whole zip) is skipped.

    torch.save writes a zip archive whose directory sits at its end, so a truncated or empty file fails
    zipfile.is_zipfile, which reads only that end: cheap even for a 7 GB checkpoint.
    """
    for step, path in sorted(checkpoint_steps(checkpoint_dir).items(), reverse=True):
        if zipfile.is_zipfile(path):
            return path
    return None


def remove_stale_temp_files(*folders):
    """Delete the hidden temp files that saves killed mid-write left behind; returns their paths."""
    removed = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if STALE_TEMP.match(name) and os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return removed


def prune_checkpoints(checkpoint_dir, keep_last, keep_every=None):
    """Delete all but the keep_last newest checkpoints, sparing steps that are multiples of keep_every.

    Returns the deleted paths. Called after a save completed, so the newest checkpoint is always whole.
    """
    steps = sorted(checkpoint_steps(checkpoint_dir).items(), reverse=True)
    removed = []
    for step, path in steps[keep_last:]:
        if keep_every and step % keep_every == 0:
            continue  # a milestone, kept for evaluation
        os.remove(path)
        removed.append(path)
    return removed


def resolve_run(results_dir, label, exp_name=None, resume=None):
    """(run folder, checkpoint to resume or None, removed temp files) for --exp-name/--resume; rank 0 only.

    resume=None starts fresh; a path continues that checkpoint in its own run folder; "auto" continues
    the newest complete checkpoint of <results_dir>/<exp_name>, or starts fresh there if it has none.
    Hidden temp files of saves killed mid-write are removed from the folder first.
    """
    if resume is not None and resume != "auto":
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(resume)))
    else:
        run_dir = run_folder(results_dir, label, exp_name)
    removed = remove_stale_temp_files(run_dir, os.path.join(run_dir, "checkpoints"))
    if resume == "auto":
        return run_dir, newest_checkpoint(os.path.join(run_dir, "checkpoints")), removed
    return run_dir, resume, removed
