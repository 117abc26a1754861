"""Per-step overhead and extra peak memory of fastzo.MeZO against the reference MeZO step.

Overhead = whole step minus the two closure calls (perturbation and update only). Extra peak
memory = peak during steps minus the peak of one plain forward, each method in a fresh process
after one warm-up step (resident high-water mark VmHWM on CPU, reset through
/proc/self/clear_refs; torch.cuda.max_memory_allocated on GPU).

    python benchmarks/bench_optimizer.py                      # CPU: ~1e7 params, fp32 and bf16
    python benchmarks/bench_optimizer.py --device cuda --hidden 2048 --layers 16   # ~1e9 on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fastzo
from fastzo.benchmark import DTYPES, Recorder, _sync, small_llama
from fastzo.reference import ReferenceMeZO

RESULTS = Path(__file__).resolve().parent / "results"


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: writing 5 to clear_refs resets VmHWM, the resident high-water mark
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_step(method, model, closure, backend):
    if method == "fastzo":
        opt = fastzo.MeZO(model.parameters(), lr=1e-7, eps=1e-3, backend=backend)
    elif method == "fastzo_fused":
        opt = fastzo.MeZO(model.parameters(), lr=1e-7, eps=1e-3, backend=backend, fused_steps=True)
    elif method == "fastzo_rademacher":
        opt = fastzo.MeZO(model.parameters(), lr=1e-7, eps=1e-3, backend=backend, distribution="rademacher")
    else:
        opt = ReferenceMeZO(model.parameters(), lr=1e-7, eps=1e-3)
    return lambda: opt.step(closure)


def measure(method, hidden, layers, dtype, device, steps, backend, batch, seq):
    """Runs in a fresh process: returns step time, overhead and extra peak memory."""
    device = torch.device(device)
    model = small_llama(hidden, layers, dtype=DTYPES[dtype], device=device)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    closure_time = [0.0]

    def closure():
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        _sync(device)
        closure_time[0] += time.perf_counter() - start
        return loss

    step = make_step(method, model, closure, backend)
    step()  # warm up: code pages, thread pools and allocator caches are not per-step memory
    # Baseline: the peak of a plain forward (its transient activations), so extra = what the
    # step needs beyond the model and one forward.
    _reset_peak(device)
    with torch.no_grad():
        closure()
    base = _peak(device)
    _reset_peak(device)
    totals, overheads = [], []
    for _ in range(steps):
        closure_time[0] = 0.0
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        totals.append(time.perf_counter() - start)
        overheads.append(totals[-1] - closure_time[0])
    peak = _peak(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return dict(n_params=n_params, totals=totals, overheads=overheads, extra_bytes=peak - base,
                param_bytes=param_bytes, largest_tensor_bytes=largest)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--methods", default="fastzo,fastzo_fused,fastzo_rademacher,reference")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--backend", default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "optimizer_overhead.csv")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(**spec)))
        return 0
    rec = Recorder(args.out, torch.device(args.device))
    print(f"{'dtype':9} {'method':18} {'params':>9} {'step ms':>9} {'overhead ms':>12} {'extra MB':>9} {'extra/model':>11}")
    for dtype in args.dtypes.split(","):
        overhead = {}
        for method in args.methods.split(","):
            spec = dict(method=method, hidden=args.hidden, layers=args.layers, dtype=dtype,
                        device=args.device, steps=args.steps, backend=args.backend,
                        batch=args.batch, seq=args.seq)
            # Small mmap threshold: freed temporaries return to the OS, so RSS follows live bytes.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            env.pop("TRITON_INTERPRET", None)
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                 capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            n = r["n_params"]
            rec.add("optimizer_step", method, dtype, n, "step_time", "ms", np.array(r["totals"]) * 1e3)
            row = rec.add("optimizer_step", method, dtype, n, "overhead", "ms", np.array(r["overheads"]) * 1e3)
            rec.add("optimizer_step", method, dtype, n, "extra_peak_memory", "MB", r["extra_bytes"] / 1e6)
            rec.add("optimizer_step", method, dtype, n, "extra_peak_over_model", "%",
                    100 * r["extra_bytes"] / r["param_bytes"])
            overhead[method] = row["median"]
            print(f"{dtype:9} {method:18} {n:9.2e} {np.median(r['totals']) * 1e3:9.1f} {row['median']:12.1f} "
                  f"{r['extra_bytes'] / 1e6:9.1f} {100 * r['extra_bytes'] / r['param_bytes']:10.2f}%"
                  f"  (largest tensor {r['largest_tensor_bytes'] / 1e6:.1f} MB)")
        if "reference" in overhead:
            for method, value in overhead.items():
                if method != "reference":
                    print(f"{dtype:9} {method:18} overhead = {value / overhead['reference']:.2f} x reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
