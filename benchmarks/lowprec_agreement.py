"""How often the backends' exact-mode results differ from the oracle's (backend "torch").

For bfloat16 and float16 weights N(0, 0.02) on their grid, Gaussian and Rademacher z: one exact
perturbation (multiple −2), then a restore-and-update with stochastic rounding, on every
available backend and on the oracle. Reports the fraction of elements whose stored bits differ
and the largest difference in grid steps. Rademacher z must agree everywhere; Gaussian z may
differ at rare rounding boundaries (a fast backend's z is within a few float32 ulp of the
oracle's). On a machine without a GPU the Triton kernel runs in the interpreter.

    python benchmarks/lowprec_agreement.py [--n 1000000]

Writes benchmarks/results/lowprec_agreement.csv.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastzo  # noqa: E402
from fastzo import noise  # noqa: E402
from fastzo.backends import get_backend, supports  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "lowprec_agreement.csv"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = [b for b in fastzo.available_backends()
                if b != "torch" and supports(b, device) and hasattr(get_backend(b), "exact_perturb_")]
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        fmt = noise.FORMATS16[dtype]
        g = torch.Generator().manual_seed(0)
        start = (torch.randn(args.n, generator=g) * 0.02).to(dtype).to(device)
        q = fastzo.exact_quantum(start, 1e-3)
        e = math.frexp(q)[1] - 1
        fastzo.snap_to_grid_([start], [q])
        for distribution in ("gaussian", "rademacher"):
            results = {}
            for backend in ["torch"] + backends:
                w = start.clone()
                fastzo.exact_perturb_([w], 12345, 1e-3, -2, [q], distribution=distribution,
                                      backend=backend)
                perturbed = w.clone()
                fastzo.restore_and_update_([w], 12345, 1e-3, 1e-4, 0.8, distribution=distribution,
                                           backend=backend, exact_quanta=[q])
                results[backend] = (perturbed.cpu(), w.cpu())
            for backend in backends:
                for stage, idx in (("perturb", 0), ("update", 1)):
                    got, want = results[backend][idx], results["torch"][idx]
                    differ = (got.view(torch.int16) != want.view(torch.int16))
                    steps = (noise.grid_index(got.view(torch.int16).long() & 0xFFFF, e, fmt)
                             - noise.grid_index(want.view(torch.int16).long() & 0xFFFF, e, fmt)).abs()
                    rows.append(dict(dtype=fmt.name, distribution=distribution, backend=backend,
                                     stage=stage, n=args.n, differing=int(differ.sum()),
                                     fraction=differ.double().mean().item(),
                                     max_grid_steps=int(steps.max())))
                    print(f"{fmt.name:8s} {distribution:10s} {backend:6s} {stage:7s}: "
                          f"{rows[-1]['differing']} of {args.n} differ from the oracle "
                          f"(max {rows[-1]['max_grid_steps']} grid step)", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["dtype"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
