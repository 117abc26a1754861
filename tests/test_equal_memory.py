"""The equal-memory benchmark's bookkeeping and the shared Trainer's checkpoints (tiny models)."""

import importlib.util
import math
import sys
from pathlib import Path

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


def row(bench, cell, step, loss=0.5, acc=0.8):
    return {"phase": cell.phase, "cell": cell.name, "task": cell.task, "model": cell.model, "method": cell.method,
            "lr": cell.lr, "step": step, "steps_total": cell.steps, "eval_loss": loss, "accuracy": acc}


def test_lr_is_chosen_by_validation_loss_and_done_cells_are_skipped(tmp_path):
    bench = load_benchmark()
    cells = bench.plan()
    lr_cells = [c for c in cells if c.phase == "lr" and (c.task, c.model, c.method) == ("movie", "mpnet", "mezo")]
    assert [c.lr for c in lr_cells] == list(bench.LR_GRIDS[("mpnet", "mezo")])
    assert all(c.split == "validation" for c in lr_cells)
    main = next(c for c in cells if c.phase == "main" and c.model == "mpnet" and c.method == "mezo")
    assert main.split == "test" and main.steps == 2000
    # The first main cell is MiniLM backprop on movies, seed 0; its lr runs come right before it.
    first_main = next(i for i, c in enumerate(cells) if c.phase == "main")
    assert (cells[first_main].task, cells[first_main].model, cells[first_main].method) == ("movie", "minilm", "bp")
    assert {c.seed for c in cells if c.phase == "main"} == {0, 1}

    path = tmp_path / "rows.csv"
    assert bench.chosen_lr(bench.read_rows(path), "movie", "mpnet", "mezo") is None
    losses = {1e-5: 0.40, 2e-5: 0.35, 5e-5: float("nan")}
    for c in lr_cells:
        bench.append_row(path, row(bench, c, 0, loss=0.6))
        bench.append_row(path, row(bench, c, c.steps, loss=losses[c.lr]))
    rows = bench.read_rows(path)
    assert bench.chosen_lr(rows, "movie", "mpnet", "mezo") == 2e-5  # lowest finite validation loss
    assert all(bench.cell_done(rows, c) for c in lr_cells)
    assert not bench.cell_done(rows, main)
    bench.append_row(path, row(bench, main, 1000))
    assert not bench.cell_done(bench.read_rows(path), main)


def test_report_times_to_reach_the_small_models_best(tmp_path, capsys):
    bench = load_benchmark()
    curve = [(0, 0.0, 0.0, 0.70, 0.01), (100, 50.0, 30.0, 0.78, 0.01), (200, 90.0, 60.0, 0.83, 0.01)]
    assert bench.time_to_reach(curve, 0.78) == 50.0
    assert bench.time_to_reach(curve, 0.78, axis=2) == 30.0
    assert bench.time_to_reach(curve, 0.90) is None
    assert not math.isnan(bench.time_to_reach(curve, 0.70))


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
