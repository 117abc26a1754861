"""The equal-memory benchmark's bookkeeping and the shared Trainer's checkpoints (tiny models)."""

import csv
import json
import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

import fastzo  # noqa: E402
from fastzo import finetune  # noqa: E402

BACKEND = "cpp" if "cpp" in fastzo.available_backends() else "torch"
ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("equal_memory", ROOT / "benchmarks" / "equal_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["equal_memory"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def tiny_trainer(method, dtype=torch.float32, **kwargs):
    spec = finetune.resolve_model("tiny-bert", "embedding", 2, "bad film,good film", finetune.DEFAULT_TEMPLATE, 0)
    model = finetune.build_model(spec).to(dtype)
    task = finetune.Task("embedding", model)
    if method == "mezo":
        kwargs = dict(eps=1e-3, backend=BACKEND, fused_steps=True, **kwargs)
    trainer = finetune.Trainer(method, task, torch.device("cpu"), lr=1e-3, seed=3, **kwargs)
    texts = [f"the film was {w}" for w in ("great", "awful", "superb", "dull", "lovely", "boring", "fine")]
    ids = finetune.encode_all(spec, texts, 16)
    return trainer, spec, ids, [1, 0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("method,dtype,distribution", [("mezo", torch.float32, "gaussian"),
                                                       ("mezo", torch.bfloat16, "rademacher"),
                                                       ("bp", torch.float32, None)])
def test_trainer_resumes_bit_identically(tmp_path, method, dtype, distribution):
    kwargs = {"distribution": distribution} if distribution else {}
    whole, spec, ids, labels = tiny_trainer(method, dtype, **kwargs)
    pad = spec.tokenizer.pad_id

    def batches():
        return finetune.train_batches(ids, labels, 3, 5, pad, torch.device("cpu"))

    stream = batches()
    whole.train(stream, 5)
    whole.finish()
    expected = {k: v.clone() for k, v in whole.task.model.state_dict().items()}

    first, *_ = tiny_trainer(method, dtype, **kwargs)
    stream = batches()
    first.train(stream, 2)
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    second, *_ = tiny_trainer(method, dtype, **kwargs)
    second.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    assert second.step == 2 and second.cpu_seconds == first.cpu_seconds > 0
    stream = batches()
    for _ in range(second.step):
        next(stream)
    second.train(stream, 3)
    second.finish()
    assert second.step == 5 and second.peak_mb > 0
    for name, value in second.task.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert any(not torch.equal(v, whole_v) for v, whole_v in
               zip(expected.values(), tiny_trainer(method, dtype, **kwargs)[0].task.model.state_dict().values()))


def test_trainer_rejects_unknown_method():
    trainer, *_ = tiny_trainer("bp")
    with pytest.raises(ValueError, match="method must be 'mezo' or 'bp', got 'sgd'"):
        finetune.Trainer("sgd", trainer.task, torch.device("cpu"), lr=1e-3)


def row(bench, cell, step, loss=0.5, acc=0.8, split=None):
    return {"phase": cell.phase, "cell": cell.name, "task": cell.task, "model": cell.model, "method": cell.method,
            "dtype": cell.dtype, "distribution": cell.distribution, "seed": cell.seed, "lr": cell.lr, "step": step,
            "steps_total": cell.steps, "split": split or cell.split, "eval_loss": loss, "accuracy": acc,
            "accuracy_se": 0.01, "train_cpu_s": 2.5 * step, "train_wall_s": 1.5 * step}


def test_backprop_lr_is_chosen_by_short_validation_runs(tmp_path):
    bench = load_benchmark()
    cells = bench.plan()
    lr_cells = [c for c in cells if c.phase == "lr" and (c.task, c.model, c.method) == ("movie", "minilm", "bp")]
    assert [c.lr for c in lr_cells] == list(bench.LR_GRIDS[("minilm", "bp")])
    assert all(c.split == "validation" and c.splits == ("validation",) for c in lr_cells)
    # The first main cell is MiniLM backprop on movies, seed 0; its lr runs come right before it.
    first_main = next(i for i, c in enumerate(cells) if c.phase == "main")
    assert cells[first_main - len(lr_cells):first_main] == lr_cells
    assert (cells[first_main].task, cells[first_main].model, cells[first_main].method) == ("movie", "minilm", "bp")
    assert not any(c.phase == "lr" and c.method == "mezo" for c in cells)

    path = tmp_path / "rows.csv"
    assert bench.chosen_lr(bench.read_rows(path), "movie", "minilm", "bp") is None
    losses = {1e-5: 0.40, 3e-5: 0.35, 1e-4: float("nan"), 3e-4: 0.37}
    for c in lr_cells:
        bench.append_row(path, row(bench, c, 0, loss=0.6))
        bench.append_row(path, row(bench, c, c.steps, loss=losses[c.lr]))
    rows = bench.read_rows(path)
    assert bench.chosen_lr(rows, "movie", "minilm", "bp") == 3e-5  # lowest finite validation loss
    assert all(bench.cell_done(rows, c) for c in lr_cells)


def test_mezo_lr_is_chosen_by_the_whole_seed0_run_on_validation(tmp_path):
    bench = load_benchmark()
    cells = bench.plan()
    mine = [c for c in cells if (c.task, c.model, c.method) == ("movie", "mpnet", "mezo")]
    sweep = [c for c in mine if c.selects_lr]
    assert sorted(c.lr for c in sweep) == sorted(bench.LR_GRIDS[("mpnet", "mezo")])
    assert all(c.phase == "main" and c.seed == 0 and c.steps == 2000 for c in sweep)
    assert all(c.splits == ("validation", "test") and c.split == "test" for c in sweep)
    assert len({c.name for c in sweep}) == len(sweep)  # the lr is part of the name
    # Every other MeZO cell waits for the choice and comes after the sweep.
    others = [c for c in mine if not c.selects_lr]
    assert {(c.dtype, c.distribution, c.seed) for c in others} >= {("float32", "rademacher", 0),
                                                                    ("bfloat16", "gaussian", 0),
                                                                    ("float32", "gaussian", 1)}
    assert all(c.lr is None for c in others)
    assert max(cells.index(c) for c in sweep) < min(cells.index(c) for c in others)

    path = tmp_path / "rows.csv"
    low, high = sorted(sweep, key=lambda c: c.lr)
    for c in sweep:
        bench.append_row(path, row(bench, c, 0, loss=0.6, split="validation"))
        bench.append_row(path, row(bench, c, 0, loss=0.6, acc=0.79))
    # Validation rows of the last step decide, and only once every lr of the grid has one.
    bench.append_row(path, row(bench, high, high.steps, loss=0.30, split="validation"))
    rows = bench.read_rows(path)
    assert not bench.cell_done(rows, high)  # the test row, written last, marks it done
    assert bench.chosen_lr(rows, "movie", "mpnet", "mezo") is None
    bench.append_row(path, row(bench, high, high.steps, loss=0.10, acc=0.90))  # a test row never chooses
    bench.append_row(path, row(bench, low, 1000, loss=0.20, split="validation"))
    bench.append_row(path, row(bench, low, low.steps, loss=0.25, split="validation"))
    bench.append_row(path, row(bench, low, low.steps, loss=0.90, acc=0.70))
    rows = bench.read_rows(path)
    assert all(bench.cell_done(rows, c) for c in sweep)
    assert bench.chosen_lr(rows, "movie", "mpnet", "mezo") == low.lr
    # A seed-1 or Rademacher row at another lr is not a selection row.
    other = next(c for c in others if c.distribution == "rademacher")
    other.lr = high.lr
    assert not bench.is_selection_row(row(bench, other, other.steps, loss=0.01, split="validation"))

    table = bench.summarize(rows)
    assert table[("movie", ("mpnet", "mezo", "float32", "gaussian"), low.lr)]["chosen"] is True
    assert table[("movie", ("mpnet", "mezo", "float32", "gaussian"), high.lr)]["chosen"] is False


def test_early_stopping_reads_the_test_accuracy_at_the_best_validation_loss():
    bench = load_benchmark()
    test = [(0, 0, 0, 0.70, 0.01, 0.6), (500, 1, 1, 0.84, 0.01, 0.4), (1000, 2, 2, 0.75, 0.01, 0.5)]
    val = [(0, 0, 0, 0.71, 0.02, 0.6), (500, 1, 1, 0.83, 0.02, 0.38), (1000, 2, 2, 0.86, 0.02, float("nan"))]
    assert bench.at_best_validation(test, val) == (500, 0.84)
    assert bench.at_best_validation(test, []) is None


def test_report_times_to_reach_the_small_models_best(tmp_path, capsys):
    bench = load_benchmark()
    curve = [(0, 0.0, 0.0, 0.70, 0.01), (100, 50.0, 30.0, 0.78, 0.01), (200, 90.0, 60.0, 0.83, 0.01)]
    assert bench.time_to_reach(curve, 0.78) == 50.0
    assert bench.time_to_reach(curve, 0.78, axis=2) == 30.0
    assert bench.time_to_reach(curve, 0.90) is None
    assert not math.isnan(bench.time_to_reach(curve, 0.70))


def test_the_target_is_the_small_backprop_best_averaged_over_seeds():
    bench = load_benchmark()
    bp = ("movie", ("minilm", "bp"), 1e-4)
    unchosen = ("movie", ("minilm", "bp"), 3e-4)
    mezo = ("movie", ("mpnet", "mezo", "float32", "gaussian"), 2e-5)
    table = {bp: {"chosen": True, "curves": {0: [(0, 0, 0, 0.70, 0.01), (100, 1, 1, 0.86, 0.01), (200, 2, 2, 0.85, 0.01)],
                                             1: [(0, 0, 0, 0.70, 0.01), (100, 1, 1, 0.82, 0.01)]}},
             unchosen: {"chosen": False, "curves": {0: [(0, 0, 0, 0.95, 0.01)]}},
             mezo: {"chosen": True, "curves": {0: [(0, 0, 0, 0.99, 0.01)]}}}
    mean, se = bench.backprop_target(table, list(table))
    assert mean == pytest.approx(0.84) and se == pytest.approx(0.02)
    one_seed = {bp: {"chosen": True, "curves": {0: table[bp]["curves"][0]}}}
    assert bench.backprop_target(one_seed, [bp]) == (pytest.approx(0.86), None)
    assert bench.backprop_target({mezo: table[mezo]}, [mezo]) == (None, None)


def test_memory_probe_covers_every_variant_once():
    bench = load_benchmark()
    variants = bench.memory_variants(smoke=False)
    keys = [(c.model, c.method, c.dtype, c.distribution) for c in variants]
    assert len(keys) == len(set(keys)) == 6
    assert {(c.model, c.method) for c in variants} == {(m, k) for m in bench.MODELS for k in ("bp", "mezo")}
    assert all(c.lr == bench.LR_GRIDS[(c.model, c.method)][0] and c.phase == "main" for c in variants)
    # A fixed mmap threshold is one of the settings, glibc's default the other.
    assert any("MALLOC_MMAP_THRESHOLD_" in env for env in bench.ALLOCATORS.values())
    assert {} in bench.ALLOCATORS.values()


def _toy_benchmark(monkeypatch):
    bench = load_benchmark()
    texts = [f"the film was {w}" for w in ("great", "awful", "superb", "dull", "lovely", "boring")] * 4
    labels = [1, 0] * 12
    data = finetune.Dataset("toy", texts, labels, ["negative", "positive"], ["bad film", "good film"])
    monkeypatch.setattr(bench, "MODELS", {"minilm": "tiny-bert", "mpnet": "tiny-bert"})
    monkeypatch.setattr(bench, "load_task", lambda task, smoke: (data, (texts[:16], labels[:16]),
                                                                 (texts[16:20], labels[16:20]),
                                                                 (texts[20:], labels[20:])))
    monkeypatch.setattr(bench, "BATCH", 4)
    return bench


def test_an_interrupted_cell_resumes_from_its_checkpoint_with_the_same_rows(tmp_path, monkeypatch):
    bench = _toy_benchmark(monkeypatch)
    cell = bench.Cell("main", "movie", "mpnet", "mezo", 0, 1e-2, (0, 2, 4))
    keys = ("step", "split", "accuracy", "eval_loss", "train_loss_ema")

    def run(csv_path, work_dir):
        bench.run_cell(cell, csv_path, work_dir, smoke=True, threads=1)
        return [tuple(r[k] for k in keys) for r in bench.read_rows(csv_path)]

    whole = run(tmp_path / "whole.csv", tmp_path / "whole")
    assert [(r[0], r[1]) for r in whole] == [(str(s), sp) for s in (0, 2, 4) for sp in ("validation", "test")]
    assert not list((tmp_path / "whole").iterdir())  # a finished cell leaves no checkpoint

    # Crash while writing step 4's rows: the checkpoint of step 2 stays, step 4 has no test row.
    append = bench.append_row
    def crash_at_last_test_row(path, row):
        if row["step"] == 4 and row["split"] == "test":
            raise KeyboardInterrupt
        append(path, row)
    monkeypatch.setattr(bench, "append_row", crash_at_last_test_row)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.csv", tmp_path / "cut")
    assert (tmp_path / "cut" / (cell.name.replace("/", "__") + ".pt")).exists()
    assert not bench.cell_done(bench.read_rows(tmp_path / "cut.csv"), cell)
    monkeypatch.setattr(bench, "append_row", append)
    resumed = run(tmp_path / "cut.csv", tmp_path / "cut")
    assert bench.cell_done(bench.read_rows(tmp_path / "cut.csv"), cell)
    # Every row once (step 4's validation row was written before the crash), with the values of
    # the uninterrupted run.
    assert sorted(resumed) == sorted(whole)


def test_a_cell_without_its_checkpoint_starts_over_and_sets_its_old_rows_aside(tmp_path, monkeypatch):
    bench = _toy_benchmark(monkeypatch)
    cell = bench.Cell("main", "movie", "mpnet", "mezo", 0, 1e-2, (0, 2, 4))
    other = dict.fromkeys(bench.FIELDS, "")
    other.update(cell="main/movie/minilm/bp/lr0.0001/seed0", step="0", split="test", cpu_model="another CPU")
    csv_path = tmp_path / "em.csv"
    bench.append_row(csv_path, other)
    # Rows of an earlier, unfinished run of the cell whose checkpoint is gone (another machine).
    for step in (0, 2):
        bench.append_row(csv_path, dict(other, cell=cell.name, step=str(step), accuracy="0.123"))
    bench.run_cell(cell, csv_path, tmp_path / "work", smoke=True, threads=1)
    rows = bench.read_rows(csv_path)
    mine = [r for r in rows if r["cell"] == cell.name]
    # Every row of the cell now comes from the new run, once, on this CPU; other cells are kept.
    assert [(r["step"], r["split"]) for r in mine] == [(str(s), sp) for s in (0, 2, 4) for sp in ("validation", "test")]
    assert {r["cpu_model"] for r in mine} == {bench.cpu_name()}
    assert "0.123" not in {r["accuracy"] for r in mine}
    assert [r["cell"] for r in rows if r["cell"] != cell.name] == [other["cell"]]
    aside = bench.read_rows(bench.interrupted_path(csv_path))
    assert [(r["step"], r["accuracy"]) for r in aside] == [("0", "0.123"), ("2", "0.123")]


def test_a_checkpoint_from_another_cpu_model_is_not_continued(tmp_path, monkeypatch):
    import torch

    bench = _toy_benchmark(monkeypatch)
    cell = bench.Cell("main", "movie", "mpnet", "mezo", 0, 1e-2, (0, 2, 4))
    csv_path, work = tmp_path / "em.csv", tmp_path / "work"
    append = bench.append_row
    def crash_at_step_4(path, row):
        if row["step"] == 4:
            raise KeyboardInterrupt
        append(path, row)
    monkeypatch.setattr(bench, "append_row", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        bench.run_cell(cell, csv_path, work, smoke=True, threads=1)
    monkeypatch.setattr(bench, "append_row", append)
    ckpt = work / (cell.name.replace("/", "__") + ".pt")
    state = torch.load(ckpt, weights_only=False)
    for row in state["rows"]:
        row["cpu_model"] = "another CPU"
    torch.save(state, ckpt)
    # As if the run had stopped between saving step 2's checkpoint and writing its rows.
    bench.write_rows(csv_path, [r for r in bench.read_rows(csv_path) if r["step"] != "2"])
    bench.run_cell(cell, csv_path, work, smoke=True, threads=1)
    mine = [r for r in bench.read_rows(csv_path) if r["cell"] == cell.name]
    assert [(r["step"], r["split"]) for r in mine] == [(str(s), sp) for s in (0, 2, 4) for sp in ("validation", "test")]
    assert {r["cpu_model"] for r in mine} == {bench.cpu_name()}
    # Continuing would have set nothing aside; starting over moved step 0's rows and the
    # checkpoint's step-2 rows (never in the CSV) to the side file.
    aside = bench.read_rows(bench.interrupted_path(csv_path))
    assert [(r["step"], r["cpu_model"]) for r in aside] == [("0", bench.cpu_name())] * 2 + [("2", "another CPU")] * 2


def test_time_to_reach_at_one_machines_step_cost():
    bench = load_benchmark()
    bp, mezo = ("minilm", "bp"), ("mpnet", "mezo", "float32", "gaussian")
    probes = [dict(allocator=a, model=m, method=k, dtype="float32", distribution=d, cpu_model="AMD EPYC",
                   cpu_s_per_step=c)
              for a, c0 in (("glibc default", 1.0), ("fixed mmap threshold 128 KiB", 9.0))
              for (m, k, d, c) in (("minilm", "bp", "", 0.5 * c0), ("mpnet", "mezo", "gaussian", 2.0 * c0))]
    costs = bench.step_costs(probes)
    assert costs == {("AMD EPYC", ""): {bp: 0.5, mezo: 2.0}}  # glibc's default, the cells' own setting
    # Curves measured on different machines: (step, cpu s, wall s, accuracy, se)
    table = {("movie", bp, 1e-4): {"chosen": True, "curves": {0: [(0, 0, 0, 0.7, 0.01), (100, 900, 0, 0.86, 0.01)]}},
             ("movie", mezo, 2e-5): {"chosen": True, "curves": {0: [(0, 0, 0, 0.8, 0.01), (400, 10, 0, 0.86, 0.01)],
                                                                1: [(0, 0, 0, 0.8, 0.01), (400, 10, 0, 0.85, 0.01)]}}}
    costs = {("AMD EPYC", "family 25"): costs[("AMD EPYC", "")]}
    text = " ".join(bench._reach_at_one_cost(table, list(table), 0.86, costs))
    assert "at the per-step cost of AMD EPYC (" in text
    assert "backprop (AdamW) (0.50 CPU s/step): 50;" in text  # 100 steps x 0.5, not its own 900 CPU s
    assert "MeZO (2.00 CPU s/step): 800, not reached." in text  # seed 0: 400 x 2.0; seed 1 never reaches
    assert bench.short_cpu("Intel(R) Xeon(R) Processor") == "Intel Xeon"
    # A variant the probe did not measure, and no probe at all, are said, not dropped.
    text = " ".join(bench._reach_at_one_cost(table, list(table), 0.86, {("AMD EPYC", "f"): {bp: 0.5}}))
    assert "MeZO: step cost not probed" in text
    assert "No per-step costs" in " ".join(bench._reach_at_one_cost(table, list(table), 0.86, {}))


def test_memory_probe_times_the_steps_after_warmup(monkeypatch):
    bench = _toy_benchmark(monkeypatch)
    cell = bench.Cell("main", "movie", "mpnet", "mezo", 0, 1e-2, (0, 2))
    got = bench.probe_memory(cell, smoke=True, threads=1, steps=4)  # the real loop on a toy model
    assert got["peak_mib"] > got["baseline_mib"] > 0
    assert got["cpu_s_per_step"] > 0 and got["wall_s_per_step"] > 0 and got["timed_steps"] == 2

    class Clockwork:  # step k costs k CPU seconds: the warmup steps must not enter the mean
        cpu_seconds = train_seconds = 0.0
        peak_mb, step = 1.0, 0
        def train(self, batches, n):
            for _ in range(n):
                self.step += 1
                self.cpu_seconds += self.step
                self.train_seconds += 2 * self.step
    fake = SimpleNamespace(trainer=Clockwork(), train_ids=[], train=([], []), pad=0, device="cpu", baseline=0.5)
    monkeypatch.setattr(bench, "prepare_cell", lambda *a: fake)
    import fastzo.finetune as ft
    monkeypatch.setattr(ft, "train_batches", lambda *a: iter(()))
    got = bench.probe_memory(cell, smoke=True, threads=1, steps=5)
    assert (got["cpu_s_per_step"], got["wall_s_per_step"], got["timed_steps"]) == (4.0, 8.0, 3)  # (3+4+5)/3
    with pytest.raises(ValueError, match="warmup"):
        bench.probe_memory(cell, smoke=True, threads=1, steps=bench.WARMUP_STEPS)


def test_memory_probe_keeps_the_rows_of_other_cpu_models(tmp_path, monkeypatch):
    bench = load_benchmark()
    csv_path = tmp_path / "em.csv"
    peaks = tmp_path / "em_peaks.csv"
    with open(peaks, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=bench.PEAK_FIELDS)
        writer.writeheader()
        for (cpu, features), method in (((bench.cpu_name(), "older generation"), "bp"),
                                        (bench.this_machine(), "bp"), (bench.this_machine(), "mezo")):
            writer.writerow(dict(allocator="glibc default", model="minilm", method=method, cpu_model=cpu,
                                 cpu_features=features, peak_rss_mib="1"))
    monkeypatch.setattr(bench, "ALLOCATORS", {"glibc default": {}})
    monkeypatch.setattr(bench, "_runtime_mib", lambda threads, env: 10.0)
    monkeypatch.setattr(bench, "memory_variants", lambda smoke: [bench.Cell("main", "movie", "minilm", "bp", 0, 1e-4, (0,))])
    monkeypatch.setattr(bench, "predicted_peak_mib", lambda *a: 100.0)

    class Done:
        returncode, stderr = 0, ""
        stdout = ('{"baseline_mib": 50.0, "peak_mib": 125.0, "cpu_s_per_step": 0.5, "wall_s_per_step": 0.3, '
                  '"timed_steps": 18}\n')
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Done())
    monkeypatch.setattr(bench, "git_commit", lambda: "abc")
    args = SimpleNamespace(csv=str(csv_path), smoke=True, threads=None)
    assert bench.measure_memory(args) == 0
    rows = bench.read_rows(peaks)
    # Same model name, other features: another machine, kept; this machine's MeZO row was not
    # measured this time: kept; its backprop row: replaced.
    assert [(r["cpu_features"], r["method"], r["peak_rss_mib"]) for r in rows] == [
        ("older generation", "bp", "1"), (bench.cpu_features(), "mezo", "1"), (bench.cpu_features(), "bp", "125.0")]
    assert rows[2]["cpu_s_per_step"] == "0.5" and rows[2]["error_pct"] == "-20.0" and rows[2]["timed_steps"] == "18"

    class Failed:
        returncode, stderr, stdout = 1, "boom", ""
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Failed())
    assert bench.measure_memory(args) == 1
    assert bench.read_rows(peaks) == rows  # nothing measured: nothing replaced


def test_set_aside_twice_and_after_a_crash_keeps_each_row_once(tmp_path):
    bench = load_benchmark()
    csv_path = tmp_path / "em.csv"
    row = dict.fromkeys(bench.FIELDS, "")
    for cell, step in (("a", 0), ("a", 2), ("b", 0)):
        bench.append_row(csv_path, dict(row, cell=cell, step=str(step), split="test", time_utc=f"t{step}"))
    side = bench.interrupted_path(csv_path)
    # A crash after the side file was written and before the CSV was: the next set-aside repeats.
    bench.write_rows(side, [r for r in bench.read_rows(csv_path) if r["cell"] == "a"])
    bench.set_aside(csv_path, "a")
    bench.set_aside(csv_path, "a")
    assert [(r["cell"], r["step"]) for r in bench.read_rows(side)] == [("a", "0"), ("a", "2")]
    assert [r["cell"] for r in bench.read_rows(csv_path)] == ["b"]


def test_rows_appended_to_an_older_csv_get_its_columns_migrated(tmp_path):
    bench = load_benchmark()
    csv_path = tmp_path / "em.csv"
    old_fields = [f for f in bench.FIELDS if f != "cpu_features"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow(dict.fromkeys(old_fields, "") | {"cell": "old", "load15": "1.5"})
    bench.append_row(csv_path, dict(cell="new", load15="2.5", cpu_features="avx2"))
    rows = bench.read_rows(csv_path)
    assert [(r["cell"], r["load15"], r["cpu_features"]) for r in rows] == [("old", "1.5", ""), ("new", "2.5", "avx2")]


def test_the_driver_runs_only_the_cells_asked_for_in_the_plans_order(tmp_path, monkeypatch):
    bench = load_benchmark()
    ran = []
    monkeypatch.setattr(bench.subprocess, "run",
                        lambda cmd, env=None: ran.append(json.loads(cmd[cmd.index("--run-cell") + 1]))
                        or SimpleNamespace(returncode=0))
    monkeypatch.setattr(bench, "report", lambda *a, **k: "")
    args = SimpleNamespace(csv=str(tmp_path / "em.csv"), work_dir=str(tmp_path / "w"), smoke=False, threads=None,
                           figure=str(tmp_path / "em.png"), only=["lr/amazon/minilm/*", "main/movie/mpnet/bp/*"])
    assert bench.drive(args) == 0
    # MPNet backprop's main cell waits for its selection runs (not asked for): skipped, not run.
    assert [(c["phase"], c["task"], c["model"], c["lr"]) for c in ran] == [
        ("lr", "amazon", "minilm", lr) for lr in bench.LR_GRIDS[("minilm", "bp")]]
