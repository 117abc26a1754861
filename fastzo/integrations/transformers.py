"""Hugging Face ``Trainer`` integration: each training step is one ``fastzo.MeZO`` step.

    from fastzo.integrations.transformers import ZOTrainer, ZOTrainingArguments

    args = ZOTrainingArguments(output_dir="out", learning_rate=1e-6, zo_eps=1e-3, max_steps=1000)
    trainer = ZOTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev)
    trainer.train()

What the Trainer keeps doing: data loading, the learning-rate schedule (MeZO reads each param
group's ``lr`` at every step, so HF's scheduler drives it), logging, evaluation, checkpointing
and ``resume_from_checkpoint`` (the MeZO state, a few numbers, is ``optimizer.pt``).

What changes:

- ``training_step`` runs no backward. It collects the micro-batches of one optimizer step and,
  at the last one, calls ``MeZO.step(closure)``; the closure evaluates the loss over all those
  micro-batches. The Trainer's own ``optimizer.step()`` that follows is then a no-op.
- Gradient accumulation keeps the Trainer's meaning: with ``gradient_accumulation_steps=k`` one
  MeZO step uses k micro-batches, and each of its two forwards (θ+εz and θ−εz, the same z)
  averages the k per-micro-batch mean losses. Micro-batches count equally (not by token count).
- The forwards run with the model in eval mode (``zo_eval_mode_forward=True``), so dropout cannot
  make the two losses differ. With ``zo_eval_mode_forward=False`` the model stays in train mode
  and both forwards of a step see the same dropout masks (the RNG is reseeded per step).
- Logs add ``projected_grad`` (mean over the logging window), ``step_time`` (seconds per MeZO
  step) and ``perturb_share`` (the share of a step not spent in the forwards: the perturbation,
  restore and update passes). ``grad_norm`` is dropped: there are no gradients.
- Fused-steps mode (``zo_fused_steps=True``) leaves the next step's +εz on the weights between
  steps. ``optimizer.materialize()`` is called before every evaluation, prediction and model
  save, and at the end of ``train()``, so what is saved or evaluated is the clean θ. Since the
  optimizer state is saved after the model, a checkpoint never holds a pending perturbation.
  Each materialize costs one pass and rounds once, so two fused runs agree bit for bit when
  they evaluate and save at the same steps (as an uninterrupted and a resumed run do).

Implementation notes (transformers 4.4x and 5.x): only public ``Trainer`` methods are
overridden (``create_optimizer``, ``training_step``, ``log``, ``evaluate``, ``predict``,
``save_model``, ``train``), plus ``_load_best_model``, which is only reached when the base class
calls it (the weights must be clean before the best checkpoint replaces them). The last
micro-batch of a step is recognised by ``accelerator.sync_gradients`` (public accelerate API),
falling back to counting micro-batches. Not supported: fp16 mixed precision (its GradScaler
needs gradients; use bf16 or a half-precision model), DeepSpeed/FSDP, and more than one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field

import torch

try:
    from transformers import Trainer, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "fastzo.integrations.transformers needs `transformers` and `accelerate` "
        "(pip install transformers accelerate)"
    ) from exc

from ..optim import MeZO

__all__ = ["TrainerMeZO", "ZOTrainer", "ZOTrainingArguments"]


@dataclass
class ZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the options of ``fastzo.MeZO`` (``zo_*``).

    ``learning_rate`` is MeZO's lr (default 1e-6, the order MeZO uses for full fine-tuning);
    ``weight_decay`` is applied as in MeZO, θ ← θ(1 − lr·wd) − lr·g·z, and not to biases and norms.
    ``max_grad_norm`` defaults to 0: there are no gradients to clip.
    """

    learning_rate: float = field(default=1e-6, metadata={"help": "MeZO learning rate."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Unused by MeZO (no gradients)."})
    zo_eps: float = field(default=1e-3, metadata={"help": "Perturbation size ε."})
    zo_seed: int | None = field(
        default=None, metadata={"help": "Base seed of the perturbation directions (default: seed)."}
    )
    zo_distribution: str = field(default="gaussian", metadata={"help": "'gaussian' or 'rademacher' z."})
    zo_num_directions: int = field(default=1, metadata={"help": "Directions averaged per step (n-SPSA)."})
    zo_estimator: str = field(default="central", metadata={"help": "'central' (±εz) or 'forward'."})
    zo_sign: bool = field(default=False, metadata={"help": "ZO-SignSGD: update with sign(g)."})
    zo_fused_steps: bool = field(
        default=False, metadata={"help": "Merge each update with the next step's +εz (2 passes a step)."}
    )
    zo_backend: str | None = field(
        default=None, metadata={"help": "fastzo backend: triton, cuda, cpp, torch; default: fastest."}
    )
    zo_eval_mode_forward: bool = field(
        default=True, metadata={"help": "Run the two forwards with the model in eval mode (no dropout)."}
    )
    zo_on_nonfinite: str = field(
        default="raise", metadata={"help": "'raise' or 'skip' a step whose loss is NaN/inf."}
    )
    zo_trajectory: str | None = field(
        default=None,
        metadata={"help": "JSON-lines trajectory file for fastzo.replay; 'auto': <output_dir>/zo_trajectory.jsonl."},
    )
    zo_log_timing: bool = field(
        default=True, metadata={"help": "Log step_time and perturb_share (synchronises CUDA per step)."}
    )


class TrainerMeZO(MeZO):
    """``MeZO`` whose closure-less ``step()`` completes a step that ``ZOTrainer`` already ran.

    The Trainer calls ``optimizer.step()`` after ``training_step``; the MeZO step needs the
    batch, so ``ZOTrainer.training_step`` runs it (``step(closure)``) and this call returns its
    loss. Everything else, ``state_dict`` included, is ``MeZO``'s.
    """

    _completed: tuple[bool, float | None] = (False, None)

    def step(self, closure=None):
        if closure is not None:
            loss = super().step(closure)
            self._completed = (True, loss)
            return loss
        done, loss = self._completed
        if not done:
            raise RuntimeError(
                "TrainerMeZO.step() without a closure only completes a step that ZOTrainer ran; "
                "call step(closure) to run a MeZO step yourself"
            )
        self._completed = (False, None)
        return loss


def _is_cuda_model(model) -> bool:
    return any(p.is_cuda for p in model.parameters())


class ZOTrainer(Trainer):
    """``transformers.Trainer`` whose optimizer is ``fastzo.MeZO``: forward passes only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ZOTrainingArguments):
            raise TypeError("ZOTrainer needs ZOTrainingArguments (TrainingArguments plus the zo_* options)")
        if self.args.fp16:
            raise ValueError(
                "fp16 mixed precision uses a GradScaler, which needs gradients; MeZO has none. Use "
                "bf16=True, or load the model in float16/bfloat16 (MeZO rounds its updates stochastically)"
            )
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise NotImplementedError("ZOTrainer does not support DeepSpeed or FSDP")
        if self.args.world_size > 1:
            raise NotImplementedError(
                "ZOTrainer runs in one process: with several, each rank's losses must be combined "
                "before the update so that all ranks apply the same step"
            )
        if self.optimizer is not None and not isinstance(self.optimizer, TrainerMeZO):
            raise TypeError(
                "ZOTrainer builds its optimizer from ZOTrainingArguments; to pass one yourself, "
                f"construct fastzo.integrations.transformers.TrainerMeZO (got {type(self.optimizer).__name__})"
            )
        self._zo_micro_batches: list = []
        self._zo_stats: list[tuple[float, float, float]] = []  # (projected grad, step s, forward s)
        self._zo_trim_pending = False

    # ------------------------------------------------------------------ the optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            if not named:
                raise ValueError("the model has no trainable parameters (requires_grad=True)")
            try:
                decay_names = set(self.get_decay_parameter_names(opt_model))
            except AttributeError:  # older transformers: the usual rule
                decay_names = {n for n, _ in named if "bias" not in n and "norm" not in n.lower()}
            groups = [
                {"params": [p for n, p in named if n in decay_names], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            args = self.args
            self.optimizer = TrainerMeZO(
                groups,
                lr=args.learning_rate,
                eps=args.zo_eps,
                seed=args.seed if args.zo_seed is None else args.zo_seed,
                backend=args.zo_backend,
                distribution=args.zo_distribution,
                num_directions=args.zo_num_directions,
                estimator=args.zo_estimator,
                sign=args.zo_sign,
                fused_steps=args.zo_fused_steps,
                on_nonfinite=args.zo_on_nonfinite,
                trajectory=self._zo_trajectory_path(),
            )
        return self.optimizer

    def _zo_trajectory_path(self):
        path = self.args.zo_trajectory
        if path == "auto":
            os.makedirs(self.args.output_dir, exist_ok=True)
            path = os.path.join(self.args.output_dir, "zo_trajectory.jsonl")
        return path

    @property
    def zo_optimizer(self) -> TrainerMeZO | None:
        """The MeZO optimizer itself (``self.optimizer`` may be accelerate's wrapper around it)."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, MeZO):
            opt = getattr(opt, "optimizer", None)
        return opt

    def _zo_materialize(self):
        opt = self.zo_optimizer
        if opt is not None:
            opt.materialize()

    # ------------------------------------------------------------------- training step
    def _zo_prepare(self, inputs):
        prepare = getattr(self, "_prepare_inputs", None)  # stable since transformers 4.x
        if prepare is not None:
            return prepare(inputs)
        device = self.args.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def _zo_last_micro_batch(self) -> bool:
        accelerator = getattr(self, "accelerator", None)
        sync = getattr(accelerator, "sync_gradients", None)
        if isinstance(sync, bool):
            return sync
        return len(self._zo_micro_batches) >= self.args.gradient_accumulation_steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Collect the micro-batch; at the last one of the step, run the MeZO step over all.

        Returns the step's loss ((L+ + L−)/2) at the last micro-batch and 0 before it, so the
        Trainer's sum over micro-batches logs the step loss.
        """
        self._zo_micro_batches.append(self._zo_prepare(inputs))
        if not self._zo_last_micro_batch():
            return torch.zeros((), device=self.args.device)
        batches, self._zo_micro_batches = self._zo_micro_batches, []
        loss = self._zo_step(model, batches)
        return torch.tensor(float("nan") if loss is None else loss, device=self.args.device)

    def _zo_batch_loss(self, model, batches):
        total = None
        for inputs in batches:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, dict(inputs))  # a copy: compute_loss may pop labels
            loss = loss.detach().float()
            if loss.dim():
                loss = loss.mean()  # DataParallel returns one loss per device
            total = loss if total is None else total + loss
        return total / len(batches)

    def _zo_step(self, model, batches):
        opt = self.zo_optimizer
        if opt is None:
            raise RuntimeError("ZOTrainer: the optimizer has not been created")
        if self._zo_trim_pending:
            self._zo_trim_pending = False
            _trim_trajectory(opt)
        args = self.args
        timing = args.zo_log_timing
        cuda = timing and _is_cuda_model(model)
        forward_s = 0.0
        was_training = model.training
        if args.zo_eval_mode_forward:
            model.eval()
            rng = contextlib.nullcontext
        else:
            model.train()
            # Both forwards of the step see the same dropout masks.
            seed = opt.seed_for(opt.step_count) & 0x7FFF_FFFF_FFFF_FFFF
            devices = [torch.cuda.current_device()] if _is_cuda_model(model) else []

            @contextlib.contextmanager
            def rng():
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    yield

        def closure():
            nonlocal forward_s
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with rng():
                value = self._zo_batch_loss(model, batches)
            if cuda:
                torch.cuda.synchronize()
            forward_s += time.perf_counter() - start
            return value

        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            loss = opt.step(closure)
        finally:
            model.train(was_training)
        if cuda:
            torch.cuda.synchronize()
        step_s = time.perf_counter() - start
        if loss is not None and opt.last_step is not None:
            self._zo_stats.append((opt.last_step.projected_grad, step_s, forward_s))
        return loss

    # ------------------------------------------------------------------------- logging
    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._zo_stats:
            stats, self._zo_stats = self._zo_stats, []
            n = len(stats)
            step_s = sum(s for _, s, _ in stats)
            forward_s = sum(f for _, _, f in stats)
            logs = dict(logs)
            logs.pop("grad_norm", None)
            logs["projected_grad"] = sum(g for g, _, _ in stats) / n
            if self.args.zo_log_timing:
                logs["step_time"] = step_s / n
                logs["perturb_share"] = max(0.0, step_s - forward_s) / step_s if step_s > 0 else 0.0
        return super().log(logs, *args, **kwargs)

    # ---------------------------------------------- clean weights for eval, save and export
    def train(self, *args, **kwargs):
        self._zo_micro_batches = []
        self._zo_trim_pending = True
        try:
            return super().train(*args, **kwargs)
        finally:
            self._zo_materialize()

    def evaluate(self, *args, **kwargs):
        self._zo_materialize()
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self._zo_materialize()
        return super().predict(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        # _save_checkpoint saves the model before the optimizer, so the optimizer state saved
        # with it holds no pending perturbation either.
        self._zo_materialize()
        return super().save_model(*args, **kwargs)

    def _load_best_model(self, *args, **kwargs):
        # Called by the base class only if it has this method; the weights it loads are clean,
        # so a pending perturbation must be dropped first, not later.
        self._zo_materialize()
        return super()._load_best_model(*args, **kwargs)


def _trim_trajectory(opt: MeZO):
    """Drop trajectory records of steps ≥ the optimizer's step (left by an interrupted run).

    After ``resume_from_checkpoint`` the file then describes exactly the steps that led to
    the loaded weights, and ``fastzo.replay`` of the finished file reproduces the run.
    """
    path = getattr(opt, "_trajectory_path", None)
    if not path or not os.path.exists(path):
        return
    step = opt.step_count
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if i > 0:
            record = json.loads(line)
            if "materialize" in record and record["materialize"] > step:
                continue
            if "step" in record and record["step"] >= step:
                continue
        kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)
