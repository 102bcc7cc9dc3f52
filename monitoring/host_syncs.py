"""Count the operations that make a device step wait for the host (STYLE.md "Hot loops"), on any device.

    with HostSyncCounter() as syncs:
        train_step(...)
    assert syncs.events == []

On a GPU, torch.cuda.set_sync_debug_mode("warn") reports syncs as they happen; this dispatch mode finds
the same causes on a CPU-only machine, where nothing ever waits:
  * scalar reads: .item(), bool(), float(), int() of a tensor (aten._local_scalar_dense), torch.equal;
  * data-dependent output sizes: nonzero, masked_select, unique, bincount, boolean-mask indexing, and
    repeat_interleave without output_size: the device must report the size before the host can go on;
  * host data in the step: torch.tensor(python values) (aten.lift_fresh), which on a GPU is a blocking copy;
  * blocking copies between devices (aten._to_copy / copy_ with non_blocking=False). On a CPU-only machine
    every tensor is on the CPU, so run the step on the "meta" device to see them: a host constant copied to
    the device inside the step then shows up as a copy from cpu to meta.
"""

import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SCALAR_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
DATA_DEPENDENT = {aten.nonzero.default, aten.masked_select.default, aten.bincount.default,
                  aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                  aten.nonzero_static.default}
HOST_DATA = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
COPIES = {aten._to_copy.default, aten.copy_.default}


def _devices(values):
    """Devices of the tensors among values (one level of lists/tuples)."""
    found = set()
    for value in values:
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, torch.Tensor):
                found.add(item.device.type)
    return found


def _caller():
    """'file:line function' of the innermost frame outside torch and this module: the line that synced."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if f"{os.sep}torch{os.sep}" not in frame.filename and not frame.filename.endswith("host_syncs.py"):
            return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """Dispatch mode recording each host-sync cause as (kind, op name, where) in .events; computes nothing else."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = None
        if func in SCALAR_READS:
            kind = "scalar read"
        elif func in DATA_DEPENDENT:
            kind = "data-dependent size"
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            kind = "data-dependent size"
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            kind = "data-dependent size"  # boolean-mask indexing runs nonzero inside
        elif func in HOST_DATA:
            kind = "host data"
        elif func in COPIES and not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2]):
            target = kwargs.get("device")
            devices = _devices(args[:2]) | ({torch.device(target).type} if target is not None else set())
            if len(devices) > 1:
                kind = "blocking copy " + " -> ".join(sorted(devices))
        if kind is not None:
            self.events.append((kind, str(func.overloadpacket.__name__), _caller()))
            if kind == "scalar read" and any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
                return True  # meta tensors hold no values; a truthy 1 lets the counted code run on
        return func(*args, **kwargs)

    def summary(self):
        """{kind: count}."""
        counts = {}
        for kind, _, _ in self.events:
            counts[kind] = counts.get(kind, 0) + 1
        return counts
