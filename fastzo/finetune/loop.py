"""The training loop of ``fastzo finetune``: one method from the starting weights, evaluated as it goes."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import collate, train_batches
from .models import Task, build_model, label_token_ids, save_weights, select_trainable
from .probe import PeakMemory, _trim_process_memory


@torch.no_grad()
def evaluate(task: Task, encoded, labels, batch_size, pad_id, device, progress=None):
    model = task.model
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # less padding
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([encoded[i] for i in idx], [labels[i] for i in idx], pad_id, device)
        logits = task.logits(batch)
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        if progress is not None:
            progress.update(len(idx))
    model.train(was_training)
    return correct / len(order), loss_sum / len(order)


# -------------------------------------------------------------------------------- training
@dataclass
class RunResult:
    method: str
    steps: int = 0
    curve: list = field(default_factory=list)  # (train seconds, step, loss)
    evals: list = field(default_factory=list)  # (train seconds, step, accuracy, eval loss)
    train_seconds: float = 0.0
    forward_seconds: float = 0.0
    peak_memory_mb: float | None = None
    memory_kind: str | None = None
    memory_at_start_mb: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def accuracy_after(self):
        return self.evals[-1][2] if self.evals else None

    def summary(self):
        per_step = self.train_seconds / self.steps if self.steps else None
        out = {
            "steps": self.steps,
            "accuracy_after": self.accuracy_after,
            "eval_loss_after": self.evals[-1][3] if self.evals else None,
            "train_seconds": round(self.train_seconds, 3),
            "seconds_per_step": round(per_step, 4) if per_step else None,
            "peak_memory_mb": round(self.peak_memory_mb, 1) if self.peak_memory_mb else None,
            "memory_kind": self.memory_kind,
            "memory_at_start_mb": round(self.memory_at_start_mb, 1) if self.memory_at_start_mb else None,
            "final_train_loss": _ema([c[2] for c in self.curve])[-1] if self.curve else None,
            **self.extra,
        }
        if self.method == "mezo" and self.train_seconds > 0:
            out["perturb_share"] = round(1.0 - self.forward_seconds / self.train_seconds, 4)
        out["curve"] = [[round(t, 4), s, l] for t, s, l in self.curve]
        out["evals"] = [[round(t, 4), s, a, l] for t, s, a, l in self.evals]
        return out


def _ema(values, alpha=0.05):
    """Exponential moving average, bias-corrected (no pull towards the first value)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _eval_steps(total: int, points: int) -> set[int]:
    points = max(1, min(points, total)) if total else 0
    return {round(total * k / points) for k in range(1, points + 1)} if points else set()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _NoProgress:
    """Stands in for a tqdm bar when tqdm (an optional dependency) is not installed."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


_said_no_tqdm = []


def _tqdm(quiet, **kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not quiet and not _said_no_tqdm:
            _said_no_tqdm.append(True)
            print("fastzo finetune: tqdm is not installed; no progress bars", file=sys.stderr)
        return _NoProgress()
    return tqdm(disable=quiet, dynamic_ncols=True, file=sys.stderr, **kwargs)


def run_method(method, spec, args, data, device, out_dir: Path, before) -> RunResult:
    """Train one method from the starting weights; evaluate on the held-out split."""
    from .. import MeZO

    (train_ids, train_labels), (test_ids, test_labels) = data
    pad = spec.tokenizer.pad_id
    result = RunResult(method)
    model = build_model(spec).to(device=device, dtype=args.torch_dtype)
    select_trainable(model, args.trainable)
    task = Task(spec.task, model, label_token_ids(spec)[1] if spec.task == "prompt" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = args.steps if method == "mezo" else args.bp_steps
    evals_at = _eval_steps(steps, args.eval_points)
    batches = train_batches(train_ids, train_labels, args.batch_size, args.seed, pad, device)
    result.evals.append((0.0, 0, before[0], before[1]))
    method_dir = out_dir / method
    method_dir.mkdir(parents=True, exist_ok=True)

    if method == "mezo":
        trajectory = method_dir / "trajectory.jsonl"
        if trajectory.exists():
            trajectory.unlink()
        opt = MeZO(params, lr=args.lr, eps=args.eps, weight_decay=args.weight_decay, seed=args.seed,
                   backend=args.backend, distribution=args.distribution, fused_steps=args.fused_steps,
                   trajectory=trajectory)
        result.extra.update(lr=args.lr, eps=args.eps, distribution=args.distribution,
                            fused_steps=args.fused_steps, backend=_resolved_backend(args.backend, device))
        model.eval()
    else:
        opt = torch.optim.Adam(params, lr=args.bp_lr, weight_decay=args.weight_decay)
        result.extra.update(lr=args.bp_lr, optimizer="Adam")
        model.train()
    result.extra["batch_size"] = args.batch_size

    label = "MeZO" if method == "mezo" else "backprop"
    bar = _tqdm(args.quiet, total=steps, desc=f"{label:>8}", unit="step")
    running = None
    with PeakMemory(device) as memory:
        for step in range(1, steps + 1):
            batch = next(batches)
            _sync(device)
            start = time.perf_counter()
            if method == "mezo":
                forward = 0.0

                def closure():
                    nonlocal forward
                    t0 = time.perf_counter()
                    value = task.loss(batch)
                    _sync(device)
                    forward += time.perf_counter() - t0
                    return value

                loss = opt.step(closure)
                result.forward_seconds += forward
            else:
                opt.zero_grad(set_to_none=True)
                loss_t = task.loss(batch)
                loss_t.backward()
                opt.step()
                loss = loss_t.item()
            _sync(device)
            result.train_seconds += time.perf_counter() - start
            result.curve.append((result.train_seconds, step, float(loss)))
            running = loss if running is None else 0.95 * running + 0.05 * loss
            bar.update(1)
            if step in evals_at:
                ctx = opt.clean_weights() if method == "mezo" else contextlib.nullcontext()
                with ctx:
                    acc, eval_loss = evaluate(task, test_ids, test_labels, args.eval_batch_size, pad, device,
                                              progress=_tqdm(args.quiet, total=len(test_ids), desc="    eval",
                                                             unit="ex", leave=False))
                result.evals.append((result.train_seconds, step, acc, eval_loss))
                bar.set_postfix(loss=f"{running:.4f}", acc=f"{acc:.3f}")
            elif step % 10 == 0:
                bar.set_postfix(loss=f"{running:.4f}", acc=f"{result.evals[-1][2]:.3f}")
    bar.close()
    result.steps = steps
    result.peak_memory_mb, result.memory_kind, result.memory_at_start_mb = (
        memory.peak_mb, memory.kind, memory.start_mb)

    if method == "mezo":
        opt.materialize()
        torch.save(opt.state_dict(), method_dir / "mezo_state.pt")
    if args.save_model:
        save_weights(model, method_dir)
    del opt, model, task, params
    _trim_process_memory()
    return result


def _resolved_backend(backend, device):
    if backend is not None:
        return backend
    from ..backends import pick_backend

    return pick_backend(device)

