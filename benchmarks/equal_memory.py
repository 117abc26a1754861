"""At equal memory: MeZO on a 4.8x larger pretrained model against backprop on the smaller one.

    python benchmarks/equal_memory.py               # the whole grid: many hours on 2 cores; resumable
    python benchmarks/equal_memory.py --status      # what is done, what is running, what is left
    python benchmarks/equal_memory.py --report      # figure + summary from the CSV as it stands
    python benchmarks/equal_memory.py --smoke       # the whole pipeline on tiny sizes (runs/, not results/)
    python benchmarks/equal_memory.py --memory      # each variant's peak and step cost in fresh processes

The claim of the on-device ZO paper (Katti, Park, Rajendran and Simeone 2025, Fig. 4): under a
fixed memory budget MeZO can fine-tune a much larger model than backprop can, and given enough
time the larger model fine-tuned with MeZO beats the smaller one fine-tuned with backprop. Here
on real pretrained models that install offline from PyPI (``fastzo.integrations.assets``):

- models: all-MiniLM-L6-v2 (22.7 M parameters) and all-mpnet-base-v2 (109.5 M, the same
  sentence-transformers family), each with the embedding head of ``fastzo finetune``
  (mean pooling, L2 norm, linear head x20 initialised from one description per class);
- cells: {MiniLM, MPNet} x {backprop (AdamW), MeZO (fastzo.MeZO, fused-steps mode)}, plus on
  MPNet MeZO with Rademacher instead of Gaussian z, and MeZO on bfloat16 weights (stochastic
  rounding);
- tasks: the movie-review snippets and the Amazon product-review snippets of Hutto & Gilbert
  (2014), from the vaderSentiment sdist, binarised by the sign of the mean rating (zeros
  dropped). Split once with a fixed seed: 2,000 held out (test), 500 validation, the rest train;
- seeds: each cell with seeds 0 and 1 (batch order; MeZO's z); the split stays the same;
- learning rates, chosen on the 500-example *validation* split, never on the test set:
  backprop: the lr with the lowest validation loss after a 100-step run of each lr in its grid
  (``LR_GRIDS``, seed 0). MeZO: its seed-0 float32 Gaussian cell runs the whole horizon once per
  lr of the grid, and the lr with the lowest validation loss at the last step is chosen; the
  other seed, Rademacher and bf16 then run at that lr (E[z^2] = 1 for both z). Short selection
  runs misled MeZO: on MPNet 60 steps chose 5e-5, whose run peaked at step 750 and whose
  training loss then diverged (``equal_memory_first_protocol.csv``). Every main cell also
  evaluates the validation split, so the report can give the held-out accuracy at the step with
  the best validation loss (early stopping) next to the last one.

Every cell runs in a fresh process, through the same ``fastzo.finetune.Trainer`` that ``fastzo
finetune`` uses (one loop, one memory probe): peak memory = the process's peak RSS (VmHWM) over
the training steps, reset after the model is built (``PeakMemory``), so it includes the import
baseline and the weights, the same way for every cell. Time = process CPU time of all threads
and wall-clock of the training steps (evaluations excluded); idle OpenMP threads sleep
(``OMP_WAIT_POLICY=PASSIVE`` unless set), so that on a shared machine a thread spinning for a
descheduled partner does not count as training. The CSV gets one row per evaluation, written as
it goes, with the git commit, backend, threads, CPU model and load average.

Resumable: after each evaluation the cell saves a checkpoint (weights, optimizer, step, clocks,
peak) into ``--work-dir``; a rerun skips the cells whose last row is in the CSV and continues an
unfinished cell from its last checkpoint. Wall-clock of a cell that was paused (SIGSTOP) includes
the pause; CPU time does not.

The peak of a training cell also holds what its evaluations (batch 32) left in the heap. ``--memory``
measures each variant apart: a fresh process, 20 training steps, no evaluation, under glibc's
default allocator settings and under a fixed mmap threshold (``ALLOCATORS``), against
``fastzo.memory.encoder_estimate`` (``equal_memory_peaks.csv``; a few minutes per variant). It also
times those steps: every variant's CPU seconds per step side by side on one machine.

Machines: the cells of this grid take more hours than one machine may stay the same, and CPU
seconds per step depend on the CPU (bf16 matrix units, vector width). Accuracy per step does not.
So every row records its CPU model, a cell never continues on another CPU model (it starts over
and its earlier rows move to ``equal_memory_interrupted.csv``), and the report gives the time to
reach the target both on each cell's own clock and as steps x each variant's per-step cost
measured side by side by ``--memory`` on one machine.

Writes ``benchmarks/results/equal_memory.csv`` and ``.png`` (``--report`` redraws the figure and
prints the summary: peak memory, accuracy, time to reach MiniLM backprop's best accuracy).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

try:
    import fastzo  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastzo.benchmark import cpu_name  # noqa: E402

# CPU flags that change what a step costs here (bf16 and int8 matrix units, vector width).
COST_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_features() -> str:
    """What tells apart CPUs that share a generic model name (clouds report 'Intel(R) Xeon(R)
    Processor' for generations with and without AMX): family, model, stepping and COST_FLAGS."""
    info: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model", "stepping", "flags") and key not in info:
                    info[key] = value.strip()
                if not line.strip() and info:
                    break
    except OSError:
        return ""
    flags = set(info.get("flags", "").split())
    head = " ".join(f"{k.split()[-1]} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info)
    return "; ".join(filter(None, [head, " ".join(f for f in COST_FLAGS if f in flags)]))


def this_machine() -> tuple:
    return cpu_name(), cpu_features()


def machine_of(row: dict) -> tuple:
    return row.get("cpu_model", ""), row.get("cpu_features", "")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}
MODEL_LABELS = {"minilm": "MiniLM-L6 (22.7 M)", "mpnet": "MPNet-base (109.5 M)"}
TASKS = {"movie": "movie-snippets", "amazon": "amazon-snippets"}
TASK_LABELS = {"movie": "movie-review snippets", "amazon": "Amazon product-review snippets"}
TEST_SIZE, VAL_SIZE, SPLIT_SEED = 2000, 500, 0
BATCH, MAX_LENGTH, EVAL_BATCH, EPS = 16, 64, 32, 1e-3
SEEDS = (0, 1)
# Learning-rate grids and the length of the selection runs (steps), per (model, method).
# MeZO's grid lies below 5e-5, whose training loss diverged after 1,000 steps on MPNet (first
# protocol); its selection runs are the seed-0 main runs (the whole horizon), backprop's are short.
# Backprop's grids reach above 1e-4, the largest of the first protocol's grid and its choice.
LR_GRIDS = {("minilm", "bp"): (1e-5, 3e-5, 1e-4, 3e-4), ("mpnet", "bp"): (1e-5, 3e-5, 1e-4),
            ("minilm", "mezo"): (1e-5, 2e-5), ("mpnet", "mezo"): (1e-5, 2e-5)}
LR_STEPS = {"bp": 100}
# Steps of the main runs and where the test and validation splits are evaluated (an evaluation
# of MPNet on both splits costs about two minutes, so MeZO's are spread out). MiniLM backprop
# runs three epochs of the movie training split: its accuracy still rose at step 500.
MAIN_EVALS = {
    ("minilm", "bp"): (0, 25, 50, 100, 150, 200, 300, 400, 500, 750, 1000, 1500),
    ("mpnet", "bp"): (0, 25, 50, 100, 200, 300),
    ("minilm", "mezo"): (0, 250, 500, 1000, 1500, 2000),
    ("mpnet", "mezo"): (0, 250, 500, 1000, 1500, 2000),
}

FIELDS = ["time_utc", "git_commit", "phase", "cell", "task", "model", "method", "dtype", "distribution",
          "seed", "lr", "eps", "batch_size", "max_length", "fused_steps", "step", "steps_total",
          "train_cpu_s", "train_wall_s", "split", "n_eval", "accuracy", "accuracy_se", "eval_loss",
          "train_loss_ema", "peak_rss_mib", "baseline_rss_mib", "memory_kind", "params", "backend", "threads", "omp_wait_policy", "cpu_model",
          "load1", "load5", "load15", "cpu_features"]


@dataclass
class Cell:
    phase: str  # "lr" (backprop's selection run: validation split) or "main" (test + validation)
    task: str
    model: str
    method: str  # "mezo" or "bp"
    seed: int
    lr: float | None  # None: chosen from the selection rows of the CSV when the cell starts
    evals: tuple
    dtype: str = "float32"
    distribution: str = "gaussian"

    @property
    def steps(self) -> int:
        return self.evals[-1]

    @property
    def split(self) -> str:
        """The split whose row at the last step marks the cell done."""
        return "validation" if self.phase == "lr" else "test"

    @property
    def splits(self) -> tuple:
        """The splits evaluated at each step, in the order their rows are written."""
        return ("validation",) if self.phase == "lr" else ("validation", "test")

    @property
    def selects_lr(self) -> bool:
        """A MeZO cell whose final validation loss takes part in choosing the lr."""
        return (self.phase == "main" and self.method == "mezo" and self.seed == 0 and self.dtype == "float32"
                and self.distribution == "gaussian")

    @property
    def name(self) -> str:
        parts = [self.phase, self.task, self.model, self.method]
        if self.method == "mezo":
            parts += [self.dtype, self.distribution]
        lr = "?" if self.lr is None else f"{self.lr:g}"
        return "/".join(parts + [f"lr{lr}", f"seed{self.seed}"])


# ------------------------------------------------------------------------------------ the plan
def plan(smoke: bool = False) -> list[Cell]:
    """All cells, most informative first: movie seed 0 (MiniLM backprop, then MPNet MeZO
    float32 at each lr of its grid, Rademacher, bf16, MiniLM MeZO, MPNet backprop), then Amazon
    seed 0, then seed 1. Backprop's selection cells come right before its first main cell; MeZO's
    are its seed-0 float32 Gaussian main cells, one per lr, before every cell that uses the lr."""
    cells: list[Cell] = []
    seen_lr = set()

    def add_main(task, model, method, seed, **kw):
        key = (task, model, method)
        evals = MAIN_EVALS[(model, method)] if not smoke else SMOKE_EVALS[method]
        grid = LR_GRIDS[(model, method)][: (2 if smoke else None)]
        if method == "bp" and key not in seen_lr:
            seen_lr.add(key)
            steps = LR_STEPS[method] if not smoke else SMOKE_EVALS[method][-1]
            cells.extend(Cell("lr", task, model, method, 0, lr, (0, steps)) for lr in grid)
        cell = Cell("main", task, model, method, seed, None, evals, **kw)
        if cell.selects_lr:  # the largest lr first: the fastest if it stays stable
            cells.extend(dataclasses.replace(cell, lr=lr) for lr in sorted(grid, reverse=True))
        else:
            cells.append(cell)

    tasks = ["movie"] if smoke else list(TASKS)
    seeds = (0,) if smoke else SEEDS
    for seed in seeds:
        for task in tasks:
            add_main(task, "minilm", "bp", seed)
            add_main(task, "mpnet", "mezo", seed)
            add_main(task, "mpnet", "mezo", seed, distribution="rademacher")
            add_main(task, "mpnet", "mezo", seed, dtype="bfloat16")
            add_main(task, "minilm", "mezo", seed)
            if not smoke:
                add_main(task, "mpnet", "bp", seed)
    return cells


SMOKE_EVALS = {"bp": (0, 2, 4), "mezo": (0, 2, 4)}


# ----------------------------------------------------------------------------------- the CSV
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict], fields: list[str] = FIELDS) -> None:
    """Replace ``path`` by ``rows`` atomically (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in rows)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def append_row(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:  # written by an older version: same rows, the new columns empty
            write_rows(path, read_rows(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in FIELDS})
        f.flush()
        os.fsync(f.fileno())


def interrupted_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.stem + "_interrupted.csv")


def _row_key(r: dict) -> tuple:
    return r["cell"], str(r["step"]), r["split"], r["time_utc"]


def set_aside(csv_path: Path, cell_name: str, extra: list[dict] = ()) -> None:
    """Move the rows of a cell that starts over (and ``extra`` rows of it that never reached the
    CSV) to the ``_interrupted`` side file: the side file first, each row once, then the CSV, so
    a crash in between repeats nothing and loses nothing."""
    rows = read_rows(csv_path)
    side = interrupted_path(csv_path)
    aside = read_rows(side)
    known = {_row_key(r) for r in aside}
    moving = [r for r in rows if r["cell"] == cell_name] + list(extra)
    write_rows(side, aside + [r for r in moving if _row_key(r) not in known])
    write_rows(csv_path, [r for r in rows if r["cell"] != cell_name])


def cell_done(rows: list[dict], cell: Cell) -> bool:
    return any(r["cell"] == cell.name and int(r["step"]) == cell.steps and r.get("split", cell.split) == cell.split
               for r in rows)


def is_selection_row(r: dict) -> bool:
    """A row that takes part in choosing its (task, model, method)'s lr: the last validation row
    of a backprop selection run or of a seed-0 float32 Gaussian MeZO main run."""
    if r.get("split", "validation") != "validation" or int(r["step"]) != int(r["steps_total"]):
        return False
    if r["method"] == "bp":
        return r["phase"] == "lr"
    return (r["phase"] == "main" and int(r["seed"]) == 0 and r.get("dtype", "float32") == "float32"
            and r.get("distribution", "gaussian") == "gaussian")


def chosen_lr(rows: list[dict], task: str, model: str, method: str) -> float | None:
    """The lr with the lowest validation loss at the end of its selection run; None until every
    lr of the grid has finished its run."""
    grid = LR_GRIDS[(model, method)]
    final = {}
    for r in rows:
        if (r["task"], r["model"], r["method"]) == (task, model, method) and is_selection_row(r):
            final[float(r["lr"])] = float(r["eval_loss"])
    if not final or (method == "mezo" and not all(any(math.isclose(lr, g) for lr in final) for g in grid)):
        return None
    usable = {lr: loss for lr, loss in final.items() if math.isfinite(loss)}
    if not usable:
        return min(grid)
    return min(usable, key=lambda lr: (usable[lr], lr))


# ------------------------------------------------------------------------------ environment
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        # The results this run appends to do not make the code dirty.
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# ------------------------------------------------------------------------------- one cell
def load_task(task: str, smoke: bool):
    """(spec-independent) train / validation / test texts and labels, split once."""
    from fastzo.finetune import load_data, split_data

    data = load_data(TASKS[task])
    test_size = 64 if smoke else TEST_SIZE
    val_size = 32 if smoke else VAL_SIZE
    (train_texts, train_labels), test = split_data(data, test_size, SPLIT_SEED, None)
    val = (train_texts[:val_size], train_labels[:val_size])
    train = (train_texts[val_size:], train_labels[val_size:])
    if smoke:
        train = (train[0][:256], train[1][:256])
    return data, train, val, test


def prepare_cell(cell: Cell, smoke: bool, threads: int | None) -> SimpleNamespace:
    """Data, tokenizer, model and trainer of a cell, as its training process holds them; the
    process baseline (RSS before the model) is measured after the data is encoded."""
    import torch

    from fastzo.finetune import (DEFAULT_TEMPLATE, Task, Trainer, _resolved_backend, _rss_mb,
                                 _trim_process_memory, build_model, encode_all, resolve_model)

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cpu")
    data, train, val, test = load_task(cell.task, smoke)
    spec = resolve_model(MODELS[cell.model], "embedding", 2, None, DEFAULT_TEMPLATE, cell.seed,
                         descriptions=data.descriptions)
    train_ids = encode_all(spec, train[0], MAX_LENGTH)
    evals = {split: (encode_all(spec, texts, MAX_LENGTH), labels)
             for split, (texts, labels) in (("validation", val), ("test", test)) if split in cell.splits}
    _trim_process_memory()
    baseline = _rss_mb("VmRSS")  # torch, transformers, tokenizer and data; no model yet
    model = build_model(spec).to(dtype=getattr(torch, cell.dtype))
    kwargs = dict(lr=cell.lr, weight_decay=0.0, seed=cell.seed)
    if cell.method == "mezo":
        kwargs.update(eps=EPS, distribution=cell.distribution, fused_steps=True)
    trainer = Trainer(cell.method, Task("embedding", model), device, **kwargs)
    backend = _resolved_backend(None, device) if cell.method == "mezo" else "autograd"
    return SimpleNamespace(device=device, train=train, train_ids=train_ids, evals=evals,
                           pad=spec.tokenizer.pad_id, baseline=baseline, model=model, trainer=trainer,
                           backend=backend)


def run_cell(cell: Cell, csv_path: Path, work_dir: Path, smoke: bool, threads: int | None) -> None:
    """Train and evaluate one cell in this process, continuing from its checkpoint if any."""
    import torch

    from fastzo.finetune import train_batches

    c = prepare_cell(cell, smoke, threads)
    device, train, trainer, model, pad = c.device, c.train, c.trainer, c.model, c.pad
    train_ids, baseline, backend = c.train_ids, c.baseline, c.backend

    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / (cell.name.replace("/", "__") + ".pt")
    rows = [r for r in read_rows(csv_path) if r["cell"] == cell.name]
    ema = None  # of the training loss, carried over a resume by the checkpoint
    state = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    if state is not None and machine_of(state["rows"][0]) != this_machine():  # one CPU per cell
        print(f"[{cell.name}] the checkpoint ran on {machine_of(state['rows'][0])}, this is {this_machine()}: "
              "starting over", flush=True)
        set_aside(csv_path, cell.name, extra=state["rows"])
        rows, state = [], None
        ckpt.unlink()
    if state is not None:
        if state["rows"][0]["lr"] != cell.lr:
            raise SystemExit(f"[{cell.name}] the checkpoint {ckpt} was trained with lr {state['rows'][0]['lr']}, "
                             f"this cell has lr {cell.lr}: delete it to start the cell over")
        trainer.load_state_dict(state["trainer"])
        pending, ema = state["rows"], state.get("train_loss_ema")
        del state
        for row in pending:  # the checkpoint was saved, its rows perhaps not yet written
            if not any(int(r["step"]) == trainer.step and r["split"] == row["split"] for r in rows):
                append_row(csv_path, row)
        print(f"[{cell.name}] continuing from step {trainer.step}", flush=True)
    elif rows:
        # Its clocks cannot continue (perhaps not even on the same CPU): the cell starts over and
        # its earlier rows move to a side file, so that every row of a cell comes from one run.
        set_aside(csv_path, cell.name)
        print(f"[{cell.name}] rows without a checkpoint: starting over (earlier rows moved to "
              f"{interrupted_path(csv_path).name})", flush=True)
    batches = train_batches(train_ids, train[1], BATCH, cell.seed, pad, device)
    for _ in range(trainer.step):  # the same batch sequence as an uninterrupted run
        next(batches)

    base = dict(git_commit=git_commit(), phase=cell.phase, cell=cell.name, task=cell.task, model=cell.model,
                method=cell.method, dtype=cell.dtype, distribution=cell.distribution if cell.method == "mezo" else "",
                seed=cell.seed, lr=cell.lr, eps=EPS if cell.method == "mezo" else "", batch_size=BATCH,
                max_length=MAX_LENGTH, fused_steps=cell.method == "mezo", steps_total=cell.steps,
                params=sum(p.numel() for p in model.parameters()),
                backend=backend, threads=torch.get_num_threads(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""), cpu_model=cpu_name(),
                cpu_features=cpu_features())

    def on_step(tr, loss):
        nonlocal ema
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        if tr.step % 50 == 0:
            print(f"[{cell.name}] step {tr.step}/{cell.steps} loss(ema) {ema:.4f} "
                  f"cpu {tr.cpu_seconds:.0f} s wall {tr.train_seconds:.0f} s", flush=True)

    for at in cell.evals:
        if at < trainer.step or (at == trainer.step and any(int(r["step"]) == at and r["split"] == cell.split
                                                            for r in read_rows(csv_path) if r["cell"] == cell.name)):
            continue
        trainer.train(batches, at - trainer.step, on_step)
        new_rows = []
        for split in cell.splits:
            eval_ids, eval_labels = c.evals[split]
            acc, loss = trainer.evaluate(eval_ids, eval_labels, EVAL_BATCH, pad)
            load = os.getloadavg()
            new_rows.append(dict(
                base, time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), step=trainer.step,
                train_cpu_s=round(trainer.cpu_seconds, 2), train_wall_s=round(trainer.train_seconds, 2),
                split=split, n_eval=len(eval_ids), accuracy=round(acc, 5),
                accuracy_se=round(math.sqrt(acc * (1 - acc) / len(eval_ids)), 5), eval_loss=round(loss, 5),
                train_loss_ema=round(ema, 5) if ema is not None else "",
                peak_rss_mib=round(trainer.peak_mb, 1) if trainer.peak_mb else "",
                baseline_rss_mib=round(baseline, 1) if baseline else "", memory_kind=trainer.memory_kind or "",
                load1=round(load[0], 2), load5=round(load[1], 2), load15=round(load[2], 2)))
            print(f"[{cell.name}] step {trainer.step}: {split} accuracy {100 * acc:.2f} % (loss {loss:.4f}), "
                  f"peak {new_rows[-1]['peak_rss_mib']} MiB, cpu {new_rows[-1]['train_cpu_s']} s", flush=True)
        if at != cell.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"trainer": trainer.state_dict(), "rows": new_rows, "train_loss_ema": ema}, tmp)
            tmp.replace(ckpt)
        written = {(int(r["step"]), r["split"]) for r in read_rows(csv_path) if r["cell"] == cell.name}
        for row in new_rows:  # the split that marks the cell done comes last
            if (row["step"], row["split"]) not in written:  # (written before an interruption)
                append_row(csv_path, row)
    if ckpt.exists():
        ckpt.unlink()  # done: the CSV holds the result


def probe_runtime(threads: int | None = None) -> dict:
    """In this (fresh) process: the RSS a cell holds before its model (imports, tokenizer, data),
    and what the compute libraries add once a model has run forward, backward and MeZO steps,
    measured with a 2-layer toy encoder (hidden 32) whose own bytes are negligible. Both enter
    the memory model's prediction as the process baseline."""
    import torch

    from fastzo.finetune import (DEFAULT_TEMPLATE, Task, Trainer, _rss_mb, _trim_process_memory, build_model,
                                 encode_all, load_data, resolve_model, train_batches)

    if threads:
        torch.set_num_threads(threads)
    data = load_data(TASKS["movie"])
    spec = resolve_model(MODELS["minilm"], "embedding", 2, None, DEFAULT_TEMPLATE, 0, descriptions=data.descriptions)
    ids = encode_all(spec, data.texts[:512], MAX_LENGTH)
    _trim_process_memory()
    before = _rss_mb("VmRSS")
    toy = resolve_model("tiny-bert", "embedding", 2, None, DEFAULT_TEMPLATE, 0, descriptions=data.descriptions)
    toy_ids = [[min(i, toy.tokenizer.vocab_size - 1) for i in seq] for seq in ids]
    for method in ("bp", "mezo"):
        model = build_model(toy)
        trainer = Trainer(method, Task("embedding", model), torch.device("cpu"), lr=1e-5)
        batches = train_batches(toy_ids, data.labels[:512], BATCH, 0, toy.tokenizer.pad_id, torch.device("cpu"))
        trainer.train(batches, 3)
        del trainer, model
    _trim_process_memory()
    after = _rss_mb("VmRSS")
    return {"baseline_mib": round(before, 1), "runtime_mib": round(after - before, 1)}


