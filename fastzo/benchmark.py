"""`fastzo bench`: pass throughput against the machine's copy bandwidth, and MeZO step cost.

Every measurement appends a row to a CSV (benchmark, backend, dtype, size, metric, unit, median,
p20, p80, device, versions, timestamp); plots are drawn from the CSV, never from memory.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import ops
from .backends import BACKENDS, available_backends, supports
from .cli import check_backends, check_device, comma_list, number
from .reference import ReferenceMeZO

CSV_COLUMNS = ["benchmark", "backend", "dtype", "size", "metric", "unit", "median", "p20", "p80",
               "device", "versions", "timestamp"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    if "cpp" in available_backends():
        from .backends import cpp_backend

        parts.append(f"cpp kernels {cpp_backend.describe()}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except Exception:
        pass
    return "; ".join(parts)


def write_stamped_csv(path, rows: list[dict], **stamp) -> None:
    """Rows whose keys may differ (the union, in first-seen order), each with the same stamp
    columns (versions, time) appended; the folder is created."""
    stamp.setdefault("timestamp", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    fields = list(dict.fromkeys(f for r in rows for f in r)) + list(stamp)
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **stamp})


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int, warmup: int = 1) -> np.ndarray:
    """Wall-clock seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return np.array(out)


@dataclass
class Recorder:
    path: Path
    device: torch.device

    def __post_init__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self._device_name = device_name(self.device)
        self._versions = versions()

    def add(self, benchmark, backend, dtype, size, metric, unit, values):
        values = np.atleast_1d(np.asarray(values, dtype=float))
        row = dict(benchmark=benchmark, backend=backend, dtype=dtype, size=size, metric=metric,
                   unit=unit, median=float(np.median(values)), p20=float(np.quantile(values, 0.2)),
                   p80=float(np.quantile(values, 0.8)), device=self._device_name,
                   versions=self._versions, timestamp=_dt.datetime.now().isoformat(timespec="seconds"))
        self.rows.append(row)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        return row


# --------------------------------------------------------------------------- passes
def bench_ceiling(rec: Recorder, dtype_name: str, n: int, repeats: int):
    """The memory ceiling for an in-place pass: w.add_(c) reads and writes every element."""
    dtype = DTYPES[dtype_name]
    w = torch.randn(n, device=rec.device).to(dtype)
    bytes_moved = 2 * n * w.element_size()
    # A ceiling is an upper bound: take the best of many runs, so a busy moment on a shared
    # machine does not make the passes look faster than memory.
    # On CPUs the best of 1 thread and all threads: with a busy core, torch's intra-op threads
    # can make a 1e6-element add_ 150x slower (8 ms against 0.05 ms, measured here).
    dst = torch.empty_like(w)
    threads = torch.get_num_threads()
    best = float("inf")
    for n_threads in sorted({1, threads}) if rec.device.type == "cpu" else [threads]:
        torch.set_num_threads(n_threads)
        try:
            t_add = time_call(lambda: w.add_(1e-3), rec.device, 4 * repeats, warmup=3)
            t_copy = time_call(lambda: dst.copy_(w), rec.device, 4 * repeats, warmup=3)
        finally:
            torch.set_num_threads(threads)
        label = f"{n_threads}t" if rec.device.type == "cpu" else ""
        rec.add("ceiling", f"inplace_add{label}", dtype_name, n, "bandwidth", "GB/s", bytes_moved / t_add / 1e9)
        rec.add("ceiling", f"copy{label}", dtype_name, n, "bandwidth", "GB/s", bytes_moved / t_copy / 1e9)
        best = min(best, t_add.min(), t_copy.min())
    return float(bytes_moved / best / 1e9)


def bench_pass(rec: Recorder, backend: str, dtype_name: str, n: int, distribution: str,
               repeats: int, ceiling: float):
    dtype = DTYPES[dtype_name]
    w = (torch.randn(n, device=rec.device) * 0.02).to(dtype)
    bytes_moved = 2 * n * w.element_size()
    passes = {
        "perturb": lambda: ops.perturb_([w], 1, 1e-3, distribution=distribution, backend=backend),
        "restore_and_update": lambda: ops.restore_and_update_(
            [w], 1, 1e-3, 1e-6, 0.5, distribution=distribution, backend=backend),
    }
    out = {}
    for name, fn in passes.items():
        t = time_call(fn, rec.device, repeats)
        bench = f"{name}/{distribution}"
        rec.add(bench, backend, dtype_name, n, "time", "ms", t * 1e3)
        bw = rec.add(bench, backend, dtype_name, n, "bandwidth", "GB/s", bytes_moved / t / 1e9)
        rec.add(bench, backend, dtype_name, n, "share_of_ceiling", "%", 100 * bytes_moved / t / 1e9 / ceiling)
        out[name] = bw["median"]
    return out


