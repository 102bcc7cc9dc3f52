"""Condition dropout for classifier-free guidance (Ho & Salimans, 2022): in training a share of the conditions is
replaced by a learned null condition, so one network is both the conditional and the unconditional model.

DiT drops class labels to the null class num_classes (LabelEmbedder), ADM likewise, the text DiT drops captions
to its learned null caption; all draw which to drop here.
"""
import torch

CFG_DROP_PROB = 0.1  # DiT's class_dropout_prob, the paper's label and caption dropout (App. C)


def drop_mask(batch_size, prob, device, force_drop_ids=None):
    """(N,) bool: which conditions become the null one, drawn with probability `prob`, or where force_drop_ids == 1.

    train.py passes force_drop_ids drawn for the whole global batch from its per-step generator (exact resume,
    any world size); without them the draw uses the global RNG, as official DiT.
    """
    if force_drop_ids is None:
        return torch.rand(batch_size, device=device) < prob
    return force_drop_ids == 1