# Allocator settings of the memory probe. glibc's default raises its mmap threshold after the
# first large free (up to 32 MiB), so later tensors below it come from heap arenas that keep freed
# pages: the peak RSS then exceeds the live tensors by what the arenas retain. A fixed threshold
# maps and unmaps every tensor of 128 KiB or more, so the peak RSS follows the live tensors.
ALLOCATORS = {"glibc default": {}, "fixed mmap threshold 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
MEMORY_STEPS = 20
PEAK_FIELDS = ["time_utc", "git_commit", "allocator", "model", "method", "dtype", "distribution", "steps",
               "baseline_rss_mib", "runtime_mib", "peak_rss_mib", "predicted_mib", "error_pct",
               "cpu_s_per_step", "wall_s_per_step", "timed_steps", "threads", "cpu_model", "cpu_features", "load1"]
WARMUP_STEPS = 2  # steps before the per-step cost is timed (first-call allocations, thread pools)


def probe_memory(cell: Cell, smoke: bool, threads: int | None, steps: int) -> dict:
    """In this (fresh) process: the peak RSS of ``steps`` training steps of a cell, with no
    evaluation before or between them (an evaluation's batches would leave the heap larger), and
    the CPU and wall seconds per step after ``WARMUP_STEPS``: every variant's step cost on one
    machine, which the cells' own clocks cannot give when they ran on different machines."""
    from fastzo.finetune import train_batches

    if steps <= WARMUP_STEPS:
        raise ValueError(f"the memory probe needs more than {WARMUP_STEPS} steps (warmup), got {steps}")
    c = prepare_cell(cell, smoke, threads)
    batches = train_batches(c.train_ids, c.train[1], BATCH, cell.seed, c.pad, c.device)
    c.trainer.train(batches, WARMUP_STEPS)
    cpu0, wall0 = c.trainer.cpu_seconds, c.trainer.train_seconds
    timed = steps - WARMUP_STEPS
    c.trainer.train(batches, timed)
    return {"baseline_mib": round(c.baseline, 1), "peak_mib": round(c.trainer.peak_mb, 1),
            "cpu_s_per_step": round((c.trainer.cpu_seconds - cpu0) / timed, 4),
            "wall_s_per_step": round((c.trainer.train_seconds - wall0) / timed, 4), "timed_steps": timed}


def memory_variants(smoke: bool) -> list[Cell]:
    """One cell per variant (model, method, dtype, z) of the plan, as a memory probe runs it."""
    seen, cells = set(), []
    for cell in plan(smoke):
        key = (cell.model, cell.method, cell.dtype, cell.distribution)
        if cell.phase == "main" and key not in seen:
            seen.add(key)
            cells.append(dataclasses.replace(cell, lr=LR_GRIDS[(cell.model, cell.method)][0]))
    return cells


def measure_memory(args) -> int:
    """Every variant's peak RSS and step cost in fresh processes, under each allocator setting,
    against ``fastzo.memory``'s prediction with the runtime share measured under the same setting.
    Replaces the rows of this CPU model and keeps those of others."""
    out = Path(args.csv).with_name(Path(args.csv).stem + "_peaks.csv")
    steps = 3 if args.smoke else MEMORY_STEPS
    rows = []
    for allocator, extra_env in ALLOCATORS.items():
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **extra_env)
        runtime = _runtime_mib(args.threads, env)
        for cell in memory_variants(args.smoke):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-memory",
                   json.dumps(dataclasses.asdict(cell)), "--memory-steps", str(steps)]
            if args.smoke:
                cmd.append("--smoke")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(f"[{allocator}] {cell.model} {cell.method}: failed\n{res.stderr[-2000:]}", flush=True)
                continue
            got = json.loads(res.stdout.strip().splitlines()[-1])
            predicted = predicted_peak_mib(cell.model, cell.method, cell.dtype, got["baseline_mib"] + runtime)
            error = 100 * (predicted - got["peak_mib"]) / got["peak_mib"] if predicted else None
            row = dict(time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), git_commit=git_commit(),
                       allocator=allocator, model=cell.model, method=cell.method, dtype=cell.dtype,
                       distribution=cell.distribution if cell.method == "mezo" else "", steps=steps,
                       baseline_rss_mib=got["baseline_mib"], runtime_mib=runtime, peak_rss_mib=got["peak_mib"],
                       predicted_mib=round(predicted, 1) if predicted else "",
                       error_pct=round(error, 1) if error is not None else "",
                       cpu_s_per_step=got["cpu_s_per_step"], wall_s_per_step=got["wall_s_per_step"],
                       timed_steps=got["timed_steps"],
                       threads=args.threads or "", cpu_model=cpu_name(), cpu_features=cpu_features(),
                       load1=round(os.getloadavg()[0], 2))
            rows.append(row)
            print(f"[{allocator}] {_label(_variant(row))}: peak {got['peak_mib']:,.0f} MiB, predicted "
                  f"{row['predicted_mib']} MiB ({row['error_pct']} %), {got['cpu_s_per_step']:.3f} CPU s/step",
                  flush=True)
    if not rows:
        print(f"no probe succeeded: {out} left as it was", flush=True)
        return 1

    def probe_key(r):
        return machine_of(r), r["allocator"], _variant(r)
    measured = {probe_key(r) for r in rows}
    write_rows(out, [r for r in read_rows(out) if probe_key(r) not in measured] + rows, PEAK_FIELDS)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------- the driver