def bench_plain_torch(rec: Recorder, dtype_name: str, n: int, repeats: int):
    """The plain PyTorch Gaussian perturbation fastzo replaces."""
    dtype = DTYPES[dtype_name]
    w = (torch.randn(n, device=rec.device) * 0.02).to(dtype)
    g = torch.Generator(device=rec.device).manual_seed(0)
    t = time_call(lambda: w.add_(torch.randn(n, generator=g, dtype=dtype, device=rec.device), alpha=1e-3),
                  rec.device, repeats)
    rec.add("perturb/gaussian", "plain_torch", dtype_name, n, "time", "ms", t * 1e3)
    rec.add("perturb/gaussian", "plain_torch", dtype_name, n, "bandwidth", "GB/s",
            2 * n * w.element_size() / t / 1e9)


# ----------------------------------------------------------------------------- steps
def small_llama(hidden: int, layers: int, vocab: int = 8000, dtype=torch.float32, device="cpu"):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), vocab_size=vocab,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def bench_steps(rec: Recorder, hidden: int, layers: int, dtype_name: str, steps: int,
                batch: int = 8, seq: int = 64, methods=("fastzo", "reference", "bp_sgd")):
    """Step time split into the two forwards and everything else (perturbation and update)."""
    dtype = DTYPES[dtype_name]
    model = small_llama(hidden, layers, dtype=dtype, device=rec.device)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=rec.device)
    forward_time = [0.0]

    def closure():
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        _sync(rec.device)
        forward_time[0] += time.perf_counter() - start
        return loss

    results = {}
    for method in methods:
        if method == "fastzo":
            opt = __import__("fastzo").MeZO(model.parameters(), lr=1e-7, eps=1e-3)
            step = lambda: opt.step(closure)  # noqa: E731
        elif method == "reference":
            ref = ReferenceMeZO(model.parameters(), lr=1e-7, eps=1e-3)
            step = lambda: ref.step(closure)  # noqa: E731
        else:
            sgd = torch.optim.SGD(model.parameters(), lr=1e-7)

            def step():
                sgd.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    closure().backward()
                sgd.step()
        totals, overheads = [], []
        step()  # warm up
        for _ in range(steps):
            forward_time[0] = 0.0
            _sync(rec.device)
            start = time.perf_counter()
            step()
            _sync(rec.device)
            total = time.perf_counter() - start
            totals.append(total)
            overheads.append(total - forward_time[0])
        model.zero_grad(set_to_none=True)
        totals, overheads = np.array(totals), np.array(overheads)
        rec.add("step", method, dtype_name, n_params, "step_time", "ms", totals * 1e3)
        label = "backward_and_update" if method.startswith("bp") else "perturb_and_update"
        rec.add("step", method, dtype_name, n_params, label, "ms", overheads * 1e3)
        rec.add("step", method, dtype_name, n_params, "forward", "ms", (totals - overheads) * 1e3)
        results[method] = (float(np.median(totals)), float(np.median(overheads)))
    return n_params, results


