"""Fine-tune directly on accuracy, a non-differentiable objective, with fastzo.MeZO.

    python examples/accuracy_objective.py --steps 200

Backprop cannot optimise accuracy: it is piecewise constant, its gradient is zero almost
everywhere. MeZO only needs the objective's value at θ + εz and θ − εz, so the closure can
return −accuracy (MeZO minimises). ε must be large enough for some predictions in the batch to
flip between the two evaluations, and the batch large enough for accuracy to be a fine-grained
number; otherwise L+ = L− and the step is zero.

The model starts from a cross-entropy fit of a few steps (a "pretrained" model) on the synthetic
task of examples/plain_loop.py and is then fine-tuned on accuracy alone.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

try:
    import fastzo
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import fastzo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_loop import accuracy, build_model, make_batch  # noqa: E402  the same task and model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=30, help="cross-entropy MeZO steps first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)

    model = build_model(args.seed)
    model.eval()
    data = torch.Generator().manual_seed(args.seed + 1)
    test_tokens, test_labels = make_batch(2000, torch.Generator().manual_seed(12345))

    # A short differentiable warm-up (MeZO on cross-entropy) stands in for a pretrained model.
    warm = fastzo.MeZO(model.parameters(), lr=0.5, eps=1e-3, seed=args.seed, backend=args.backend)
    for _ in range(args.warmup_steps):
        tokens, labels = make_batch(64, data)
        warm.step(lambda: F.cross_entropy(model(tokens), labels))
    before = accuracy(model, test_tokens, test_labels)

    # Fine-tuning on −accuracy: the closure returns a Python float, not a tensor with a graph.
    opt = fastzo.MeZO(model.parameters(), lr=args.lr, eps=args.eps, seed=args.seed + 1, backend=args.backend)
    moved = 0
    for step in range(1, args.steps + 1):
        tokens, labels = make_batch(args.batch_size, data)

        def closure():
            return -(model(tokens).argmax(-1) == labels).float().mean().item()

        opt.step(closure)
        moved += opt.last_step.projected_grad != 0.0
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"step {step:4d}  batch accuracy {-opt.last_step.loss:.3f}  "
                  f"held-out accuracy {accuracy(model, test_tokens, test_labels):.3f}")
    after = accuracy(model, test_tokens, test_labels)
    print(f"held-out accuracy: {before:.3f} -> {after:.3f} ({moved}/{args.steps} steps saw a change)")
    return {"before": before, "after": after, "steps_with_signal": moved}


if __name__ == "__main__":
    main()
