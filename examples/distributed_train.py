"""Data-parallel MeZO fine-tuning with fastzo: runs on a CPU-only machine as written.

    torchrun --nproc_per_node=2 examples/distributed_train.py
    torchrun --nproc_per_node=2 examples/distributed_train.py --fsdp          # sharded weights
    torchrun --nproc_per_node=2 examples/distributed_train.py --directions 4 --split-directions
    python examples/distributed_train.py                                       # one process

Each rank evaluates the loss on its own slice of every global batch; the optimizer exchanges
the ranks' two loss values once per step (an all-gather of 56 bytes per rank), so every rank
applies the same update and the replicas stay bit-identical: no gradient or weight is ever
communicated. With --fsdp the model is sharded with FSDP2 and each rank perturbs and updates only
its own shard. See docs/distributed.md.

The task is a small regression problem: a student MLP learns a fixed random teacher MLP from
synthetic inputs that every rank draws from the same seeded generator.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

try:
    import fastzo
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import fastzo
from fastzo.distributed import check_replicas


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over ranks")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="MeZO base seed (same on every rank)")
    parser.add_argument("--directions", type=int, default=1, help="q directions per step")
    parser.add_argument("--split-directions", action="store_true",
                        help="deal the q directions to the ranks (every rank sees the whole batch)")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2")
    parser.add_argument("--backend", default=None, help="fastzo kernel backend (default: fastest)")
    parser.add_argument("--checkpoint", default=None, help="save model + optimizer state here")
    parser.add_argument("--resume", default=None, help="resume from a checkpoint (any world size)")
    parser.add_argument("--log-every", type=int, default=50)
    return parser.parse_args()


def setup():
    """Join the process group that torchrun (or accelerate launch) describes; else run alone."""
    if "RANK" not in os.environ:
        return None, 0, 1
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # A bounded timeout: a rank that dies makes the others fail within it instead of hanging.
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=datetime.timedelta(seconds=120))
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size()


def mlp(width=32):
    return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))


def main():
    args = parse_args()
    group, rank, world = setup()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(1234)  # same initial weights on every rank
    teacher = mlp(64).to(device)
    model = mlp().to(device)
    if args.resume:
        checkpoint = torch.load(args.resume, map_location=device)
        model.load_state_dict(checkpoint["model"])
    if args.fsdp:
        if group is None:
            raise SystemExit("--fsdp needs a process group: launch with torchrun")
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)

    opt = fastzo.MeZO(model.parameters(), lr=args.lr, eps=args.eps, seed=args.seed,
                      backend=args.backend, num_directions=args.directions,
                      process_group=group, split_directions=args.split_directions)
    if args.resume:
        opt.load_state_dict(checkpoint["optim"])  # no world-size dependence: any world resumes

    data = torch.Generator().manual_seed(5678)  # same batches on every rank
    batch_size = args.batch_size if args.split_directions else args.batch_size // world

    def batch_for(step):
        X = torch.randn(args.batch_size, 16, generator=data.manual_seed(5678 + step)).to(device)
        with torch.no_grad():
            y = teacher(X)
        if not args.split_directions:  # data parallel: this rank's slice of the global batch
            X, y = X[rank * batch_size:(rank + 1) * batch_size], y[rank * batch_size:(rank + 1) * batch_size]
        return X, y

    start, first = time.perf_counter(), None
    for _ in range(args.steps):
        X, y = batch_for(opt.step_count)
        loss = opt.step(lambda: torch.nn.functional.mse_loss(model(X), y))
        first = loss if first is None else first
        if rank == 0 and (opt.step_count % args.log_every == 0 or opt.step_count == 1):
            print(f"step {opt.step_count:5d}  loss {loss:.5f}", flush=True)
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(f"{args.steps} steps on {world} rank(s) in {elapsed:.1f} s; loss {first:.5f} -> {loss:.5f}")
        if opt._dist is not None:
            stats = opt._dist.stats
            print(f"communicated per step: {stats['bytes_sent'] / args.steps:.0f} bytes sent, "
                  f"{stats['bytes_received'] / args.steps:.0f} bytes received per rank "
                  f"({stats['exchanges']} exchanges)")
    if group is not None and not args.fsdp:
        check_replicas(model.parameters(), group)  # raises if any rank's weights differ
        if rank == 0:
            print(f"replicas identical on all {world} ranks")
    if args.checkpoint:
        state = model.state_dict()
        if args.fsdp:  # gather the shards into full tensors (every rank takes part)
            state = {k: v.full_tensor() for k, v in state.items()}
        if rank == 0:
            torch.save({"model": state, "optim": opt.state_dict()}, args.checkpoint)
            print(f"saved {args.checkpoint}")
    if group is not None:
        dist.barrier()  # let rank 0 finish saving: a rank tearing gloo down early can abort
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