def drive(args) -> int:
    csv_path = Path(args.csv)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    cells = plan(args.smoke)
    failures = 0
    for cell in cells:
        rows = read_rows(csv_path)
        if cell.lr is None:
            cell.lr = chosen_lr(rows, cell.task, cell.model, cell.method)
            if cell.lr is None:
                print(f"[{cell.name}] no lr chosen (its selection runs failed or have not finished): skipped",
                      flush=True)
                continue
        if cell_done(rows, cell) or not any(fnmatch.fnmatchcase(cell.name, pattern) for pattern in args.only):
            continue
        print(f"=== {cell.name} (lr {cell.lr:g}, {cell.steps} steps) {time.strftime('%H:%M:%S')}", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-cell", json.dumps(dataclasses.asdict(cell)),
               "--csv", str(csv_path), "--work-dir", str(work_dir)]
        if args.smoke:
            cmd.append("--smoke")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        # Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread
        # whose partner is descheduled burns CPU time that would be counted as training time.
        env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            failures += 1
            print(f"[{cell.name}] failed with exit code {rc}; continuing with the next cell", flush=True)
    report(csv_path, Path(args.figure), smoke=args.smoke, markdown=Path(args.figure).with_suffix(".md"))
    return 1 if failures else 0


def status(args) -> int:
    rows = read_rows(Path(args.csv))
    work_dir = Path(args.work_dir)
    for cell in plan(args.smoke):
        if cell.lr is None:
            cell.lr = chosen_lr(rows, cell.task, cell.model, cell.method)
        mine = [r for r in rows if r["cell"] == cell.name]
        last = max((int(r["step"]) for r in mine), default=None)
        ckpt = (work_dir / (cell.name.replace("/", "__") + ".pt")).exists()
        state = ("done" if last == cell.steps else f"at step {last}" if last is not None else "to do")
        print(f"  {cell.name:<62} {state}{' (checkpoint)' if ckpt else ''}")
    return 0


