"""Several processes under torchrun: DistributedDataParallel, rank 0 alone printing, and agreement between ranks.

Without torchrun (or with one process) every function here is the single-process identity.
"""
import importlib
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_control_group = None  # a gloo group for small CPU exchanges that must not wait on the GPU stream


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def is_main_process():
    return rank() == 0


def launched_by_torchrun():
    """Whether torchrun started this process (it forwards a Ctrl-C to its workers, who then see it twice)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def setup(device):
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) when it started several processes.

    Returns the device this process trains on: cuda:LOCAL_RANK on CUDA. Other ranks than 0 print nothing.
    """
    global _control_group
    if world_size() == 1:
        return device
    # torch.distributed.nn.functional, which building a DistributedDataParallel imports, takes the default group
    # as its functions' default argument when it is imported. Imported here, before the group exists, that
    # default is None; imported later, it would keep the group alive past teardown, and the group's worker
    # threads would still be freeing its last collective's tensors while Python shuts down, which aborts the
    # process ("terminate called without an active exception")
    importlib.import_module("torch.distributed.nn.functional")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        _control_group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")
    return device


def teardown():
    """Leave the process group, called on the way out, also while an exception is on its way out.

    Such an exception's traceback keeps the frames it passed through, and their local variables (the wrapped model
    among them) keep the group alive past destroy_process_group, with the outcome setup's comment describes. The
    frames' local variables are dropped first (the traceback still prints in full, and a single process is left
    alone, for post-mortem debuggers). A frame keeps its function too, whose closure this cannot reach: code that
    runs with the model therefore takes it as an argument, not from a closure."""
    global _control_group
    if is_distributed():
        seen, errors = set(), [sys.exc_info()[1]]
        while errors:
            error = errors.pop()
            if error is not None and id(error) not in seen:
                seen.add(id(error))
                traceback.clear_frames(error.__traceback__)
                errors += [error.__cause__, error.__context__]
        dist.destroy_process_group()
    _control_group = None


def wrap(model):
    """The model in DistributedDataParallel (gradients averaged over ranks) in a process group, else itself."""
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def max_over_ranks(value):
    """The largest of every rank's integer value."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def min_over_ranks(value):
    """The smallest of every rank's integer value."""
    return _all_reduce(value, dist.ReduceOp.MIN)


def _all_reduce(value, op):
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=op, group=_control_group)
    return int(t)


def gather(obj):
    """The list of every rank's obj, in rank order."""
    if not is_distributed():
        return [obj]
    objs = [None] * world_size()
    dist.all_gather_object(objs, obj, group=_control_group)
    return objs


def from_main(compute):
    """compute() run on rank 0 alone, its result handed to every rank."""
    result = [compute() if is_main_process() else None]
    if is_distributed():
        dist.broadcast_object_list(result, src=0, group=_control_group)
    return result[0]


def barrier():
    if is_distributed():
        dist.barrier(group=_control_group)
