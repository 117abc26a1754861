"""fastzo.MeZO in a plain PyTorch loop: forward passes only, a torch LR scheduler, a checkpoint.

    python examples/plain_loop.py --steps 300

The task is synthetic so that the example runs anywhere in seconds: a bag of token ids is
positive when it holds more "good" tokens (ids 2..9) than "bad" ones (ids 10..17); every other
token is noise. The model is an EmbeddingBag and a linear layer. Replace the model, the batches
and the loss with yours: the loop stays the same.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

try:
    import fastzo
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import fastzo

VOCAB, BAG = 40, 8


def make_batch(n: int, generator: torch.Generator):
    tokens = torch.randint(18, VOCAB, (n, BAG), generator=generator)
    signal = torch.randint(2, 18, (n, 3), generator=generator)  # three sentiment tokens per bag
    tokens[:, :3] = signal
    good = (signal < 10).sum(1)
    labels = (good >= 2).long()
    return tokens, labels


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.EmbeddingBag(VOCAB, 8, mode="mean"), nn.Linear(8, 2))


@torch.no_grad()
def accuracy(model, tokens, labels) -> float:
    return (model(tokens).argmax(-1) == labels).float().mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="fastzo backend (default: fastest available)")
    parser.add_argument("--checkpoint", default=None, help="save model + optimizer state here at the end")
    args = parser.parse_args(argv)

    model = build_model(args.seed)
    data = torch.Generator().manual_seed(args.seed + 1)
    test_tokens, test_labels = make_batch(2000, torch.Generator().manual_seed(12345))
    before = accuracy(model, test_tokens, test_labels)

    # The drop-in part: a torch.optim.Optimizer whose step() takes a closure that returns the
    # loss. No backward, no gradients: the closure runs at θ + εz and θ − εz.
    opt = fastzo.MeZO(model.parameters(), lr=args.lr, eps=args.eps, seed=args.seed, backend=args.backend)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    model.eval()  # MeZO's two forwards must see the same function: no dropout

    for step in range(1, args.steps + 1):
        tokens, labels = make_batch(args.batch_size, data)

        def closure():
            return F.cross_entropy(model(tokens), labels)

        loss = opt.step(closure)  # (L+ + L−)/2, a float
        scheduler.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            record = opt.last_step  # seed, loss_plus, loss_minus, projected_grad of this step
            print(f"step {step:4d}  loss {loss:.4f}  projected grad {record.projected_grad:+.3f}  "
                  f"lr {scheduler.get_last_lr()[0]:.4f}  held-out acc {accuracy(model, test_tokens, test_labels):.3f}")

    after = accuracy(model, test_tokens, test_labels)
    print(f"held-out accuracy: {before:.3f} -> {after:.3f}")
    if args.checkpoint:
        # The optimizer state is a few numbers (step, seeds); loading it resumes bit-identically.
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": scheduler.state_dict()}, args.checkpoint)
    return {"before": before, "after": after, "loss": loss, "steps": opt.step_count}


if __name__ == "__main__":
    main()