# ------------------------------------------------------------------------------- the report
COLORS = {("minilm", "bp"): "C3", ("minilm", "mezo"): "C1", ("mpnet", "bp"): "C4",
          ("mpnet", "mezo", "float32", "gaussian"): "C0", ("mpnet", "mezo", "float32", "rademacher"): "C2",
          ("mpnet", "mezo", "bfloat16", "gaussian"): "C9"}


def _variant(r) -> tuple:
    if r["method"] == "bp" or r["model"] == "minilm":
        return (r["model"], r["method"])
    return (r["model"], r["method"], r["dtype"], r["distribution"])


def _entry_order(key) -> tuple:
    """Table and legend order of a (task, variant, lr) key: by variant, then lr."""
    return list(COLORS).index(key[1]), key[2]


def _lr_text(entry) -> str:
    return f"{entry['lr']:.0e}" + {True: "", False: " (not chosen)", None: " (selection pending)"}[entry["chosen"]]


def _label(variant) -> str:
    model, method = variant[0], variant[1]
    text = f"{MODEL_LABELS[model]}, {'backprop (AdamW)' if method == 'bp' else 'MeZO'}"
    if len(variant) > 2:
        text += {("float32", "gaussian"): "", ("float32", "rademacher"): " Rademacher",
                 ("bfloat16", "gaussian"): " bf16"}[variant[2:]]
    return text


