"""Accuracy against wall-clock time at equal memory: MeZO on a larger model, BP on a smaller one.

    python benchmarks/accuracy_vs_time.py                     # ~3 min on a 2-core CPU
    python benchmarks/accuracy_vs_time.py --seconds 20 --seeds 0

The small, offline counterpart of Fig. 4 of Katti, Park, Rajendran and Simeone (2025): there,
MeZO fine-tunes Llama2-7B/13B and BP fine-tunes GPT2-medium, all at about 17 GB, and test accuracy
is drawn against fine-tuning wall-clock seconds. Here:

- data: scikit-learn's handwritten digits (1,797 8×8 images, 10 classes; shipped inside the
  package), pixels / 16, split 70 % train / 10 % validation / 20 % test (stratified, fixed seed);
- models: MLPs built from configs (``MEZO_CONFIG``; the BP model's width is solved for, below),
  fp32, random initialisation (neither model is pretrained: see the caveat in docs/memory.md);
- MeZO: ``fastzo.MeZO`` (central SPSA, 3 forward passes a step, no gradient, no state; a step
  with a non-finite loss is undone and skipped, ``on_nonfinite="skip"``);
- BP: Adam (``torch.optim.Adam``), ``zero_grad(set_to_none=True)``;
- both: batch size ``--batch-size`` (8, as in the paper), the same batches for a given seed,
  ``--seconds`` of training each (evaluations of the test set pause the clock), learning rate
  picked per method from a small grid by validation accuracy after ``--select-seconds``.

Memory is equalised analytically (fp32, bytes), the peak of one training step:

- MeZO: weights ``4P`` + the largest forward working set (a layer's input and output, ``4·B·(n_in
  + n_out)``, plus the batch); the perturbation is applied in place, so nothing else.
- BP + Adam: weights + gradients + two moments ``16P`` + the activations autograd keeps for the
  backward pass ``4·B·(d_in + Σ hidden + classes)`` (each Linear saves its input, ReLU its output
  -- the same tensor as the next Linear's input -- and cross-entropy its log-softmax) + the
  batch.

The BP width is the one (same depth) whose BP peak is closest to MeZO's peak on the large model.
The peaks are also measured in fresh processes (the largest ``VmRSS``, sampled after each forward
and each step, above the RSS before the model is built); the measured numbers include allocator
and BLAS workspace and page granularity, and are printed next to the analytic ones.

Writes ``benchmarks/results/accuracy_vs_time.csv`` (one row per evaluation) and ``.png``.
"""

from __future__ import annotations

import argparse
import warnings
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import fastzo
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fastzo

RESULTS = Path(__file__).resolve().parent / "results"
BYTES = 4  # fp32
IN_FEATURES, CLASSES = 64, 10

# The larger model MeZO fine-tunes. The BP model has the same depth and a width solved for below.
MEZO_CONFIG = dict(name="MLP-L", hidden=[512, 512])
MEZO_LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
BP_LRS = [3e-4, 1e-3, 3e-3]
EPS = 1e-3


