"""Run under torchrun (gloo, CPU): the DDP gradient equals the single-process gradient of the global batch.

python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_check.py OUT.json
"""

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddp
from config import ModelArgs
from model import MipNeRF
from ray_utils import Rays


def global_batch(n):
    gen = torch.Generator().manual_seed(7)
    o = torch.randn(n, 3, generator=gen) * 0.1 + torch.tensor([0.0, 0.0, 4.0])
    d = torch.randn(n, 3, generator=gen) * 0.2 + torch.tensor([0.0, 0.0, -1.0])
    ones = torch.ones(n, 1)
    rays = Rays(o, d, d / d.norm(dim=-1, keepdim=True), ones * 0.002, ones, ones * 2.0, ones * 6.0)
    return rays, torch.rand(n, 3, generator=gen)


def loss_of(model, rays, target):
    return sum(((rgb - target) ** 2).mean() for rgb, _, _ in model(rays))


def main():
    ddp.setup(torch.device('cpu'))
    rank, world = ddp.rank(), ddp.world_size()
    torch.manual_seed(0)
    model = MipNeRF(ModelArgs(num_samples=16, net_width=64, net_depth=4, skip_layer=2), randomized=False)
    reference = copy.deepcopy(model)
    net = torch.nn.parallel.DistributedDataParallel(model)
    per_rank = 64
    rays, target = global_batch(per_rank * world)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    loss_of(net, Rays(*(r[mine] for r in rays)), target[mine]).backward()
    if rank == 0:
        loss_of(reference, rays, target).backward()
        errors = {
            name: float((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12))
            for (name, p), q in zip(model.named_parameters(), reference.parameters())
        }
        with open(sys.argv[1], 'w') as f:
            json.dump({'world_size': world, 'max_rel_error': max(errors.values()), 'errors': errors}, f)
    del net  # before cleanup: see ddp.cleanup
    ddp.cleanup()


if __name__ == '__main__':
    main()
