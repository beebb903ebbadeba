"""Several processes, one run: torchrun's launch, on PyTorch's own engine (torch.distributed).

    torchrun --nproc_per_node 2 train.py --images ./dog --class dog

torchrun starts one process per GPU (or per CPU process group, with the gloo backend) and tells each
its rank and the world size through the environment. A plain `python train.py` is the world of one.
"""

import torch.distributed as dist


def rank_and_world():
    """(this process's rank, how many processes): (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
