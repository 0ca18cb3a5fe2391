"""Trains a tiny MoE language model for a few steps with expert parallelism.

    torchrun --nproc-per-node 2 distributed/examples/train_ep.py            # one node (CPU: gloo, GPUs: NCCL)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 distributed/examples/train_ep.py         # every node, the same command

The backend follows the device: NCCL with one GPU per process when CUDA is
available, else gloo on CPU; nothing else changes. Every MoE layer's experts
are sharded over all ranks (ExpertParallel on a 1-D mesh), the other
parameters are data parallel (their gradients averaged over ranks here; FSDP
would do the same). Each rank trains on its own batch of random tokens (the
same batch every step, so the loss must fall) and rank 0 prints the loss
averaged over ranks, one line per step: ``step 3 loss 4.1234``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

from torch_moe_ops.distributed import ExpertParallel
from torch_moe_ops.nn import MoE, MoEConfig


class TinyMoELM(nn.Module):
    """Embedding, residual MoE layers with RMSNorm, a tied-free head."""

    def __init__(self, vocab: int, config: MoEConfig, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, config.hidden)
        self.norms = nn.ModuleList(nn.RMSNorm(config.hidden) for _ in range(layers))
        self.moes = nn.ModuleList(MoE(config) for _ in range(layers))
        self.head = nn.Linear(config.hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))[0]
        return self.head(h)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dispatch", choices=("splits", "capacity"), default="splits")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda" if cuda else "cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))

    torch.manual_seed(0)  # the same initial model on every rank
    config = MoEConfig(hidden=32, intermediate=64, num_experts=max(4, 2 * world), top_k=2)
    model = TinyMoELM(vocab=64, config=config, layers=2).to(device)
    for moe in model.moes:
        parallelize_module(moe, mesh, ExpertParallel(dispatch=args.dispatch, capacity_factor=2.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    ids = torch.randint(0, 64, (4, 16), generator=gen).to(device)
    for step in range(args.steps):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        # Data parallelism for everything but the experts (their DTensor
        # gradients already hold every rank's tokens).
        for p in model.parameters():
            if p.grad is not None and not isinstance(p, DTensor):
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step} loss {mean.item() / world:.4f}", flush=True)
    # Every rank done with its collectives before the group goes away.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch 2.14.1's gloo can abort the process at interpreter exit, after the
    # group is destroyed ("terminate called without an active exception"; 1
    # run in 3 on a Zen 5 host): leave without the C++ static teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
