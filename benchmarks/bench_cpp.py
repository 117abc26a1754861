"""CPU passes of backend "cpp", per element and core, against the memory ceiling and plain PyTorch.

In one run, for float32, bfloat16 and float16 weights, 10^6 elements (in cache) and 10^8 (from
memory), with 1 thread and every thread count up to the machine's cores:

- ``add_``: ``w.add_(1e-3)``, an in-place read and write of the same bytes as a pass. The
  *ceiling* is the fastest of all its runs and of as many ``dst.copy_(w)`` runs (the best the
  memory system did in this run, not a median), so a pass can only approach it;
- ``randn``: ``torch.randn(n)`` alone, and ``randn_add``: ``w.add_(torch.randn(n, dtype=w.dtype),
  alpha=eps)``, what a user would write;
- ``cpp``: the extension's perturb pass and restore-and-update pass (stochastic rounding on
  16-bit weights), Gaussian and Rademacher z;
- ``cpp-before`` (``--baseline PATH``): the same passes of another build of ``fastzo._C`` loaded
  beside this one, e.g. one built from the commit before the vector kernels, so before/after
  ratios come from one run on one machine state; further builds as ``--baseline LABEL=PATH``
  (backend ``cpp-LABEL``), e.g. an older starting point.

The cores are shared, so the cases are interleaved: every round times each case once, in a
shuffled order, and a case's median (p20, p80) is over rounds. Times are reported as ns per
element per core (time x threads / n). Rows are appended to benchmarks/results/cpu_passes.csv;
a summary of the ratios the CPU targets are stated in, with ``lscpu`` and the load average at
start and end, is written to benchmarks/results/cpu_passes.md.

``--finetune-steps N`` also runs ``fastzo finetune``'s default model (all-MiniLM-L6-v2) for N MeZO
steps with this build and with the baseline, and reports the share of a step outside the two
forwards.

    flock /tmp/fastzo-bench.lock .venv/bin/python benchmarks/bench_cpp.py \\
        --baseline /path/to/old/fastzo/_C.cpython-311-x86_64-linux-gnu.so --finetune-steps 30
    # two earlier builds: cpp-before and cpp-origin
    ... --baseline /path/to/previous/_C...so --baseline origin=/path/to/first/_C...so
    flock /tmp/fastzo-bench.lock .venv/bin/python benchmarks/bench_cpp.py --quick   # 10^6 only
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.machinery
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastzo  # noqa: E402
from fastzo.backends import cpp_backend  # noqa: E402
from fastzo.benchmark import cpu_name  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ["benchmark", "backend", "dtype", "size", "threads", "metric", "unit", "median", "p20",
           "p80", "device", "versions", "timestamp"]
EPS = 1e-3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_extension_copy(path: Path, index: int = 0):
    """Another build of fastzo._C as a separate module (its own copy of the kernels)."""
    name = f"fastzo_baseline{index}._C"  # the init function is PyInit__C, as in the real module
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def describe(ext) -> str:
    isa = ext.cpu_kernel_isa() if hasattr(ext, "cpu_kernel_isa") else "?"
    openmp = getattr(ext, "CPU_OPENMP", False)
    return f"ABI {getattr(ext, 'ABI_VERSION', '?')}, {isa}, {'OpenMP' if openmp else 'no OpenMP'}"


def pass_cases(ext, label, w, seeds):
    """(benchmark, backend, fn) of the extension's passes on w."""
    cases = []
    for dist in ("gaussian", "rademacher"):
        cases.append((f"perturb_{dist}", label,
                      lambda d=dist: ext.cpu_perturb_([w], [0], [0], next(seeds), EPS, d)))
        kind = "update_sr" if w.dtype != torch.float32 else "update"
        cases.append((f"{kind}_{dist}", label, lambda d=dist: ext.cpu_restore_and_update_(
            [w], [0], [0], next(seeds), EPS, 1.0, 1e-4, d, w.dtype != torch.float32)))
    return cases


