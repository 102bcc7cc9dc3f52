"""The run folder of a training job: its name, its checkpoints, what survives a kill and what is pruned.

<results-dir>/NAME with --exp-name NAME (a requeued job finds its own folder again), otherwise official
DiT's <results-dir>/NNN-<model>, numbered by an os.mkdir that fails if the name is taken, so two jobs
started together never share a folder. Checkpoints are <run>/checkpoints/<step:07d>.pt, written through
foundation.atomic_file, so a file with that name is always complete; a kill during a save leaves a hidden
.<step:07d>.pt.*.tmp sibling, removed at the next start. A run folder is held by one job at a time
(storage/run_lock.py). --resume auto continues the newest checkpoint that is whole and matches its checksum
(storage/checkpoint_integrity.py), saying which newer ones it skipped and why.
"""
import os
import re

from foundation.atomic_file import TEMP_FILE, writer_is_gone
from foundation.usage_error import UsageError
from storage.checkpoint_integrity import integrity_problem

CHECKPOINT_NAME = re.compile(r"^(\d{7,})\.pt$")  # <step:07d>.pt (more digits past 9,999,999 steps)


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


def newest_readable_checkpoint(checkpoint_dir):
    """(path of the newest whole checkpoint or None, [(path, why unreadable)] of the newer ones passed over).

    A file cut short or damaged (its checksum does not match) is passed over for the next older one. Each
    candidate is hashed in full (storage/checkpoint_integrity.py), newest first, until one is whole.
    """
    skipped = []
    for step, path in sorted(checkpoint_steps(checkpoint_dir).items(), reverse=True):
        problem = integrity_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def newest_checkpoint(checkpoint_dir):
    """Path of the newest readable checkpoint, or None (newest_readable_checkpoint without the skipped list)."""
    return newest_readable_checkpoint(checkpoint_dir)[0]


def remove_stale_temp_files(*folders, held=False):
    """Delete the hidden temp files that saves killed mid-write left behind; returns their paths.

    held: the caller holds these folders (storage/run_lock.py), so no other job writes there and every temp
    file is stale; otherwise only the files of writers that are certainly dead (atomic_file.writer_is_gone).
    """
    removed = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if TEMP_FILE.match(name) and (held or writer_is_gone(name)) and os.path.isfile(path):
                try:
                    os.remove(path)
                except FileNotFoundError:  # its writer renamed or removed it after all
                    continue
                removed.append(path)
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


def resolve_run(results_dir, label, exp_name=None, resume=None, lock=None):
    """(run folder, checkpoint to resume or None, removed temp files, skipped checkpoints) for --exp-name and
    --resume; rank 0 only.

    resume=None starts fresh; a path continues that checkpoint in its own run folder (it must be whole);
    "auto" continues the newest whole checkpoint of <results_dir>/<exp_name>, or starts fresh there if the
    folder has no checkpoint at all. Skipped: [(path, why)] of newer checkpoints --resume auto could not read.
    lock (a storage.run_lock.RunFolderLock) takes the folder first; then the temp files of saves killed
    mid-write are removed. A UsageError names a folder held by another job, a --resume checkpoint that is not
    whole, and (--resume auto) a folder whose checkpoints are all unreadable.
    """
    if resume is not None and resume != "auto":
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(resume)))
    else:
        run_dir = run_folder(results_dir, label, exp_name)
    if lock is not None:
        lock.acquire(run_dir)
    removed = remove_stale_temp_files(run_dir, os.path.join(run_dir, "checkpoints"), held=lock is not None)
    if resume != "auto":
        problem = integrity_problem(resume) if resume is not None and os.path.isfile(resume) else None
        if problem is not None:
            raise UsageError(f"cannot read checkpoint {resume}: {problem}")
        return run_dir, resume, removed, []
    checkpoint_dir = os.path.join(run_dir, "checkpoints")
    path, skipped = newest_readable_checkpoint(checkpoint_dir)
    if path is None and skipped:
        found = "; ".join(f"{os.path.basename(p)} ({why})" for p, why in skipped)
        raise UsageError(f"--resume auto: no readable checkpoint in {checkpoint_dir}, found only {found}; "
                         f"restore a good copy, or move them away to start over from step 0")
    return run_dir, path, removed, skipped
