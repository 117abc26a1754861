"""Time of one pass over 16-bit weights: plain vs exact mode, perturb and restore-and-update.

    flock /tmp/fastzo-bench.lock python benchmarks/lowprec_passes.py [--n 1000000] [--backend cpp]

Median of --repeats timed calls after one warm-up; writes benchmarks/results/lowprec_passes.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastzo  # noqa: E402


def timed(fn, repeats):
    fn(0)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i + 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--backend", default="cpp" if "cpp" in fastzo.available_backends() else "torch")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "lowprec_passes.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    device = "cuda" if args.backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        w = (torch.randn(args.n) * 0.02).to(dtype).to(device)
        q = fastzo.exact_quantum(w, 1e-3)
        fastzo.snap_to_grid_([w], [q])
        for dist in ("gaussian", "rademacher"):
            common = dict(distribution=dist, backend=args.backend)
            cases = {
                ("perturb", "plain"): lambda s: fastzo.perturb_([w], s, 1e-3, **common),
                ("perturb", "exact"): lambda s: fastzo.exact_perturb_([w], s, 1e-3, 1, [q], **common),
                ("update", "plain"): lambda s: fastzo.restore_and_update_([w], s, 1e-3, 1e-6, 1.0, **common),
                ("update", "exact"): lambda s: fastzo.restore_and_update_([w], s, 1e-3, 1e-6, 1.0,
                                                                          exact_quanta=[q], **common),
            }
            for (pass_, mode), fn in cases.items():
                seconds = timed(fn, args.repeats)
                rows.append(dict(backend=args.backend, dtype=str(dtype).replace("torch.", ""),
                                 distribution=dist, pass_=pass_, mode=mode, n=args.n,
                                 ms=round(seconds * 1e3, 3)))
                print(f"{args.backend} {rows[-1]['dtype']:8s} {dist:10s} {pass_:7s} {mode:5s} "
                      f"{seconds * 1e3:7.2f} ms", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
