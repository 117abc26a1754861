"""One perturbation pass on the CPU: backend "cpp" against plain PyTorch and the oracle backend.

For 10^7 float32 and bfloat16 weights (and 10^8 float32, past the last-level cache):

- ``cpp``: ``fastzo.perturb_(w, seed, eps, backend="cpp")``, Gaussian and Rademacher z, and the
  restore-and-update pass with stochastic rounding (bfloat16);
- ``pytorch``: the plain way, ``w.add_(torch.randn(n, generator=g, dtype=w.dtype), alpha=eps)``;
- ``torch``: fastzo's oracle backend (exact reference, chunked, slow; fewer runs);
- ``add_``: ``w.add_(1e-3)`` in place, the memory ceiling of a read-modify-write pass here.

Reports the median (and 20th/80th percentiles) of several runs in ms, and GB/s counting the
bytes of the weights read and written once (2 * n * element size), so every row is comparable
with the ceiling. Appends rows to benchmarks/results/cpp_pass.csv (benchmark, backend, dtype,
size, metric, unit, median, p20, p80, device, versions, timestamp) and prints a table.

    flock /tmp/fastzo-bench.lock .venv/bin/python benchmarks/bench_cpp.py
    flock /tmp/fastzo-bench.lock .venv/bin/python benchmarks/bench_cpp.py --quick   # 10^6, no oracle

The cores are shared: run it under the lock, and read the load average printed at start and end
(also in the CSV's device column) before trusting a number.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastzo  # noqa: E402
from fastzo.benchmark import cpu_name  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cpp_pass.csv"
COLUMNS = ["benchmark", "backend", "dtype", "size", "metric", "unit", "median", "p20", "p80",
           "device", "versions", "timestamp"]
EPS = 1e-3
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def versions() -> str:
    parts = [f"torch {torch.__version__}", f"fastzo {fastzo.__version__}"]
    try:
        from fastzo import _C

        parts.append(f"cpp kernels {_C.cpu_kernel_isa()}")
    except ImportError:
        pass
    return "; ".join(parts)


def timings(fn, repeats: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return np.array(out) * 1e3  # ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--oracle-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10^6 elements, no oracle, no 10^8")
    parser.add_argument("--no-oracle", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "cpp" not in fastzo.available_backends():
        from fastzo.backends import get_backend

        get_backend("cpp")  # raises BackendUnavailable with the reason

    n = 10**6 if args.quick else 10**7
    cases = [(torch.float32, n), (torch.bfloat16, n)]
    if not args.quick:
        cases.append((torch.float32, 10**8))
    threads = torch.get_num_threads()
    load_start = os.getloadavg()[0]
    print(f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch threads; "
          f"load average at start {load_start:.2f}")
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    vers = versions()
    measured = []  # (benchmark, backend, dtype, size, ms array, bytes)

    for dtype, size in cases:
        w = torch.randn(size, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(dtype)
        nbytes = 2 * size * w.element_size()
        g = torch.Generator().manual_seed(1)
        seeds = iter(range(1, 10**6))

        def run(benchmark, backend, fn, repeats=args.repeats):
            ms = timings(fn, repeats)
            measured.append((benchmark, backend, DTYPE_NAMES[dtype], size, ms, nbytes))
            print(f"  {benchmark:24s} {backend:8s} {DTYPE_NAMES[dtype]:8s} n={size:.0e}: "
                  f"{np.median(ms):9.2f} ms  {nbytes / np.median(ms) / 1e6:7.2f} GB/s", flush=True)

        run("add_scalar_ceiling", "add_", lambda: w.add_(1e-3))
        run("perturb_gaussian", "cpp", lambda: fastzo.perturb_(w, next(seeds), EPS, backend="cpp"))
        run("perturb_rademacher", "cpp", lambda: fastzo.perturb_(
            w, next(seeds), EPS, distribution="rademacher", backend="cpp"))
        if dtype == torch.bfloat16:
            run("restore_and_update_sr", "cpp", lambda: fastzo.restore_and_update_(
                w, next(seeds), EPS, 1e-4, 0.5, stochastic_rounding=True, backend="cpp"))
        run("perturb_gaussian", "pytorch", lambda: w.add_(
            torch.randn(size, generator=g, dtype=w.dtype), alpha=EPS))
        if not (args.quick or args.no_oracle) and size <= 10**7:
            run("perturb_gaussian", "torch", lambda: fastzo.perturb_(
                w, next(seeds), EPS, backend="torch"), repeats=args.oracle_repeats)
            run("perturb_rademacher", "torch", lambda: fastzo.perturb_(
                w, next(seeds), EPS, distribution="rademacher", backend="torch"),
                repeats=args.oracle_repeats)
        del w

    load_end = os.getloadavg()[0]
    print(f"load average at end {load_end:.2f}")
    device = (f"cpu: {cpu_name()}, {os.cpu_count()} cores, {threads} threads, "
              f"load {load_start:.2f}->{load_end:.2f}")
    rows = []
    for benchmark, backend, dtype, size, ms, nbytes in measured:
        gbs = nbytes / ms / 1e6
        for metric, unit, values in (("time", "ms", ms), ("bandwidth", "GB/s", gbs)):
            rows.append(dict(benchmark=benchmark, backend=backend, dtype=dtype, size=size,
                             metric=metric, unit=unit, median=f"{np.median(values):.4g}",
                             p20=f"{np.quantile(values, 0.2):.4g}",
                             p80=f"{np.quantile(values, 0.8):.4g}", device=device,
                             versions=vers, timestamp=stamp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    with open(args.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)

    print("\nspeed-up of cpp over plain PyTorch (Gaussian perturb, median):")
    by_key = {(b, be, d, s): np.median(ms) for b, be, d, s, ms, _ in measured}
    for (benchmark, backend, dtype, size), ms in by_key.items():
        if benchmark == "perturb_gaussian" and backend == "cpp":
            plain = by_key.get((benchmark, "pytorch", dtype, size))
            oracle = by_key.get((benchmark, "torch", dtype, size))
            ceiling = by_key.get(("add_scalar_ceiling", "add_", dtype, size))
            line = f"  {dtype:8s} n={size:.0e}: {plain / ms:5.2f}x vs pytorch"
            if oracle:
                line += f", {oracle / ms:6.1f}x vs oracle backend"
            line += f"; {ms / ceiling:5.1f}x the add_ ceiling"
            print(line)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