# ------------------------------------------------------------------------------ plots
def plot_passes(csv_path: Path, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "bandwidth"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        key = f"{r['benchmark']} · {r['backend']} · {r['dtype']}"
        series.setdefault(key, []).append((int(r["size"]), float(r["median"])))
    for key, pts in sorted(series.items()):
        pts = sorted(dict(pts).items())
        style = "--" if key.startswith("ceiling") else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=key)
    ax.set_xscale("log")
    ax.set_xlabel("elements per pass")
    ax.set_ylabel("GB/s (bytes read + written)")
    ax.set_title(f"fastzo passes on {rows[-1]['device']}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


# -------------------------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fastzo bench", description=__doc__)
    parser.add_argument("--sizes", type=comma_list(number(int, strictly_positive=True)),
                        default=[10**6, 10**7], help="elements per pass, comma separated (1e7 ok)")
    parser.add_argument("--dtypes", type=comma_list(choices=tuple(DTYPES)), default=["float32", "bfloat16"])
    parser.add_argument("--backends", type=comma_list(choices=BACKENDS), default=None,
                        help="default: every available backend for the device")
    parser.add_argument("--distributions", type=comma_list(choices=("gaussian", "rademacher")),
                        default=["gaussian", "rademacher"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=number(int, strictly_positive=True), default=5)
    parser.add_argument("--oracle-max-size", type=number(int, minimum=0), default=10**6,
                        help="skip the slow torch oracle above this size")
    parser.add_argument("--model", type=comma_list(_model_shape), default=[(256, 4)],
                        help="step benchmark models as HIDDENxLAYERS, comma separated")
    parser.add_argument("--model-dtypes", type=comma_list(choices=tuple(DTYPES)), default=["float32"])
    parser.add_argument("--steps", type=number(int, strictly_positive=True), default=5)
    parser.add_argument("--no-steps", action="store_true", help="skip the step benchmark")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder")
    return parser


def _model_shape(text: str) -> tuple[int, int]:
    parts = text.split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not HIDDENxLAYERS with positive integers, e.g. 256x4")
    return int(parts[0]), int(parts[1])


def _progress(iterable, **kwargs):
    """tqdm's progress bar if tqdm is installed (an optional dependency), else the plain iterable."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def run(args) -> int:
    tqdm = _progress
    device = torch.device(args.device)
    rec = Recorder(args.out / "bench.csv", device)
    backends = args.backends or [b for b in available_backends() if supports(b, device)]
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton" in backends and args.backends is None:
        backends.remove("triton")  # the interpreter measures Python, not the kernel
    jobs = [(dt, n) for dt in args.dtypes for n in args.sizes]
    summary = []
    for dt, n in tqdm(jobs, desc="passes", unit="size"):
        ceiling = bench_ceiling(rec, dt, n, args.repeats)
        bench_plain_torch(rec, dt, n, args.repeats)
        for backend in backends:
            if backend == "torch" and n > args.oracle_max_size:
                continue
            for dist in args.distributions:
                bw = bench_pass(rec, backend, dt, n, dist, args.repeats, ceiling)
                summary.append((backend, dt, n, dist, bw["perturb"], bw["restore_and_update"], ceiling))
    print(f"\nPasses on {device_name(device)} (GB/s of bytes read + written; ceiling = best in-place add or copy)")
    print(f"kernels: {versions()}")
    print(f"{'backend':8} {'dtype':9} {'elements':>10} {'noise':10} {'perturb':>8} {'update':>8} {'ceiling':>8} {'share':>6}")
    for backend, dt, n, dist, p, u, c in summary:
        print(f"{backend:8} {dt:9} {n:>10.0e} {dist:10} {p:8.2f} {u:8.2f} {c:8.2f} {100 * p / c:5.0f}%")
    if not args.no_steps:
        print("\nMeZO step against the reference algorithm and a backprop SGD step")
        print(f"{'params':>10} {'dtype':9} {'method':10} {'step ms':>9} {'non-forward ms':>15}")
        for (hidden, layers) in tqdm(args.model, desc="steps", unit="model"):
            for dt in args.model_dtypes:
                n_params, results = bench_steps(rec, hidden, layers, dt, args.steps)
                for method, (total, overhead) in results.items():
                    print(f"{n_params:>10.2e} {dt:9} {method:10} {total * 1e3:9.1f} {overhead * 1e3:15.1f}")
                ratio = results["fastzo"][1] / results["reference"][1]
                print(f"{'':>10} fastzo perturbation+update = {ratio:.2f} x the reference's")
    try:
        import matplotlib  # noqa: F401  (an optional dependency: the table and CSV come first)
    except ImportError:
        png = None
        print("\nplot skipped: matplotlib is not installed (pip install matplotlib)")
    else:
        png = plot_passes(rec.path, args.out / "passes.png")
    print(f"\nrows appended to {rec.path}" + (f"; plot {png}" if png else ""))
    return 0


def cli_main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = check_device(parser, args.device)
    if args.backends is not None:
        check_backends(parser, args.backends, device)
    return run(args)
