"""The learning rate of each step: constant (the paper, official DiT) or linear warmup then cosine decay to zero.

Short runs (the Fashion-MNIST quick start) reach a lower loss when the lr anneals to zero by the last step: the
final updates average out the gradient noise that a constant lr keeps injecting (Loshchilov & Hutter 2017, SGDR).
The lr is a pure function of the step, so a resumed run takes the same lr at the same step as a straight one.
"""
import math

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(step, base_lr, schedule="constant", warmup_steps=0, total_steps=None):
    """The lr of update number step + 1 (step = updates done so far, 0-based).

    Warmup: base_lr * (step + 1) / warmup_steps for the first warmup_steps updates (the first update is not 0).
    Cosine: base_lr * (1 + cos(pi * s / S)) / 2 with s = step - warmup_steps, S = total_steps - warmup_steps, so
    the lr falls from base_lr after warmup to base_lr * (1 - cos(pi / S)) / 2 at the last update (near zero).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if total_steps is None or total_steps <= warmup_steps:
        raise ValueError(f"a cosine lr schedule needs total_steps > warmup_steps ({warmup_steps}), got {total_steps}")
    progress = min(step - warmup_steps, total_steps - warmup_steps) / (total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
