"""Drift of 16-bit weights under MeZO's perturb/restore cycles, and accuracy of tiny updates.

For bfloat16 and float16 weights drawn from N(0, 0.02):

1. drift: repeat the central estimator's passes +εz, −2εz, +εz (a new seed per cycle, no
   update) and report, after 1, 10, 100, 1000 cycles, the fraction of weights whose bits differ
   from the start and the RMS drift in units of each weight's storage ulp at the start, for the
   plain perturbation (round to nearest even) and for fastzo's exact mode (integer steps on the
   per-tensor grid; its start is the snapped weights, the one-time snap is reported separately);
2. updates: apply pure updates θ ← θ − lr·g·z with lr·g = 1 % of the storage ulp at the weights'
   rms (the size of a typical MeZO update, lr ≈ 1e-6, on N(0, 0.02) weights) and report the
   applied update projected on z against the intended one, for round to nearest and stochastic
   rounding, plain and exact (in exact mode the intended update of a weight at or above T is
   scaled by r = q / grid spacing, docs/lowprec.md).

    python benchmarks/lowprec_drift.py            # 1e6 weights, 1000 cycles, backend "auto"
    python benchmarks/lowprec_drift.py --n 100000 --cycles 100 --backend torch

Writes benchmarks/results/lowprec_drift.csv (one row per measurement).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastzo  # noqa: E402
from fastzo import noise  # noqa: E402

MBITS = {torch.bfloat16: 7, torch.float16: 10}
NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
FIELDS = ["dtype", "measure", "mode", "backend", "n", "cycles", "changed_fraction", "rms_drift_ulps",
          "max_drift_ulps", "rms_drift_ulps_at_rms", "intended_ulps", "applied_over_intended",
          "stderr", "seconds"]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Storage spacing at |x| (normal range; the subnormal spacing below it), float64."""
    finfo = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(torch.clamp(x.double().abs(), min=finfo.tiny)))
    return torch.exp2(exponent - MBITS[dtype])


def pick_backend(name: str) -> str:
    if name != "auto":
        return name
    names = fastzo.available_backends()
    for candidate in ("cpp", "triton", "torch"):  # fastest on a CPU first
        if candidate in names and (candidate != "triton" or torch.cuda.is_available()):
            return candidate
    return "torch"


def exact_backend(backend: str) -> str:
    """The backend exact passes run on (the named one if it implements exact mode)."""
    from fastzo.backends import get_backend

    return backend if hasattr(get_backend(backend), "exact_perturb_") else "torch"


