"""Several processes, one run: torchrun's launch, on PyTorch's own engine (torch.distributed).

    torchrun --nproc_per_node 2 train.py --images ./dog --class dog

torchrun starts one process per GPU and tells each its rank and the world size through the
environment (RANK, WORLD_SIZE, LOCAL_RANK); on the CPU the processes talk through the gloo backend.
A plain `python train.py` is the world of one, and goes through the same code.

How train.py uses it:
- every process draws the random numbers of the whole global batch and keeps its share
  (minidb/loop.py), so the run is the same whatever the number of processes;
- the trained modules are wrapped in DistributedDataParallel, which averages their gradients;
- the class prior is drawn in shards (minidb/dreambooth.py: class_prior), one cache for all;
- only rank 0 writes (checkpoints, logs, grids, the model); the others wait at barriers.
"""

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def start(device):
    """Join torchrun's process group when launched by it; returns (rank, world size, device), where a
    CUDA device becomes this process's own card."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    cuda = device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def rank_and_world():
    """(this process's rank, how many processes): (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier():
    if rank_and_world()[1] > 1:
        dist.barrier()


def share(value):
    """Rank 0's `value` (any picklable object, e.g. a path), on every rank."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(values):
    """The sum of a float tensor over all ranks (a copy); one rank: the tensor itself."""
    if rank_and_world()[1] == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def finish():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Step(nn.Module):
    """A training step's forward pass as one module, so that DistributedDataParallel can wrap it: it
    holds what trains (whose gradients DDP averages across processes) and runs `forward`."""

    def __init__(self, trained, forward):
        super().__init__()
        self.trained = nn.ModuleDict(trained)
        self.run = forward

    def forward(self, *args):
        return self.run(*args)


def wrap(step, device):
    """DistributedDataParallel around `step` under torchrun; the module itself for one process."""
    if rank_and_world()[1] == 1:
        return step
    device = torch.device(device)
    return nn.parallel.DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