# ----------------------------------------------------------------------------- models, memory
def build(hidden: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    widths = [IN_FEATURES, *hidden, CLASSES]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def n_params(hidden: list[int]) -> int:
    widths = [IN_FEATURES, *hidden, CLASSES]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def mezo_memory(hidden: list[int], batch: int) -> dict:
    widths = [IN_FEATURES, *hidden, CLASSES]
    weights = BYTES * n_params(hidden)
    forward = BYTES * batch * max(a + b for a, b in zip(widths[:-1], widths[1:]))
    data = BYTES * batch * IN_FEATURES
    return dict(weights=weights, grads=0, optimizer_state=0, activations=forward, batch=data,
                total=weights + forward + data)


def bp_memory(hidden: list[int], batch: int) -> dict:
    p = n_params(hidden)
    saved = BYTES * batch * (IN_FEATURES + sum(hidden) + CLASSES)
    data = BYTES * batch * IN_FEATURES
    return dict(weights=BYTES * p, grads=BYTES * p, optimizer_state=2 * BYTES * p, activations=saved,
                batch=data, total=4 * BYTES * p + saved + data)


def equal_memory_width(target: int, depth: int, batch: int) -> int:
    return min(range(8, 4097), key=lambda w: abs(bp_memory([w] * depth, batch)["total"] - target))


# ----------------------------------------------------------------------------- data
def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    idx = list(range(len(y)))
    train, rest = train_test_split(idx, test_size=0.3, stratify=y.numpy(), random_state=0)
    val, test = train_test_split(rest, test_size=2 / 3, stratify=y[rest].numpy(), random_state=0)
    return {k: (x[v], y[v]) for k, v in dict(train=train, val=val, test=test).items()}


def batches(n: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        for chunk in torch.randperm(n, generator=g).split(batch):
            if len(chunk) == batch:
                yield chunk


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


# ----------------------------------------------------------------------------- training
def train(method: str, hidden: list[int], lr: float, seed: int, seconds: float, batch: int,
          data, eval_on: str, n_evals: int = 30, max_steps: int | None = None):
    """Train for `seconds` of wall-clock (evaluations excluded); return [(seconds, step, acc)]."""
    model = build(hidden, seed)
    xtr, ytr = data["train"]
    xe, ye = data[eval_on]
    if method == "mezo":
        model.eval()
        # a step whose loss is not finite is undone and not counted (fastzo's on_nonfinite="skip")
        opt = fastzo.MeZO(model.parameters(), lr=lr, eps=EPS, seed=seed, on_nonfinite="skip")
    else:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve = [(0.0, 0, accuracy(model, xe, ye))]
    next_eval, clock, step = seconds / n_evals, 0.0, 0
    for idx in batches(len(ytr), batch, seed):
        xb, yb = xtr[idx], ytr[idx]
        t0 = time.perf_counter()
        if method == "mezo":
            with torch.no_grad():
                opt.step(lambda: F.cross_entropy(model(xb), yb))
        else:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        clock += time.perf_counter() - t0
        step += 1
        if clock >= next_eval or (max_steps and step >= max_steps):
            curve.append((clock, step, accuracy(model, xe, ye)))
            next_eval += seconds / n_evals
        if clock >= seconds or (max_steps and step >= max_steps):
            break
    return curve


def measure_peak(method: str, hidden: list[int], batch: int, steps: int = 30) -> int:
    """Peak RSS (bytes) of `steps` training steps above the RSS before the model exists."""
    code = f"""
import sys, torch, torch.nn.functional as F
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
torch.set_num_threads(1)
import fastzo, accuracy_vs_time as b
x = torch.rand({batch}, b.IN_FEATURES); y = torch.randint(0, b.CLASSES, ({batch},))
m0 = b.build([8], 0)  # warm up the kernels and both optimizers' first steps (lazy imports)
o0 = fastzo.MeZO(m0.parameters(), lr=1e-4, eps=1e-3)
with torch.no_grad(): o0.step(lambda: F.cross_entropy(m0(x), y))
o0 = torch.optim.Adam(m0.parameters(), lr=1e-3); F.cross_entropy(m0(x), y).backward(); o0.step()
del m0, o0
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key): return int(line.split()[1]) * 1024
base = peak = status('VmRSS')
model = b.build({hidden!r}, 0)
if {method!r} == 'mezo':
    opt = fastzo.MeZO(model.parameters(), lr=1e-4, eps=1e-3)
    with torch.no_grad():
        for _ in range({steps}):
            opt.step(lambda: F.cross_entropy(model(x), y)); peak = max(peak, status('VmRSS'))
else:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range({steps}):
        opt.zero_grad(set_to_none=True); loss = F.cross_entropy(model(x), y)
        peak = max(peak, status('VmRSS')); loss.backward(); opt.step(); peak = max(peak, status('VmRSS'))
print(peak - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- plot
def plot(rows, meta, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"mezo": dict(color="tab:blue", marker="o"), "bp": dict(color="tab:red", marker="s")}
    for method in ("mezo", "bp"):
        m = meta[method]
        seeds = sorted({r["seed"] for r in rows if r["method"] == method})
        curves = [[(r["train_seconds"], r["test_accuracy"]) for r in rows
                   if r["method"] == method and r["seed"] == s] for s in seeds]
        grid = np.linspace(0, min(c[-1][0] for c in curves), 60)
        accs = np.array([np.interp(grid, [t for t, _ in c], [a for _, a in c]) for c in curves]) * 100
        label = (f"{'MeZO' if method == 'mezo' else 'BP (Adam)'}, {m['model']} "
                 f"(P = {m['params'] / 1e6:.2f} M, {m['memory_total'] / 2**20:.1f} MiB)")
        ax.plot(grid, accs.mean(0), label=label, markevery=6, markersize=4, **styles[method])
        if len(curves) > 1:
            ax.fill_between(grid, accs.min(0), accs.max(0), color=styles[method]["color"], alpha=0.2)
    ax.set_xlabel("Fine-tuning wall-clock time [s]")
    ax.set_ylabel("Test accuracy [%]")
    ax.set_title(f"Digits, batch size {meta['batch']}, equal memory (analytic, fp32)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=35.0, help="training wall-clock per run")
    ap.add_argument("--select-seconds", type=float, default=3.0, help="per learning rate tried")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "accuracy_vs_time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*non-finite.*")
    started = time.perf_counter()

    b = args.batch_size
    mezo_hidden = MEZO_CONFIG["hidden"]
    mezo_mem = mezo_memory(mezo_hidden, b)
    w = equal_memory_width(mezo_mem["total"], len(mezo_hidden), b)
    bp_hidden = [w] * len(mezo_hidden)
    bp_mem = bp_memory(bp_hidden, b)
    models = {"mezo": (f"{MEZO_CONFIG['name']} {'x'.join(map(str, mezo_hidden))}", mezo_hidden, mezo_mem),
              "bp": (f"MLP-S {'x'.join(map(str, bp_hidden))}", bp_hidden, bp_mem)}
    measured = {k: measure_peak(k, v[1], b) for k, v in models.items()}
    print("memory of one training step (fp32, bytes):")
    for k, (name, hidden, mem) in models.items():
        parts = ", ".join(f"{part} {mem[part]:,}" for part in ("weights", "grads", "optimizer_state",
                                                              "activations", "batch"))
        print(f"  {k:4s} {name:22s} P={n_params(hidden):>9,}  analytic {mem['total']:>11,} "
              f"({mem['total'] / 2**20:.2f} MiB: {parts})  measured peak RSS {measured[k]:>11,} "
              f"({measured[k] / 2**20:.2f} MiB)")

    data = load_digits_split()
    lrs = {}
    for method, grid in (("mezo", MEZO_LRS), ("bp", BP_LRS)):
        scores = {}
        for lr in grid:
            try:
                scores[lr] = train(method, models[method][1], lr, 100, args.select_seconds, b, data, "val",
                                   n_evals=1)[-1][2]
            except fastzo.optim.NonFiniteLossError:  # diverged: not selectable
                scores[lr] = 0.0
        lrs[method] = max(grid, key=lambda lr: (scores[lr], -lr))
        print(f"  lr selection {method}: " + ", ".join(f"{lr:g}: {a:.3f}" for lr, a in scores.items())
              + f" -> {lrs[method]:g}")

    rows = []
    for seed in args.seeds:
        for method in ("mezo", "bp"):
            name, hidden, mem = models[method]
            curve = train(method, hidden, lrs[method], seed, args.seconds, b, data, "test")
            for t, step, acc in curve:
                rows.append(dict(method=method, model=name, params=n_params(hidden),
                                 memory_analytic_bytes=mem["total"], memory_measured_bytes=measured[method],
                                 lr=lrs[method], batch=b, seed=seed, step=step,
                                 train_seconds=round(t, 4), test_accuracy=round(acc, 4)))
            print(f"  seed {seed} {method:4s}: {curve[-1][1]:6d} steps in {curve[-1][0]:.1f} s, "
                  f"test accuracy {curve[0][2]:.3f} -> {curve[-1][2]:.3f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {k: dict(model=v[0], params=n_params(v[1]), memory_total=v[2]["total"]) for k, v in models.items()}
    meta["batch"] = b
    plot(rows, meta, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.csv')} and .png; total {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
