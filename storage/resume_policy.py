"""Which settings a resumed run may change: the lr is applied on purpose; the rest of the trajectory is fixed.

A resumed run must continue the run it resumes. Batch size, seed, EMA decay, the lr schedule and the data decide the
trajectory step by step (the saved data position counts batches of the saved size; the per-step
generator is seeded by the seed), so a different value is refused with both values named. The
learning rate is the one setting users change on purpose mid-run: it is written into the optimizer's
model group (the optimizer state would otherwise silently restore the old one) and logged. The
model, routing and diffusion (loss weighting) are checked against the checkpoint's configs elsewhere.
"""

from foundation.usage_error import UsageError

# argparse dest -> flag, for the settings a resume must keep
FIXED_ON_RESUME = {"global_batch_size": "--global-batch-size", "global_seed": "--global-seed",
                   "ema_decay": "--ema-decay", "lr_schedule": "--lr-schedule", "warmup_steps": "--warmup-steps"}


def dataset_identity(dataset):
    """What a resume compares about the data: its size and classes (its path may move, e.g. to local scratch)."""
    return {"num_samples": len(dataset), "num_classes": dataset.num_classes}


def check_fixed_settings(checkpoint, args, dataset_info, path):
    """Raise ValueError naming every trajectory setting whose value differs from the checkpoint's."""
    saved_args, differ = checkpoint.get("args", {}), []
    for dest, flag in FIXED_ON_RESUME.items():
        if dest in saved_args and saved_args[dest] != getattr(args, dest):
            differ.append(f"{flag} {saved_args[dest]} in the checkpoint, {getattr(args, dest)} now")
    saved_data = checkpoint.get("dataset", {})
    for key, value in dataset_info.items():
        if key in saved_data and saved_data[key] != value:
            differ.append(f"dataset {key.replace('_', ' ')} {saved_data[key]} in the checkpoint, {value} now")
    if differ:
        raise UsageError(f"cannot resume {path} with other trajectory settings ({'; '.join(differ)}); "
                         "restore them or start a new run")


def apply_learning_rate(optimizer, lr):
    """Set the model's parameter group (group 0) to lr; returns the lr the checkpoint was training with."""
    group = optimizer.param_groups[0]
    previous, group["lr"] = group["lr"], lr
    return previous
