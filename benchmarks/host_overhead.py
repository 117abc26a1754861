"""Host time per pass of the Triton backend for a model of many tensors, kernel left out.

The kernel launch is replaced by a stub, so what is timed is everything fastzo does on the host
per pass: argument checks, grouping by dtype, the device-side table (built, or found in the
cache when the optimizer passes the same tensors again) and the launch arguments. Runs on CPU
tensors through the Triton backend's interpreter mode (the kernel itself never runs), so it
works without a GPU; on a GPU a table miss also pays a pinned host-to-device copy, which this
does not include.

    python benchmarks/host_overhead.py --tensors 300 --out benchmarks/results/host_overhead.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastzo  # noqa: E402
from fastzo.backends import triton_backend as tb  # noqa: E402
from fastzo.benchmark import cpu_name  # noqa: E402


class _NoLaunch:
    """Stands in for the kernel: accepts the launch, runs nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def model_tensors(n_tensors: int, dtype=torch.bfloat16):
    """Transformer-like: per layer four d×d matrices, two d×4d, norms and biases (small)."""
    sizes = []
    d = 64
    while len(sizes) < n_tensors:
        sizes += [d * d] * 4 + [d * 4 * d] * 2 + [d] * 6
    return [torch.zeros(s, dtype=dtype) for s in sizes[:n_tensors]]


def per_pass_us(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/host_overhead.csv")
    args = ap.parse_args()
    tensors = model_tensors(args.tensors)
    tb._zo_pass_kernel = _NoLaunch()
    rows = []
    for cached in (True, False):
        tb._TABLE_CACHE.clear()
        tb._TABLE_CACHE_SIZE = 16 if cached else 0
        for name, fn in [
            ("perturb_", lambda: fastzo.perturb_(tensors, 7, 1e-3, backend="triton")),
            ("restore_and_update_", lambda: fastzo.restore_and_update_(
                tensors, 7, 1e-3, 1e-6, 0.5, 0.1, backend="triton")),
        ]:
            us = per_pass_us(fn, args.repeats)
            rows.append(dict(call=name, tensors=args.tensors, table_cache=cached,
                             host_us_per_pass=round(us, 1)))
            print(rows[-1])
    tb._TABLE_CACHE_SIZE = 16
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    stamp = dict(kind="measured (CPU host path, kernel stubbed)", cpu=cpu_name(),
                 python=platform.python_version(), torch=torch.__version__,
                 load_average=" ".join(load),
                 timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(stamp))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **stamp})
    print(subprocess.run(["lscpu"], capture_output=True, text=True).stdout
          if os.path.exists("/usr/bin/lscpu") else "", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
