"""Comparing float results across runs: which may be compared bitwise, and how far fp32 rounding may move the rest.

fp32 kernels pick their blocking, and so their summation order, by batch size, thread count and instruction
set (AVX2 / AVX-512). Two runs agree bitwise only with the same batch composition and the same thread count;
otherwise a test compares like with like or derives its tolerance from fp32 rounding and says how.
"""
import contextlib

import torch

FP32_EPS = torch.finfo(torch.float32).eps  # 2 ** -23


@contextlib.contextmanager
def intra_op_threads(n):
    """torch's intra-op thread count is n inside the block: match it to OMP_NUM_THREADS of the runs compared with."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def scale_one_guidance_bound(cond, uncond):
    """uncond + 1 * (cond - uncond) rounds twice in fp32, so it lies within eps * (|cond| + |uncond|) of cond."""
    return 2 * FP32_EPS * (cond.abs() + uncond.abs()).max().item()
