"""Measured GB/s of every pass the static model predicts, written beside the prediction.

For each backend (triton and cuda, each with and without fast math) and each pass variant
(fastzo.backends.triton_backend.pass_variants), times the pass in place on one tensor of `--n`
elements (median of `--repeats` after a warm-up), converts to GB/s (one read and one write per
element) and to a share of the in-place `add_` on the same tensor (the copy ceiling, measured in
the same run), and writes CSV rows with the model's prediction for this GPU next to the
measurement:

    python benchmarks/gpu_passes.py --predicted benchmarks/results/predicted_passes.csv \
        --out runs/gpu/passes_measured.csv

On a CPU (`--device cpu --backends cpp`) it runs the same code on small tensors, which the tests
use to keep this script working where no GPU is.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastzo  # noqa: E402
from fastzo.benchmark import cpu_name, write_stamped_csv  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPU_COLUMNS = (("H200", "H200"), ("H100", "H100-SXM"), ("Orin", "Orin-AGX"))


def variants(exact: bool):
    """Every pass of fastzo.backends.triton_backend.pass_variants, the dtype by name."""
    from fastzo.backends import triton_backend

    return [dict(v, dtype=str(v["dtype"]).removeprefix("torch."))
            for v in triton_backend.pass_variants(exact)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    fn()  # compile / warm up
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pass_function(v, w, backend):
    eps, lr, g, wd = 1e-3, 1e-6, 0.5, 0.1
    common = dict(distribution=v["distribution"], backend=backend)
    if v["exact"]:
        q = fastzo.exact_quantum(w, eps)
        fastzo.snap_to_grid_([w], [q])
        if not v["update"]:
            return lambda: fastzo.exact_perturb_([w], 7, eps, 1, [q], **common)
        if v["fused_next"]:
            return lambda: fastzo.restore_update_and_perturb_(
                [w], 7, eps, lr, g, wd, 8, eps, stochastic_rounding=v["stochastic_rounding"],
                exact_quanta=[q], **common)
        return lambda: fastzo.restore_and_update_([w], 7, eps, lr, g, wd, exact_quanta=[q],
                                                  stochastic_rounding=v["stochastic_rounding"],
                                                  **common)
    if not v["update"]:
        return lambda: fastzo.perturb_([w], 7, eps, **common)
    if v["fused_next"]:
        return lambda: fastzo.restore_update_and_perturb_(
            [w], 7, eps, lr, g, wd, 8, eps, stochastic_rounding=v["stochastic_rounding"], **common)
    return lambda: fastzo.restore_and_update_([w], 7, eps, lr, g, wd,
                                              stochastic_rounding=v["stochastic_rounding"], **common)


def load_predicted(path):
    if not path or not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            key = (r["backend"], r["dtype"], r["distribution"], r["update"] == "True",
                   r["stochastic_rounding"] == "True", r["fused_next"] == "True",
                   r["exact"] == "True")
            out[key] = r
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="triton,triton-polynomial,cuda,cuda-polynomial")
    ap.add_argument("--n", type=int, default=1 << 27, help="elements per tensor")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-exact", action="store_true")
    ap.add_argument("--predicted", default="benchmarks/results/predicted_passes.csv")
    ap.add_argument("--out", default="runs/gpu/passes_measured.csv")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    column = next((col for tag, col in GPU_COLUMNS if tag in name), None)
    predicted = load_predicted(args.predicted)
    rows = []
    for backend in args.backends.split(","):
        polynomial = backend.endswith("-polynomial")  # fast math off: Gaussian passes only
        real = backend.removesuffix("-polynomial")
        if real not in fastzo.available_backends():
            print(f"{backend}: not available here, skipped", file=sys.stderr)
            rows.append(dict(backend=backend, error="backend not available"))
            continue
        module = importlib.import_module(f"fastzo.backends.{real}_backend")
        default_fast_math = getattr(module, "FAST_MATH", None)  # the GPU backends have it
        if default_fast_math is not None:
            module.FAST_MATH = not polynomial and default_fast_math
        for dtype_name, dtype in DTYPES.items():
            w = (torch.randn(args.n, device=device) * 0.02).to(dtype)
            ceiling = timed(lambda: w.add_(0.0), device, args.repeats)
            for v in variants(not args.no_exact):
                if v["dtype"] != dtype_name or (polynomial and (v["distribution"] != "gaussian"
                                                                or v["exact"])):
                    continue
                row = dict(backend=backend, **v, n=args.n, device=name)
                try:
                    seconds = timed(pass_function(v, w, real), device, args.repeats)
                except Exception as exc:  # recorded, and the run goes on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
                    continue
                moved = 2 * args.n * w.element_size()
                row.update(ms=round(seconds * 1e3, 4), GBps=round(moved / seconds / 1e9, 1),
                           copy_GBps=round(moved / ceiling / 1e9, 1),
                           measured_pct_of_copy=round(100 * ceiling / seconds, 1))
                key = (backend, dtype_name, v["distribution"], v["update"],
                       v["stochastic_rounding"], v["fused_next"], v["exact"])
                if column and key in predicted:
                    row["predicted_pct_of_copy"] = predicted[key].get(f"{column}_pct", "")
                    row["predicted_for"] = column
                rows.append(row)
                print({k: row.get(k) for k in ("backend", "dtype", "distribution", "update",
                                               "stochastic_rounding", "fused_next", "exact",
                                               "GBps", "measured_pct_of_copy",
                                               "predicted_pct_of_copy")})
            del w
        if default_fast_math is not None:
            module.FAST_MATH = default_fast_math
    write_stamped_csv(args.out, rows, torch=torch.__version__)
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