def summarize(rows: list[dict]) -> dict:
    """Per (task, variant, lr) of the main cells: test curves and validation curves per seed,
    peaks and baselines per seed, steps planned, and whether the lr is the chosen one (True),
    lost the selection (False) or awaits it (None)."""
    out: dict = {}
    choices: dict = {}  # (task, model, method) -> chosen lr, looked up once
    for r in rows:
        if r["phase"] != "main":
            continue
        lr = float(r["lr"])
        key = (r["task"], _variant(r), lr)
        which = (r["task"], r["model"], r["method"])
        if which not in choices:
            choices[which] = chosen_lr(rows, *which)
        chosen = choices[which]
        entry = out.setdefault(key, {"curves": {}, "val": {}, "peaks": {}, "baselines": {}, "cpus": {}, "lr": lr,
                                     "steps_total": int(r["steps_total"]),
                                     "chosen": None if chosen is None else math.isclose(chosen, lr)})
        seed = int(r["seed"])
        entry["cpus"].setdefault(seed, set()).add(short_cpu(r.get("cpu_model", "")))
        point = (int(r["step"]), float(r["train_cpu_s"]), float(r["train_wall_s"]), float(r["accuracy"]),
                 float(r["accuracy_se"]), float(r["eval_loss"]))
        entry["val" if r.get("split") == "validation" else "curves"].setdefault(seed, []).append(point)
        if r["peak_rss_mib"] and int(r["step"]) > 0:  # a step-0 row has no training step yet
            entry["peaks"][seed] = max(entry["peaks"].get(seed, 0.0), float(r["peak_rss_mib"]))
        if r.get("baseline_rss_mib"):
            entry["baselines"][seed] = float(r["baseline_rss_mib"])
    for entry in out.values():
        for curves in (entry["curves"], entry["val"]):
            for curve in curves.values():
                curve.sort()
    return out


def at_best_validation(test_curve, val_curve):
    """(step, test accuracy) at the evaluated step with the lowest validation loss (the earliest
    of equals): early stopping chosen without the test set. None without validation rows."""
    test_at = {p[0]: p[3] for p in test_curve}
    points = [p for p in val_curve if p[0] in test_at]
    if not points:
        return None
    best = min(points, key=lambda p: (p[5] if math.isfinite(p[5]) else math.inf, p[0]))
    return best[0], test_at[best[0]]