def start_weights(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


def drift_stats(w, start, dtype):
    """Changed fraction; RMS and max drift in ulps of each weight's start value (tiny weights
    have tiny ulps, so these weigh them heavily); RMS drift in ulps at the weights' rms."""
    changed = (w.view(torch.int16) != start.view(torch.int16)).double().mean().item()
    delta = w.double() - start.double()
    drift = delta / ulp(start, dtype)
    at_rms = delta / ulp(start.double().pow(2).mean().sqrt(), dtype)
    return (changed, drift.pow(2).mean().sqrt().item(), drift.abs().max().item(),
            at_rms.pow(2).mean().sqrt().item())


def run_drift(dtype, mode, n, cycles, checkpoints, backend, eps, base_seed, rows):
    w = start_weights(n, dtype)
    q = None
    if mode == "exact":
        q = fastzo.exact_quantum(w, eps)
        before = w.clone()
        fastzo.snap_to_grid_([w], [q])
        snap = (w.double() - before.double()) / q
        rows.append(dict(dtype=NAMES[dtype], measure="snap", mode=mode, backend=backend, n=n, cycles=0,
                         changed_fraction=(w != before).double().mean().item(),
                         rms_drift_ulps=((w.double() - before.double()) / ulp(before, dtype)).pow(2).mean().sqrt().item(),
                         max_drift_ulps=snap.abs().max().item()))
        print(f"  {NAMES[dtype]} snap onto the grid (q = 2**{math.frexp(q)[1] - 1}): "
              f"{rows[-1]['changed_fraction']:.1%} of weights changed, at most "
              f"{rows[-1]['max_drift_ulps']:.2f} q")
    start = w.clone()
    t0 = time.perf_counter()
    for cycle in range(1, cycles + 1):
        seed = noise.step_seed(base_seed, cycle)
        if mode == "exact":
            for multiple in (1, -2, 1):
                fastzo.exact_perturb_([w], seed, eps, multiple, [q], backend=backend)
        else:
            for scale in (eps, -2 * eps, eps):
                fastzo.perturb_([w], seed, scale, backend=backend)
        if cycle in checkpoints:
            changed, rms, worst, at_rms = drift_stats(w, start, dtype)
            seconds = time.perf_counter() - t0
            rows.append(dict(dtype=NAMES[dtype], measure="drift", mode=mode, backend=backend, n=n,
                             cycles=cycle, changed_fraction=changed, rms_drift_ulps=rms,
                             max_drift_ulps=worst, rms_drift_ulps_at_rms=at_rms, seconds=seconds))
            print(f"  {NAMES[dtype]:8s} {mode:5s} after {cycle:5d} cycles: {changed:7.2%} changed, "
                  f"rms drift {rms:8.2f} ulp (own), {at_rms:6.3f} ulp (at rms), max {worst:8.0f} ulp "
                  f"({seconds:.0f} s)", flush=True)


def run_updates(dtype, n, updates, backend, eps, rows):
    """Pure updates of 1 % of an ulp at the weights' rms, accumulated over `updates` seeds."""
    base = start_weights(n, dtype, seed=1)
    rms = base.double().pow(2).mean().sqrt()
    step = 0.01 * ulp(rms, dtype).item()  # lr·g with lr = step, g = 1
    q = fastzo.exact_quantum(base, eps)
    for mode, sr in (("plain", False), ("plain", True), ("exact", False), ("exact", True)):
        w = base.clone()
        quanta = None
        if mode == "exact":
            quanta = [q]
            fastzo.snap_to_grid_([w], quanta)
        start = w.clone()
        be = exact_backend(backend) if mode == "exact" else backend
        ratios = []
        t0 = time.perf_counter()
        for u in range(updates):
            seed = noise.step_seed(77, u)
            before = w.clone()
            fastzo.restore_and_update_([w], seed, 0.0, step, 1.0, stochastic_rounding=sr, backend=be,
                                       exact_quanta=quanta)
            z = fastzo.zo_noise(n, seed, 0).double()
            r = torch.ones_like(z)
            if mode == "exact":
                e = math.frexp(q)[1] - 1
                r = noise.update_scale(before.view(torch.int16).long() & 0xFFFF, e,
                                       noise.FORMATS16[dtype]).double()
            applied = (w.double() - before.double()) * z  # intended: -step * r * z, projected on z
            ratios.append((applied.mean() / (-step * (r * z.pow(2)).mean())).item())
        mean = sum(ratios) / len(ratios)
        sd = math.sqrt(sum((r - mean) ** 2 for r in ratios) / max(1, len(ratios) - 1))
        rounding = "SR" if sr else "RNE"
        changed = (w != start).double().mean().item()
        rows.append(dict(dtype=NAMES[dtype], measure="update", mode=f"{mode}+{rounding}", backend=be,
                         n=n, cycles=updates, changed_fraction=changed, intended_ulps=0.01,
                         applied_over_intended=mean, stderr=sd / math.sqrt(len(ratios)),
                         seconds=time.perf_counter() - t0))
        print(f"  {NAMES[dtype]:8s} update {mode}+{rounding:3s}: applied/intended = {mean:.4f} "
              f"± {sd / math.sqrt(len(ratios)):.4f} over {updates} updates "
              f"({changed:.1%} of weights moved)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="weights per tensor")
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=20, help="update seeds averaged")
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--backend", default="auto", help="auto (cpp, else torch), cpp, torch, triton")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "lowprec_drift.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    backend = pick_backend(args.backend)
    checkpoints = {c for c in (1, 10, 100, 1000, 10000) if c <= args.cycles} | {args.cycles}
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    print(f"backend {backend} (exact passes on {exact_backend(backend)}), n = {args.n}, "
          f"eps = {args.eps}, {args.cycles} cycles of +eps z, -2 eps z, +eps z")
    rows: list[dict] = []
    for dtype in dtypes:
        run_updates(dtype, args.n, args.updates, backend, args.eps, rows)
        run_drift(dtype, "plain", args.n, args.cycles, checkpoints, backend, args.eps, 1, rows)
        run_drift(dtype, "exact", args.n, args.cycles, checkpoints, exact_backend(backend), args.eps, 1, rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