def measure_config(dtype_name, size, threads, extensions, rounds):
    """Interleaved rounds of every case of one (dtype, size, threads); {key: seconds array}."""
    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    w = torch.randn(size, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(dtype)
    dst = torch.empty_like(w)
    g = torch.Generator().manual_seed(1)
    seeds = iter(range(1, 10**9))
    cases = [("add_", "torch", lambda: w.add_(1e-3)),
             ("copy_", "torch", lambda: dst.copy_(w)),
             ("randn", "torch", lambda: torch.randn(size, generator=g, dtype=dtype)),
             ("randn_add", "torch", lambda: w.add_(torch.randn(size, generator=g, dtype=dtype),
                                                   alpha=EPS))]
    for label, ext in extensions.items():
        cases += pass_cases(ext, label, w, seeds)
    times = {(b, be): [] for b, be, _ in cases}
    cpu_times = {(b, be): [] for b, be, _ in cases}
    for _, _, fn in cases:  # warm-up: page faults, thread pool start
        fn()
    order = list(range(len(cases)))
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for i in order:
            benchmark, backend, fn = cases[i]
            start, cpu_start = time.perf_counter(), time.thread_time()
            fn()
            times[(benchmark, backend)].append(time.perf_counter() - start)
            cpu_times[(benchmark, backend)].append(time.thread_time() - cpu_start)
    return ({key: np.array(v) for key, v in times.items()},
            {key: np.array(v) for key, v in cpu_times.items()})


def finetune_share(steps: int, threads: int, extension, out: Path) -> dict:
    """One short `fastzo finetune` MeZO run with `extension` as backend "cpp"."""
    from fastzo import finetune

    saved = cpp_backend._extension
    cpp_backend._extension = extension
    try:
        finetune.cli_main(["--method", "mezo", "--steps", str(steps), "--eval-points", "1",
                           "--test-size", "32", "--threads", str(threads), "--backend", "cpp",
                           "--quiet", "--no-save-model", "--output", str(out)])
    finally:
        cpp_backend._extension = saved
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    return metrics["mezo"]


def machine_report() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs (lscpu not available)"
    keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket", "L1d", "L2", "L3",
            "Hypervisor", "Flags")
    lines = [line for line in lscpu.splitlines() if line.strip().startswith(keep)]
    flags = [line for line in lines if line.startswith("Flags")]
    if flags:
        wanted = [f for f in flags[0].split() if f.startswith(("avx", "fma", "amx", "sse4_2"))]
        lines = [line for line in lines if not line.startswith("Flags")]
        lines.append("Flags (vector ISA):    " + " ".join(wanted))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", action="append", default=[], metavar="[LABEL=]PATH",
                        help="a fastzo._C shared object of another build to compare with (backend "
                             "cpp-before, or cpp-LABEL); repeatable")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e8])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts (default 1 .. os.cpu_count())")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per configuration (default 25 at 10^6, 5 at 10^8)")
    parser.add_argument("--quick", action="store_true", help="10^6 elements only, 9 rounds")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="also measure MeZO steps of fastzo finetune's default model")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_passes.csv")
    parser.add_argument("--summary", type=Path, default=RESULTS / "cpu_passes.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds = [1e6], args.rounds or 9

    extensions = {"cpp": cpp_backend.load_extension()}
    for index, spec in enumerate(args.baseline):
        label, sep, path = spec.rpartition("=")
        if not sep and index > 0:
            parser.error(f"--baseline {spec}: give every baseline after the first a LABEL=PATH")
        label = f"cpp-{label}" if sep else "cpp-before"
        if label in extensions:
            parser.error(f"--baseline {spec}: label {label} given twice")
        extensions[label] = load_extension_copy(Path(path), index)
    thread_counts = args.threads or list(range(1, (os.cpu_count() or 1) + 1))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    machine = machine_report()
    versions = "; ".join([f"torch {torch.__version__}"] +
                         [f"{label}: {describe(ext)}" for label, ext in extensions.items()])
    print(machine)
    print(f"{stamp}  load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    print(versions, flush=True)

    results = {}  # (dtype, size, threads) -> {(benchmark, backend): seconds}
    cpu_results = {}  # the same, CPU time of the calling thread (all the work with 1 thread)
    for dtype_name in args.dtypes:
        for size in (int(s) for s in args.sizes):
            for threads in thread_counts:
                rounds = args.rounds or (25 if size <= 10**6 else 5)
                t0 = time.perf_counter()
                cfg = (dtype_name, size, threads)
                results[cfg], cpu_results[cfg] = measure_config(dtype_name, size, threads,
                                                                extensions, rounds)
                print(f"  {dtype_name} n={size:.0e} threads={threads}: {time.perf_counter() - t0:.0f} s",
                      flush=True)
    torch.set_num_threads(max(thread_counts))

    finetune = {}
    if args.finetune_steps:
        with tempfile.TemporaryDirectory() as tmp:
            for label, ext in extensions.items():
                for threads in sorted({1, max(thread_counts)}):
                    finetune[(label, threads)] = finetune_share(args.finetune_steps, threads, ext,
                                                                Path(tmp) / f"{label}-{threads}")
                    run = finetune[(label, threads)]
                    print(f"  finetune {label} threads={threads}: {run['seconds_per_step']} s/step, "
                          f"{100 * run['perturb_share']:.1f} % outside the forwards", flush=True)

    load_end = os.getloadavg()
    device = (f"cpu: {cpu_name()}, {os.cpu_count()} cores, load {load_start[0]:.2f}->{load_end[0]:.2f}")
    rows = []
    for (dtype_name, size, threads), times in results.items():
        element_size = torch.empty(0, dtype=DTYPES[dtype_name]).element_size()
        for (benchmark, backend), seconds in times.items():
            per_core = seconds * 1e9 * threads / size
            gbs = 2 * size * element_size / seconds / 1e9
            metrics = [("time_per_element_per_core", "ns", per_core), ("bandwidth", "GB/s", gbs)]
            if threads == 1:  # the calling thread did all the work: its CPU time ignores waits
                metrics.append(("cpu_time_per_element", "ns",
                                cpu_results[(dtype_name, size, threads)][(benchmark, backend)] * 1e9 / size))
            for metric, unit, values in metrics:
                rows.append(dict(benchmark=benchmark, backend=backend, dtype=dtype_name, size=size,
                                 threads=threads, metric=metric, unit=unit,
                                 median=f"{np.median(values):.4g}",
                                 p20=f"{np.quantile(values, 0.2):.4g}",
                                 p80=f"{np.quantile(values, 0.8):.4g}", device=device,
                                 versions=versions, timestamp=stamp))
    for (label, threads), run in finetune.items():
        for metric, unit, value in (("share_outside_forwards", "fraction", run["perturb_share"]),
                                    ("seconds_per_step", "s", run["train_seconds"] / run["steps"])):
            rows.append(dict(benchmark="mezo_step_minilm", backend=label, dtype="float32",
                             size=22_713_216, threads=threads, metric=metric,
                             unit=unit, median=f"{value:.4g}", p20="", p80="", device=device,
                             versions=versions, timestamp=stamp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.out.exists()
    with open(args.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)

    summary = summarize(results, finetune, thread_counts)
    summary += ["", "## 1 thread, CPU time of the calling thread (robust to other load on the machine)", ""]
    summary += summarize({cfg: v for cfg, v in cpu_results.items() if cfg[2] == 1}, {}, [1],
                         ceiling_rows=False)
    header = [f"# CPU passes, {stamp}", "", "```", machine, f"load average at start "
              f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, at end "
              f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}", versions, "```", ""]
    text = "\n".join(header + summary) + "\n"
    print("\n" + text)
    with open(args.summary, "w") as f:
        f.write(text)
    print(f"appended {len(rows)} rows to {args.out}; summary in {args.summary}")


def summarize(results, finetune, thread_counts, ceiling_rows=True) -> list[str]:
    """Markdown tables: ns per element per core, and the ratios of the targets."""
    med = {cfg: {key: float(np.median(v)) for key, v in times.items()} for cfg, times in results.items()}
    best = {cfg: {key: float(np.min(v)) for key, v in times.items()} for cfg, times in results.items()}
    out = ["Medians of interleaved rounds, ns per element per core (time x threads / n); the",
           "ceiling is the fastest add_ or copy_ run of the configuration, as GB/s of 2 n element",
           "bytes.", ""] if ceiling_rows else []
    for cfg in sorted(med) if ceiling_rows else []:
        dtype_name, size, threads = cfg
        m = med[cfg]
        ceiling_s = min(best[cfg][("add_", "torch")], best[cfg][("copy_", "torch")])
        nbytes = 2 * size * torch.empty(0, dtype=DTYPES[dtype_name]).element_size()
        out.append(f"### {dtype_name}, n = {size:.0e}, {threads} thread(s): ceiling "
                   f"{nbytes / ceiling_s / 1e9:.1f} GB/s = {ceiling_s * 1e9 * threads / size:.3f} ns/el/core")
        out.append("")
        out.append("| case | backend | ns/el/core | x add_ median | % of ceiling |")
        out.append("| --- | --- | ---: | ---: | ---: |")
        add = m[("add_", "torch")]
        for (benchmark, backend), s in sorted(m.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            out.append(f"| {benchmark} | {backend} | {s * 1e9 * threads / size:.3f} | {s / add:.2f} | "
                       f"{100 * ceiling_s / s:.0f} |")
        out.append("")

    out += ["## Ratios (same run)", ""] if ceiling_rows else []

    def r(cfg, a, b):
        try:
            return med[cfg][a] / med[cfg][b]
        except KeyError:
            return float("nan")

    sizes = sorted({c[1] for c in med})
    small, large = sizes[0], sizes[-1]
    tmax = max(thread_counts)
    baselines = sorted({backend for times in med.values() for _, backend in times
                        if backend.startswith("cpp-")})

    def before_after(cfg, bench):
        """'before/after 1.23x (origin/after 2.34x)': speed-ups of this build over each baseline."""
        parts = [f"{b[4:]}/after {r(cfg, (bench, b), (bench, 'cpp')):.2f}x" for b in baselines]
        return ", ".join(parts) if parts else "no baseline"

    lines = []
    for dt in sorted({c[0] for c in med}):
        one = (dt, small, 1)
        lines.append(f"- {dt}, n={small:.0e}, 1 thread: Gaussian perturb {r(one, ('randn', 'torch'), ('perturb_gaussian', 'cpp')):.2f}x "
                     f"faster than torch.randn alone, {r(one, ('randn_add', 'torch'), ('perturb_gaussian', 'cpp')):.2f}x than randn + add_; "
                     + before_after(one, "perturb_gaussian"))
        kind = "update_sr" if dt != "float32" else "update"
        for dist in ("gaussian", "rademacher"):
            for size in sizes:
                for threads in thread_counts:
                    cfg = (dt, size, threads)
                    if cfg not in med:
                        continue
                    earlier = "".join(f", {b[4:]} {r(cfg, (f'{kind}_{dist}', b), (f'perturb_{dist}', b)):.2f}"
                                      for b in baselines)
                    lines.append(f"- {dt}, n={size:.0e}, {threads} thread(s), {dist}: {kind} / perturb = "
                                 f"{r(cfg, (f'{kind}_{dist}', 'cpp'), (f'perturb_{dist}', 'cpp')):.2f} "
                                 f"({earlier[2:] or 'no baseline'}); "
                                 f"perturb / add_ = {r(cfg, (f'perturb_{dist}', 'cpp'), ('add_', 'torch')):.2f}; "
                                 f"perturb {before_after(cfg, f'perturb_{dist}')}; "
                                 f"{kind} {before_after(cfg, f'{kind}_{dist}')}")
        if tmax > 1:
            for backend in ["cpp"] + baselines:
                speedups = []
                for bench in ("perturb_gaussian", "perturb_rademacher", f"{kind}_gaussian", f"{kind}_rademacher"):
                    try:
                        speedups.append(f"{bench} {med[(dt, large, 1)][(bench, backend)] / med[(dt, large, tmax)][(bench, backend)]:.2f}x")
                    except KeyError:
                        pass
                if speedups:
                    lines.append(f"- {dt}, n={large:.0e}, {backend}: {tmax} threads against 1: " + ", ".join(speedups) +
                                 f" (add_ {med[(dt, large, 1)][('add_', 'torch')] / med[(dt, large, tmax)][('add_', 'torch')]:.2f}x)")
    out += lines
    if finetune:
        out += ["", "## MeZO step of fastzo finetune's default model (all-MiniLM-L6-v2, float32)", "",
                "| build | threads | s/step | share outside the two forwards |", "| --- | ---: | ---: | ---: |"]
        for (label, threads), run in sorted(finetune.items()):
            out.append(f"| {label} | {threads} | {run['train_seconds'] / run['steps']:.3f} | "
                       f"{100 * run['perturb_share']:.1f} % |")
    return out


if __name__ == "__main__":
    main()