def short_cpu(name: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'Intel Xeon'."""
    for noise in ("(R)", "(TM)", " Processor", " CPU"):
        name = name.replace(noise, "")
    return " ".join(name.split()) or "?"


def machine_label(machine: tuple) -> str:
    name, features = machine
    return short_cpu(name) + (f" ({features})" if features else "")


def step_costs(probes: list[dict]) -> dict:
    """{machine: {variant: CPU s per step}} from the probe rows under glibc's default allocator
    (the cells' own setting)."""
    out: dict = {}
    for r in probes:
        if r.get("cpu_s_per_step") and r["allocator"] == next(iter(ALLOCATORS)):
            out.setdefault(machine_of(r), {})[_variant(r)] = float(r["cpu_s_per_step"])
    return out


def time_to_reach(curve, target: float, axis: int = 1):
    """First time (CPU s by default) at which the accuracy is >= target, else None."""
    for point in curve:
        if point[3] >= target - 1e-12:
            return point[axis]
    return None


def _mean_se(values):
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def backprop_target(table, entries):
    """The small model's best backprop accuracy, the bar the other cells are timed against: each
    seed's best held-out accuracy, averaged over seeds (the max over seeds would raise the bar with
    every seed added). Returns (mean, standard error or None), or (None, None) before it has run."""
    bests = [max(p[3] for p in curve) for key in entries
             if key[1] == ("minilm", "bp") and table[key]["chosen"] is not False
             for curve in table[key]["curves"].values() if curve]
    return _mean_se(bests) if bests else (None, None)


def _pct(mean, se=None):
    return f"{100 * mean:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "")


def predicted_peak_mib(model: str, method: str, dtype: str, baseline_mib: float) -> float | None:
    """``fastzo.memory``'s encoder model for a cell: batch 16, length 64 (the longest a batch can
    be), weights and activations in the cell's dtype, plus the cell's measured import baseline."""
    from fastzo import memory
    from fastzo.integrations import assets

    try:
        folder = assets.named_model_path(MODELS[model], download=False)
    except (assets.AssetUnavailable, KeyError):
        return None
    width = 2.0 if dtype == "bfloat16" else 4.0
    run = memory.EncoderRun(batch_size=BATCH, seq_len=MAX_LENGTH, weight_bytes=width, act_bytes=width,
                            baseline=baseline_mib * 2**20)
    est = memory.encoder_estimate(memory.encoder_spec_from_config(folder), run)
    return est["BP" if method == "bp" else "MeZO"].step_peak / 2**20


def _runtime_mib(threads: int | None = None, env: dict | None = None) -> float:
    values = []
    for _ in range(3):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-runtime"]
        if threads:
            cmd += ["--threads", str(threads)]
        env = env or dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if out.returncode == 0:
            values.append(json.loads(out.stdout.strip().splitlines()[-1])["runtime_mib"])
    return sorted(values)[len(values) // 2] if values else 0.0


def _machines(rows, short: bool = False) -> str:
    """The machines the cells ran on, with how many cells each ran."""
    cells: dict = {}
    for r in rows:
        name = short_cpu(r["cpu_model"]) if short else machine_label(machine_of(r))
        cells.setdefault(name, set()).add(r["cell"])
    return ", ".join(f"{cpu} ({len(names)} cells)" for cpu, names in sorted(cells.items()))


def _reach_at_one_cost(table, entries, target, costs) -> list[str]:
    """Steps to reach the target times each variant's per-step CPU cost measured side by side on
    one machine (``--memory``): a comparison of time that does not depend on which machine ran
    which cell (accuracy per step does not depend on the machine; CPU s per step does)."""
    if not costs:
        return ["No per-step costs measured side by side yet (`--memory`): times to reach the target only on "
                "each cell's own machine.", ""]
    lines = []
    for machine, per_step in costs.items():
        parts = []
        for key in entries:
            e = table[key]
            if e["chosen"] is False:
                continue
            if key[1] not in per_step:
                parts.append(f"{_label(key[1])}: step cost not probed")
                continue
            reach = [time_to_reach(c, target, axis=0) for _, c in sorted(e["curves"].items())]
            text = ", ".join("not reached" if st is None else f"{st * per_step[key[1]]:,.0f}" for st in reach)
            parts.append(f"{_label(key[1])} ({per_step[key[1]]:.2f} CPU s/step): {text}")
        lines += [f"CPU s to reach the target at the per-step cost of {machine_label(machine)} (the first "
                  "evaluated step at or above the target x the variant's CPU s per step, measured side by side "
                  "by `--memory`; evaluations excluded; an upper bound as fine as each cell's evaluation "
                  "schedule): " + "; ".join(parts) + ".", ""]
    return lines


def report(csv_path: Path, figure: Path, smoke: bool = False, markdown: Path | None = None,
           threads: int | None = None) -> str:
    rows = read_rows(csv_path)
    if not rows:
        print(f"no rows in {csv_path} yet")
        return ""
    table = summarize(rows)
    tasks = [t for t in TASKS if any(k[0] == t for k in table)]
    peaks_csv = csv_path.with_name(csv_path.stem + "_peaks.csv")
    probes = read_rows(peaks_csv)
    costs = step_costs(probes)
    lines = []
    for task in tasks:
        entries = sorted((k for k in table if k[0] == task), key=_entry_order)
        target, target_se = backprop_target(table, entries)
        n_eval = next(r["n_eval"] for r in rows if r["task"] == task and r["phase"] == "main"
                      and r.get("split", "test") == "test")
        head = f"### {TASK_LABELS[task]} ({n_eval} held out)"
        if target is not None:
            head += (f": MiniLM backprop's best held-out accuracy {_pct(target, target_se)} % (the target below; "
                     "the mean over its seeds of each seed's best)")
        lines += [head, "",
                  "| cell | lr | seeds | ran on | steps done / planned | CPU s (train) | peak RSS MiB "
                  "| accuracy at step 0 | last accuracy | best accuracy | at the best validation loss (step) "
                  "| steps (CPU s on its own machine) to reach the target |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in entries:
            e = table[key]
            curves = e["curves"]
            seeds = sorted(curves)
            first = _mean_se(curves[sd][0][3] for sd in seeds)
            last = _mean_se(curves[sd][-1][3] for sd in seeds)
            best = _mean_se(max(p[3] for p in curves[sd]) for sd in seeds)
            stopped = [at_best_validation(curves[sd], e["val"].get(sd, [])) for sd in seeds]
            stopped_text = ", ".join(f"{100 * a:.2f} ({st})" for st, a in filter(None, stopped)) or "–"
            reach = [(time_to_reach(curves[sd], target, axis=0), time_to_reach(curves[sd], target))
                     for sd in seeds] if target is not None else []
            reach_text = ", ".join("not reached" if st is None else f"{st:,} ({t:,.0f})" for st, t in reach) or "–"
            ran_on = ", ".join(sorted(set().union(*e["cpus"].values())))
            done = " / ".join(f"{curves[sd][-1][0]}" for sd in seeds) + f" / {e['steps_total']}"
            cpu = " / ".join(f"{curves[sd][-1][1]:,.0f}" for sd in seeds)
            peak = " / ".join(f"{e['peaks'][sd]:,.0f}" for sd in seeds if sd in e["peaks"]) or "–"
            lines.append(f"| {_label(key[1])} | {_lr_text(e)} | {', '.join(map(str, seeds))} | {ran_on} | {done} | {cpu} "
                         f"| {peak} | {_pct(*first)} | {_pct(*last)} | {_pct(*best)} | {stopped_text} "
                         f"| {reach_text} |")
        lines.append("")
        if target is not None:
            gap = []
            for key in entries:
                if key[1] == ("minilm", "bp") or table[key]["chosen"] is False:
                    continue
                best, best_se = _mean_se(max(p[3] for p in c) for c in table[key]["curves"].values())
                gap.append(f"{_label(key[1])} (lr {key[2]:g}): best {_pct(best, best_se)} % "
                           f"({100 * (best - target):+.2f} points)")
            if gap:
                lines += ["Against the target: " + "; ".join(gap) + ".", ""]
            lines += _reach_at_one_cost(table, entries, target, costs)

    # Memory: measured peak against fastzo.memory's prediction. The process baseline is measured:
    # per cell before its model (imports, tokenizer, data), plus the compute libraries' share
    # measured with a toy model in fresh processes (the median of three).
    runtime = _runtime_mib(threads)
    lines += ["### Peak memory: measured against predicted (`fastzo.memory.encoder_estimate`)", "",
              f"Predicted = the cell's measured RSS before its model (imports, tokenizer, data) + {runtime:.0f} MiB "
              f"that the compute libraries add once a model has run (measured on {short_cpu(cpu_name())} with a "
              "2-layer toy encoder in fresh processes, median of three) + the model's terms at batch 16 and length 64 (the longest a batch "
              "can be). Measured = the peak RSS (VmHWM) over a cell's training steps, averaged over its cells "
              "(learning-rate selection runs included; n = cells).", "",
              "| cell | measured peak RSS MiB | baseline + libraries MiB | predicted MiB | error |",
              "|---|---|---|---|---|"]
    per_cell: dict = {}  # every cell, selection runs included: (variant, cell) -> (peak, baseline)
    for r in rows:
        if r["peak_rss_mib"] and int(r["step"]) > 0:
            key = (_variant(r), r["cell"])
            peak = max(per_cell.get(key, (0.0, 0.0))[0], float(r["peak_rss_mib"]))
            per_cell[key] = (peak, float(r["baseline_rss_mib"] or 0.0))
    for variant in COLORS:
        cells = [v for (var, _), v in per_cell.items() if var == variant]
        if not cells:
            continue
        peaks = [c[0] for c in cells]
        bases = [c[1] for c in cells]
        measured = sum(peaks) / len(peaks)
        base = sum(bases) / len(bases)
        dtype = variant[2] if len(variant) > 2 else "float32"
        predicted = predicted_peak_mib(variant[0], variant[1], dtype, base + runtime)
        err = f"{100 * (predicted - measured) / measured:+.1f} %" if predicted else "–"
        pred = f"{predicted:,.0f}" if predicted else "–"
        lines.append(f"| {_label(variant)} | {measured:,.0f} (n={len(peaks)}) | {base:,.0f} + {runtime:.0f} | {pred} "
                     f"| {err} |")
    lines.append("")

    if probes:
        lines += [f"Peak RSS in fresh processes, {probes[0]['steps']} training steps and no evaluation "
                  f"(`--memory`, {peaks_csv.name}; the runtime share re-measured under each allocator setting):", "",
                  "| cell | CPU | allocator | baseline + libraries MiB | measured peak MiB | predicted MiB | error "
                  "| CPU s / step |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in probes:
            per_step = f"{float(r['cpu_s_per_step']):.3f}" if r.get("cpu_s_per_step") else "–"
            head = f"| {_label(_variant(r))} | {short_cpu(r.get('cpu_model', ''))} | {r['allocator']} "
            lines.append(head + (f"| {float(r['baseline_rss_mib']):,.0f} + {float(r['runtime_mib']):,.0f} | "
                                 f"{float(r['peak_rss_mib']):,.0f} | {float(r['predicted_mib']):,.0f} | "
                                 f"{float(r['error_pct']):+.1f} % | {per_step} |" if r["predicted_mib"] else
                                 f"| – | {float(r['peak_rss_mib']):,.0f} | – | – | {per_step} |"))
        lines.append("")

    # Gaussian against Rademacher on MPNet: accuracy gained per CPU-second and CPU-seconds per step.
    for task in tasks:
        lr = chosen_lr(rows, task, "mpnet", "mezo")
        pair = [table.get((task, ("mpnet", "mezo", "float32", d), lr)) for d in ("gaussian", "rademacher")]
        if lr is None or not all(pair):
            continue
        lines.append(f"Gaussian against Rademacher z on MPNet, {TASK_LABELS[task]} (points per 1,000 CPU s on the "
                     "cell's own clock, and at each probed machine's per-step cost):")
        for name, e in zip(("Gaussian", "Rademacher"), pair):
            parts = []
            variant = ("mpnet", "mezo", "float32", name.lower())
            for sd, c in sorted(e["curves"].items()):
                if c[-1][0] == 0:
                    continue
                gain = c[-1][3] - c[0][3]
                at_cost = "".join(f"; {100 * gain / (c[-1][0] * per[variant]) * 1000:+.3f} at "
                                  f"{short_cpu(machine[0])}'s {per[variant]:.2f} CPU s/step"
                                  for machine, per in costs.items() if variant in per)
                parts.append(f"seed {sd} on {', '.join(sorted(e['cpus'][sd]))}: {c[-1][0]} steps, "
                             f"{c[-1][1] / c[-1][0]:.2f} CPU s/step, accuracy {100 * c[0][3]:.2f} -> "
                             f"{100 * c[-1][3]:.2f} % ({100 * gain / c[-1][1] * 1000:+.3f} points per 1,000 CPU s"
                             f"{at_cost})")
            lines.append(f"- {name}: " + ("; ".join(parts) or "no steps yet"))
        lines.append("")

    # The learning rates chosen on the validation split.
    lines += ["Learning rates chosen on the 500-example validation split (validation loss and accuracy at the "
              "end of each selection run: backprop 100 steps, MeZO its seed-0 float32 Gaussian main run):", ""]
    for task in TASKS:
        for model in MODELS:
            for method in ("bp", "mezo"):
                finals = sorted((float(r["lr"]), float(r["eval_loss"]), float(r["accuracy"]), int(r["step"]))
                                for r in rows if (r["task"], r["model"], r["method"]) == (task, model, method)
                                and is_selection_row(r))
                if finals:
                    chosen = chosen_lr(rows, task, model, method)
                    lines.append(f"- {task}, {MODEL_LABELS[model]}, {method}: " + ", ".join(
                        f"{lr:g}: {loss:.4f} ({100 * acc:.1f} %, step {step})" for lr, loss, acc, step in finals)
                        + (f" -> {chosen:g}" if chosen is not None else " -> pending (grid not finished)"))
    loads = [float(r["load1"]) for r in rows if r["load1"]]
    lines += ["", f"Machines: {_machines(rows)}; {rows[0]['threads']} threads, OMP_WAIT_POLICY "
              f"{rows[0].get('omp_wait_policy') or 'unset'}; 1-minute load average at the evaluations "
              f"{min(loads):.1f}–{max(loads):.1f} (median {sorted(loads)[len(loads) // 2]:.1f}); "
              f"commits {', '.join(sorted({r['git_commit'] for r in rows}))}; {len(rows)} rows, "
              f"last at {rows[-1]['time_utc']}."]
    text = "\n".join(lines)
    print(text)
    if markdown is not None:
        markdown.write_text(text + "\n")
    if tasks:
        first = read_rows(csv_path.with_name(csv_path.stem + "_first_protocol.csv"))
        _plot(table, tasks, figure, rows, first, costs)
    return text


def _plot(table, tasks, figure: Path, rows, first_protocol=(), costs=None) -> None:
    """The accuracy-against-time figure: against each cell's own CPU and wall clocks, and against
    steps x the per-step cost of one probed machine (the fair axis when cells ran on different
    machines); ``first_protocol``'s test curves (MeZO's lr chosen by 60-step runs) in grey, for
    the instability that changed the protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(1, "training time, process CPU seconds (all threads), each cell on its own machine"),
              (2, "training time, wall-clock seconds, each cell on its own machine")]
    if costs:  # the probed machine that covers the most variants
        machine, per_step = min(costs.items(), key=lambda kv: (-len(kv[1]), machine_label(kv[0])))
        panels.append((per_step, f"steps x CPU s per step on {short_cpu(machine[0])} (`--memory` probe)"))
    fig, axes = plt.subplots(len(tasks), len(panels), figsize=(6.5 * len(panels), 4.6 * len(tasks)), squeeze=False)
    for row_axes, task in zip(axes, tasks):
        several = len({c for k in table if k[0] == task for cs in table[k]["cpus"].values() for c in cs}) > 1
        for col, (axis, xlabel) in enumerate(panels):
            ax = row_axes[col]
            for key in sorted((k for k in table if k[0] == task), key=_entry_order):
                variant, e = key[1], table[key]
                peaks = list(e["peaks"].values())
                if not e["curves"]:
                    continue
                peak = f"{sum(peaks) / len(peaks):,.0f} MiB" if peaks else "?"
                color = COLORS[variant]
                lost = e["chosen"] is False  # an lr that lost the selection: thin and dotted
                if isinstance(axis, dict) and variant not in axis:
                    continue
                for i, (seed, curve) in enumerate(sorted(e["curves"].items())):
                    xs = [p[0] * axis[variant] if isinstance(axis, dict) else p[axis] for p in curve]
                    ys = [100 * p[3] for p in curve]
                    se = [100 * p[4] for p in curve]
                    style = ":" if lost else "-" if variant[1] == "mezo" else "--"
                    label = f"{_label(variant)}, lr {key[2]:g}" + (" (not chosen)" if lost else f", peak {peak}")
                    if several and not isinstance(axis, dict):
                        label += f" ({', '.join(sorted(set().union(*e['cpus'].values())))})"
                    ax.plot(xs, ys, style, marker="o", ms=2 if lost else 3, lw=1 if lost else 1.5, color=color,
                            alpha=0.45 if lost else 1.0 if i == 0 else 0.55, label=label if i == 0 else None)
                    if not lost:
                        ax.fill_between(xs, [y - s for y, s in zip(ys, se)], [y + s for y, s in zip(ys, se)],
                                        color=color, alpha=0.08)
            old = {}
            for r in first_protocol:
                if (r["task"], r["phase"], r["method"], r.get("split", "test")) == (task, "main", "mezo", "test"):
                    if isinstance(axis, dict):
                        x = int(r["step"]) * axis.get(_variant(r), math.nan)
                    else:
                        x = float(r["train_cpu_s" if axis == 1 else "train_wall_s"])
                    old.setdefault((r["cell"], float(r["lr"])), []).append((int(r["step"]), x,
                                                                            100 * float(r["accuracy"])))
            for (cell, lr), curve in old.items():
                if len(curve) > 1:
                    curve.sort()
                    ax.plot([p[1] for p in curve], [p[2] for p in curve], "--", color="0.6", lw=1,
                            label=f"MPNet-base MeZO, lr {lr:g} (first protocol: lr from 60-step runs)")
            target, _ = backprop_target(table, [k for k in table if k[0] == task])
            if target is not None:
                ax.axhline(100 * target, color=COLORS[("minilm", "bp")], lw=0.8, alpha=0.5,
                           label=f"target: MiniLM backprop's best, {100 * target:.2f} %")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out accuracy (%)")
            ax.set_title(f"{TASK_LABELS[task]}", fontsize=10)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7, loc="lower right", title="measured peak RSS (VmHWM)", title_fontsize=7)
    commits = sorted({r["git_commit"] for r in rows})
    loads = [float(r["load1"]) for r in rows if r["load1"]]
    fig.suptitle(f"Accuracy against training time at equal memory; {_machines(rows, short=True)}, "
                 f"{rows[0]['threads']} threads, load average 1-min {min(loads):.1f}-{max(loads):.1f}\n"
                 f"commits {', '.join(commits)}; seeds as lines (seed 0 opaque), shaded ±1 s.e.",
                 fontsize=8.5)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    print(f"wrote {figure}")


# --------------------------------------------------------------------------------- the CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=None, help="results CSV (default benchmarks/results/equal_memory.csv)")
    p.add_argument("--figure", default=None, help="figure (default: the CSV's name with .png)")
    p.add_argument("--work-dir", default=None,
                   help="checkpoints of unfinished cells (default runs/equal_memory, or runs/equal_memory_smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, separate CSV: checks the pipeline")
    p.add_argument("--status", action="store_true", help="print the plan and what is done")
    p.add_argument("--only", nargs="+", default=["*"], metavar="PATTERN",
                   help="run only the cells whose name matches one of these globs (names as --status prints "
                        "them, e.g. 'main/amazon/minilm/*'), in the plan's order: to fit cells into a time slot")
    p.add_argument("--report", action="store_true", help="redraw the figure and print the summary")
    p.add_argument("--memory", action="store_true",
                   help=f"peak memory and CPU s per step of every variant in fresh processes ({MEMORY_STEPS} "
                        "steps, no evaluation), under glibc's default allocator settings and a fixed mmap "
                        "threshold, against fastzo.memory's prediction: writes <csv stem>_peaks.csv (the rows "
                        "of other CPU models stay)")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-steps", type=int, default=MEMORY_STEPS, help=argparse.SUPPRESS)
    p.add_argument("--run-cell", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-runtime", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    stem = "equal_memory_smoke" if args.smoke else "equal_memory"
    # A smoke run's results are not results: they go to runs/ (ignored by git), not to results/.
    args.csv = args.csv or str((ROOT / "runs" / "equal_memory_smoke.csv") if args.smoke else RESULTS / f"{stem}.csv")
    args.figure = args.figure or str(Path(args.csv).with_suffix(".png"))
    args.work_dir = args.work_dir or str(ROOT / "runs" / stem)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.run_cell:
        cell = Cell(**{**json.loads(args.run_cell)})
        cell.evals = tuple(cell.evals)
        run_cell(cell, Path(args.csv), Path(args.work_dir), args.smoke, args.threads)
        return 0
    if args.probe_runtime:
        print(json.dumps(probe_runtime(args.threads)))
        return 0
    if args.probe_memory:
        cell = Cell(**json.loads(args.probe_memory))
        cell.evals = tuple(cell.evals)
        print(json.dumps(probe_memory(cell, args.smoke, args.threads, args.memory_steps)))
        return 0
    if args.memory:
        return measure_memory(args)
    if args.status:
        return status(args)
    if args.report:
        report(Path(args.csv), Path(args.figure), smoke=args.smoke, markdown=Path(args.figure).with_suffix(".md"),
               threads=args.threads)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
