"""fastzo.MeZO: a torch.optim optimizer that fine-tunes from forward passes alone.

One step (central estimate, one direction) is three in-place passes over the trainable weights:

    θ + εz          → L+ = closure()
    θ − εz          → L− = closure()
    θ ← (θ − εz + εz)(1 − lr·wd) − lr·g·z,   g = (L+ − L−) / 2ε

z is regenerated from the step seed (docs/noise.md), so nothing the size of a weight is stored.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import signal
import threading
import uuid
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import distributed, noise, ops

ESTIMATORS = ("central", "forward")
NONFINITE_POLICIES = ("raise", "skip")
# The options a checkpoint and a trajectory header carry, so a resumed or replayed run matches.
_SAVED_OPTIONS = ("distribution", "num_directions", "estimator", "sign", "fused_steps",
                  "stochastic_rounding", "exact_perturbation")


class NonFiniteLossError(FloatingPointError):
    """The closure returned NaN or inf; the weights were restored before this was raised."""


@dataclass
class StepRecord:
    """What the last completed step did (``MeZO.last_step``)."""

    step: int
    seeds: list[int]
    losses: list[tuple[float, float]]  # (L+, L−) per direction; central: L− at θ−εz, forward: L0
    projected_grads: list[float]  # g per direction for the first param group (eps of group 0)
    loss: float  # what step() returned

    @property
    def seed(self) -> int:
        return self.seeds[0]

    @property
    def loss_plus(self) -> float:
        return self.losses[0][0]

    @property
    def loss_minus(self) -> float:
        return self.losses[0][1]

    @property
    def projected_grad(self) -> float:
        return self.projected_grads[0]


@dataclass
class _Pending:
    """Fused-steps mode: the +εz of the next step that is already applied to the weights."""

    seed: int
    scales: list[float] = field(default_factory=list)  # per group
    keys: list[int] | None = None  # the parameters (by position) that hold it; None: legacy state


def _check_number(name, value, *, minimum=None, strictly_positive=False):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if strictly_positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_scalar(value) -> float:
    """A closure's result as a float: a one-element tensor or array, or any real number
    (Python, numpy); bools and strings are refused."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.size != 1 if isinstance(value, np.ndarray) else value.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar (a loss, or a float such as -accuracy); got a "
                f"{type(value).__name__} of shape {tuple(value.shape)}"
            )
        if isinstance(value, torch.Tensor):
            return float(value.detach().float().item())
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"the closure must return a scalar (a loss tensor or a real number), got {type(value).__name__}"
        )
    return float(value)


def check_parameter(p, what: str = "parameter") -> None:
    """Refuse, before anything is modified, a parameter MeZO cannot perturb in place."""
    if distributed.is_dtensor(p):
        return  # checked by distributed.check_params
    if p.device.type == "meta":
        raise ValueError(
            f"{what} of shape {tuple(p.shape)} is on the meta device (it has no data): create the "
            "real weights first, e.g. model.to_empty(device=...) and load the state dict, then "
            "build the optimizer"
        )
    if p.dtype not in ops.SUPPORTED_DTYPES:
        raise TypeError(f"MeZO perturbs float32/bfloat16/float16 parameters, got {p.dtype} for a "
                        f"{what} of shape {tuple(p.shape)}; convert the model, e.g. model.float()")
    if p.numel() and ops.memory_order(p) is None:
        raise ValueError(
            f"{what} of shape {tuple(p.shape)} and strides {tuple(p.stride())} is not contiguous "
            "(nor a dense permutation such as channels_last): it overlaps or has gaps. Make it "
            "contiguous, e.g. p.data = p.data.contiguous() or model.to(memory_format="
            "torch.contiguous_format)"
        )


def layout_of(p):
    """None for a row-major tensor, else the dimension order in which it lies in memory."""
    if distributed.is_dtensor(p) or p.is_contiguous():
        return None
    order = ops.memory_order(p)
    return list(order) if order is not None else None


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block has finished, so a pass over the weights or the
    commit of a step is never cut in half; the KeyboardInterrupt is raised right after it."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class MeZO(torch.optim.Optimizer):
    """Memory-efficient zeroth-order SGD (Malladi et al. 2023) with fused in-place passes.

    Args:
        params: parameters or param groups (each group may set lr, eps, weight_decay).
        lr: learning rate (≥ 0).
        eps: perturbation size ε (> 0).
        weight_decay: decoupled from nothing: θ ← θ(1 − lr·wd) − lr·g·z, as in MeZO.
        seed: base seed in [0, 2**64); step t, direction d uses ``noise.step_seed(seed, t, d)``.
        backend: "triton", "cuda", "cpp", "torch" or None (fastest available per device).
        distribution: "gaussian" or "rademacher" z.
        num_directions: q; each step averages q estimates (n-SPSA), each direction's update
            applied in its own restore pass (lr/q each).
        estimator: "central" (θ ± εz, 3 passes) or "forward" (θ and θ + εz, 2 passes).
        sign: ZO-SignSGD: update with sign(g) instead of g.
        fused_steps: merge step t's restore-and-update with step t+1's +εz (2 passes per
            step). Between steps the weights then hold θ + εz: use ``materialize()`` or
            ``with opt.clean_weights():`` to evaluate or export; checkpoints keep the pending
            perturbation in the optimizer state, so they resume bit-identically.
        on_nonfinite: "raise" (default) or "skip" (restore, warn, do not count the step).
        stochastic_rounding: for 16-bit weights round the update stochastically (default on):
            updates far below one ulp survive on average instead of being rounded away.
        exact_perturbation: for bfloat16/float16 weights perturb by integer steps on a fixed
            per-tensor grid, so +εz, −2εz, +εz returns every weight bit for bit (default: off —
            opt in; float32 weights always use the plain perturbation). At the first step each 16-bit
            tensor gets its quantum q = ulp(max(rms(θ), 16ε)) (kept in the optimizer state) and
            is rounded once onto its grid (changes of at most q/2). See docs/lowprec.md.
        trajectory: path of a JSON-lines file to append each step's record to (for replay).
        process_group: data parallelism (docs/distributed.md): each rank evaluates the closure on
            its own shard of the batch and every step all-gathers the ranks' losses (one small
            collective), so all ranks apply the same update. None (default): no communication,
            even when torch.distributed is initialized. Required for sharded DTensor / FSDP2
            parameters, whose local shards are perturbed in place at their global offsets.
        split_directions: deal the q directions round-robin to the ranks of process_group (each
            rank 2⌈q/W⌉ forwards instead of 2q); all q directions are evaluated at the same θ.
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 backend: str | None = None, distribution: str = "gaussian", *, num_directions: int = 1,
                 estimator: str = "central", sign: bool = False, fused_steps: bool = False,
                 on_nonfinite: str = "raise", stochastic_rounding: bool | None = None,
                 exact_perturbation: bool | None = None, trajectory: str | os.PathLike | None = None,
                 process_group=None, split_directions: bool = False):
        lr = _check_number("lr", lr, minimum=0.0)
        eps = _check_number("eps", eps, strictly_positive=True)
        weight_decay = _check_number("weight_decay", weight_decay, minimum=0.0)
        noise.check_seed(seed)
        noise.check_distribution(distribution)
        if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
            raise ValueError(f"num_directions must be an int >= 1, got {num_directions!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
        if fused_steps and (estimator != "central" or num_directions != 1):
            raise ValueError("fused_steps supports the central estimator with one direction")
        if split_directions and (fused_steps or trajectory is not None):
            raise ValueError("split_directions does not support fused_steps or trajectory")
        if exact_perturbation is not None and not isinstance(exact_perturbation, bool):
            raise TypeError(f"exact_perturbation must be True, False or None, got {exact_perturbation!r}")
        if backend is not None:
            from .backends import get_backend

            get_backend(backend)  # fail now, with the reason, not at the first step
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)  # validates each group through add_param_group
        self.base_seed = seed
        self.backend = backend
        self.distribution = distribution
        self.num_directions = num_directions
        self.estimator = estimator
        self.sign = sign
        self.fused_steps = fused_steps
        self.on_nonfinite = on_nonfinite
        self.stochastic_rounding = stochastic_rounding
        # Opt-in: in the end-to-end bf16 run (benchmarks/lowprec_finetune.py) exact mode diverged
        # at the learning rate where float32 and stochastic rounding alone converged.
        self.exact_perturbation = bool(exact_perturbation)
        self.step_count = 0
        self.last_step: StepRecord | None = None
        self._pending: _Pending | None = None
        self._on_weights: dict[int, int] = {}  # within a step: seed → multiple of εz applied
        self._journal: list[list] = []  # within a step: the (seed, multiple) passes applied
        self._forced_keys = None  # replay: the parameters trainable at the recorded step
        self._trajectory_path = os.fspath(trajectory) if trajectory is not None else None
        self._trajectory_run: str | None = None
        self._trajectory_lines = 0
        self._trajectory_foreign = False  # the file holds another run; refuse to append
        self._trajectory_keys: list[int] | None = None  # trainable keys last written
        self._header_keys: list[int] | None = None  # every key of the header's groups
        distributed.check_params(self, process_group)
        self._dist = None
        if process_group is not None or split_directions:
            self._dist = distributed.Coordinator(self, process_group, split_directions)
        if self._trajectory_path is not None:
            self._open_trajectory()

    def add_param_group(self, param_group):
        """``torch.optim.Optimizer.add_param_group`` with the constructor's checks: a group with a
        bad lr/eps/weight_decay or a parameter MeZO cannot perturb is refused and not added."""
        count = len(self.param_groups)
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1])
        except BaseException:
            del self.param_groups[count:]
            raise

    # ---------------------------------------------------------------- parameter bookkeeping
    def _all_keys(self):
        """(group index, param, key) for every distinct param with elements, trainable or not."""
        seen = set()
        key = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in seen and p.numel():
                    seen.add(id(p))
                    yield gi, p, key
                key += 1

    def _tensor_keys(self):
        """(group index, param, key) for trainable params; key = position among all params.

        A tensor listed twice (tied weights) is perturbed once, under its first key.
        """
        forced = self._forced_keys
        for gi, p, key in self._all_keys():
            if (p.requires_grad if forced is None else key in forced):
                yield gi, p, key

    def _entries(self, keys=None):
        """The (group index, param, key) of ``keys`` (all trainable ones if None)."""
        if keys is None:
            return list(self._tensor_keys())
        wanted = set(keys)
        return [e for e in self._all_keys() if e[2] in wanted]

    def _buckets(self, per_group, entries=None):
        """Group (param, key) by device and by the per-group values, one kernel call each.

        Each bucket holds (tensors, keys, offsets, quanta); quanta is None outside exact mode,
        else the per-tensor quantum from the state (None for float32 tensors).
        """
        buckets: dict[tuple, tuple[list, list, list, list | None]] = {}
        entries = self._entries() if entries is None else entries
        exact = self._exact_active(entries)
        for gi, p, key in entries:
            tensor, offset = distributed.local_view(p)  # a shard: its global element offset
            tensors, keys, offsets, quanta = buckets.setdefault(
                (tensor.device, per_group(gi)), ([], [], [], [] if exact else None))
            tensors.append(tensor)
            keys.append(key)
            offsets.append(offset)
            if exact:
                quanta.append(self.state[p].get("exact_quantum"))
        return buckets

    def _exact_active(self, entries=None) -> bool:
        """Exact mode is on and some trainable tensor is 16-bit (has a quantum)."""
        entries = self._entries() if entries is None else entries
        return self.exact_perturbation and any(p.dtype != torch.float32 for _, p, _ in entries)

    def _prepare_exact(self, entries):
        """Give every 16-bit trainable tensor without one its quantum, and snap it onto its grid.

        Runs at the start of each step (a no-op after the first): the quanta come from the clean
        weights and then stay fixed, in the optimizer state, so checkpoints resume bit-identically.
        """
        if not self.exact_perturbation:
            return
        for gi, p, _ in entries:
            state = self.state[p]
            if p.dtype == torch.float32 or state.get("exact_quantum") is not None:
                continue
            q = _exact_quantum(p, float(self.param_groups[gi]["eps"]))
            tensor, _ = distributed.local_view(p)
            ops.snap_to_grid_([tensor], [q])
            state["exact_quantum"] = q

    def _perturb(self, seed: int, scales: list[float], *, eps_list=None, multiple=None, entries=None):
        """θ += scale·z per group. In exact mode the scales must be an integer multiple of the
        groups' eps (inferred unless given): 16-bit tensors then move by multiple·k integer steps.
        """
        entries = self._entries() if entries is None else entries
        exact = self._exact_active(entries)
        if exact:
            if multiple is None:
                eps_list = self._eps_list()
                multiple = _integer_multiple(scales, eps_list)
            values = eps_list
        else:
            values = scales
        with _interrupts_deferred():
            for (_, value), (tensors, keys, offsets, quanta) in self._buckets(
                    lambda gi: values[gi], entries).items():
                common = dict(keys=keys, offsets=offsets, distribution=self.distribution,
                              backend=self.backend)
                if exact:
                    ops.exact_perturb_(tensors, seed, value, multiple, quanta, **common)
                else:
                    ops.perturb_(tensors, seed, value, **common)
            self._after_pass()

    def _after_pass(self):
        # autocast caches the low-precision copy of each weight until its region ends; a copy made
        # at θ+εz would serve the forward at θ−εz (L+ = L−, g = 0). The weights changed: drop it.
        torch.clear_autocast_cache()
        if self._dist is not None:
            self._dist.after_pass()

    def _pass(self, seed: int, multiple: int, step):
        """Within a step: θ += multiple·εz(seed) over the step's parameters, journaled."""
        self._perturb(seed, [multiple * e for e in step.eps], eps_list=step.eps, multiple=multiple,
                      entries=step.entries)
        self._journal.append([seed, multiple])
        total = self._on_weights.get(seed, 0) + multiple
        if total:
            self._on_weights[seed] = total
        else:
            self._on_weights.pop(seed, None)

    def _restore_and_update(self, seed, eps_list, grads, next_seed=None, next_scales=None, entries=None):
        def per_group(gi):
            group = self.param_groups[gi]
            nxt = next_scales[gi] if next_scales is not None else None
            return eps_list[gi], float(group["lr"]), grads[gi], float(group["weight_decay"]), nxt

        for (_, (eps, lr, g, wd, nxt)), (tensors, keys, offsets, quanta) in self._buckets(
                per_group, entries).items():
            common = dict(keys=keys, offsets=offsets, distribution=self.distribution,
                          stochastic_rounding=self.stochastic_rounding, backend=self.backend,
                          exact_quanta=quanta)
            if next_seed is None:
                ops.restore_and_update_(tensors, seed, eps, lr, g, wd, **common)
            else:
                ops.restore_update_and_perturb_(tensors, seed, eps, lr, g, wd, next_seed, nxt, **common)
        self._after_pass()

    def _eps_list(self):
        return [float(g["eps"]) for g in self.param_groups]

    # ------------------------------------------------------------------------ the step
    def seed_for(self, step: int, direction: int = 0) -> int:
        return noise.step_seed(self.base_seed, step, direction)

    def _evaluate(self, closure) -> float:
        with torch.no_grad():
            if self._dist is not None:  # a raising closure is reported at the loss exchange
                return self._dist.evaluate(self, closure)
            value = _as_scalar(closure())
        return value

    def _reduce_losses(self, values: list[float]) -> list[float]:
        """Data parallelism: the losses averaged over the ranks (identity without a group)."""
        if self._dist is not None:
            return self._dist.reduce(self, values)
        return values

    @torch.no_grad()
    def step(self, closure=None):
        """One MeZO step. ``closure()`` evaluates the objective (no backward) and returns a scalar.

        Returns the loss estimate at the clean weights: (L+ + L−)/2 for the central estimator
        (averaged over directions), L(θ) for the forward estimator, as a float.
        A step is a transaction: every check runs before the first pass; the q directions are
        all evaluated at θ, each restored before the next, and only then are the q updates
        applied. On an exception, KeyboardInterrupt or (with on_nonfinite="raise") a NaN/inf
        loss in any direction the passes applied so far are undone before the error
        propagates, and neither the step count nor the trajectory moves.
        """
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss; it does no backward")
        if self._trajectory_foreign:
            raise FileExistsError(self._foreign_message())
        for group in self.param_groups:  # a schedule or a user may have changed them
            _check_group(group)
        step = _StepState(self)
        if self._dist is None or not self._dist.split:
            self._check_update_constants(step, [[0.0] * len(step.eps)])
        self._journal, self._on_weights = [], {}
        step.pending_consumed = False
        try:
            record = self._step(closure, step)
        except BaseException:  # KeyboardInterrupt too: never leave the weights perturbed
            self._abort(step)
            raise
        if record is None:
            self._abort(step)
        return None if record is None else record.loss

    def _abort(self, step):
        """Undo what the failed step left on the weights; log the passes for replay."""
        with _interrupts_deferred():
            for seed, multiple in list(self._on_weights.items()):
                self._pass(seed, -multiple, step)
            if self._journal or step.pending_consumed:
                self._append_record({"abort": self.step_count, "passes": self._journal,
                                     "pending": step.pending_consumed,
                                     "groups": self._groups_record()}, step)
            self._journal, self._on_weights = [], {}

    def _step(self, closure, step):
        self._prepare_exact(step.entries)
        if self._dist is not None:
            self._dist.begin_step()
            if self._dist.split:
                return self._dist.split_step(self, closure, step)
        t = self.step_count
        eps_list = step.eps
        q = self.num_directions
        seeds = [self.seed_for(t, d) for d in range(q)]
        losses, all_grads = [], []
        pending = self._pending
        if pending is not None and (pending.seed != seeds[0] or pending.scales != eps_list
                                    or pending.keys != step.keys):
            # the step count, an eps or the trainable set changed since the +εz was applied
            self.materialize()
            pending = None
        if self.estimator == "forward":
            base = self._evaluate(closure)
            [base] = self._reduce_losses([base])
            if not self._check_finite([base]):
                return None
        for d, seed in enumerate(seeds):
            last = d == q - 1
            if d == 0 and pending is not None:
                self._pending = None
                step.pending_consumed = True
                self._on_weights[seed] = 1
            else:
                self._pass(seed, 1, step)
            plus = self._evaluate(closure)
            if self.estimator == "central":
                self._pass(seed, -2, step)
                minus = self._evaluate(closure)
                plus, minus = self._reduce_losses([plus, minus])
                if not self._check_finite([plus, minus]):
                    return None
                diff = (plus - minus) / 2.0
                if not last:
                    self._pass(seed, 1, step)  # back to θ: every direction starts from θ
            else:
                [plus] = self._reduce_losses([plus])
                minus = base
                if not self._check_finite([plus]):
                    return None
                diff = plus - minus
                if not last:
                    self._pass(seed, -1, step)
            grads = [diff / e for e in eps_list]
            if self.sign:
                grads = [math.copysign(1.0, g) if g != 0 else 0.0 for g in grads]
            all_grads.append([g / q for g in grads])
            losses.append((plus, minus))
        if self.estimator == "central":
            loss = sum((p + m) / 2 for p, m in losses) / q
        else:
            loss = base
        record = StepRecord(step=t, seeds=seeds, losses=losses,
                            projected_grads=[g[0] * q for g in all_grads], loss=loss)
        restore = eps_list if self.estimator == "central" else [-e for e in eps_list]
        self._commit(step, record, seeds, all_grads, restore)
        return record

    def _check_update_constants(self, step, all_grads):
        """Every float32 constant of the update passes, computed before the first pass moves
        anything: a projected gradient that overflows lr·g fails the step cleanly."""
        for grads in all_grads:
            for gi, g in enumerate(grads):
                group = self.param_groups[gi]
                lr, wd = float(group["lr"]), float(group["weight_decay"])
                ops.as_float32(g, "projected_grad")
                ops.as_float32(1.0 - lr * wd, "1 - lr * weight_decay")
                ops.as_float32(lr * g, "lr * projected_grad")

    def _commit(self, step, record, seeds, all_grads, restore):
        """Apply the q updates and count the step.

        ``restore``: per group the eps to restore the last direction with, merged into its update
        (the weights hold θ ∓ εz of that direction); None when every direction is already
        restored. Runs with Ctrl-C held: either the whole update lands and the step is counted,
        or (an overflowing lr·g, checked first) nothing moves and the step fails.
        """
        self._check_update_constants(step, all_grads)
        zeros = [0.0] * len(step.eps)
        pure = range(len(seeds))
        with _interrupts_deferred():
            if restore is not None:
                last = len(seeds) - 1
                pure = range(last)
                if self.fused_steps:
                    next_seed = self.seed_for(record.step + 1, 0)
                    self._restore_and_update(seeds[last], restore, all_grads[last], next_seed,
                                             step.eps, entries=step.entries)
                    self._pending = _Pending(next_seed, list(step.eps), list(step.keys))
                else:
                    self._restore_and_update(seeds[last], restore, all_grads[last],
                                             entries=step.entries)
            for d in pure:
                self._restore_and_update(seeds[d], zeros, all_grads[d], entries=step.entries)
            self._on_weights, self._journal = {}, []
            self.last_step = record
            self.step_count += 1
            if self._trajectory_path is not None:
                self._append_record({"step": record.step, "losses": record.losses,
                                     "groups": self._groups_record()}, step)

    def _check_finite(self, values) -> bool:
        if all(math.isfinite(v) for v in values):
            return True
        message = f"MeZO step {self.step_count}: the closure returned a non-finite loss {values}"
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(message + "; the weights were restored")
        warnings.warn(message + "; step skipped, weights restored", RuntimeWarning, stacklevel=4)
        return False

    # ----------------------------------------------------------------- fused-steps mode
    def materialize(self):
        """Remove a pending +εz (fused-steps mode) so the weights are the clean θ."""
        if self._pending is not None:
            pending = self._pending
            entries = self._entries(pending.keys) if pending.keys is not None else None
            with _interrupts_deferred():
                self._pending = None
                self._perturb(pending.seed, [-s for s in pending.scales], eps_list=pending.scales,
                              multiple=-1, entries=entries)
                self._log_materialize()

    @property
    def weights_are_clean(self) -> bool:
        return self._pending is None

    @contextlib.contextmanager
    def clean_weights(self):
        """``with opt.clean_weights(): evaluate(model)``: weights are θ inside the block."""
        self.materialize()
        yield

    # ------------------------------------------------------------------- checkpointing
    def state_dict(self):
        """Optimizer state, including a pending +εz of fused-steps mode.

        The weights are not touched, so a checkpoint of the model (taken before or after this
        call) and this state resume bit-identically. To export clean weights in fused-steps
        mode, call ``materialize()`` first.
        """
        state = super().state_dict()
        state["mezo"] = {
            "step": self.step_count,
            "base_seed": self.base_seed,
            **{name: getattr(self, name) for name in _SAVED_OPTIONS},
            "last_step": asdict(self.last_step) if self.last_step else None,
            "pending": asdict(self._pending) if self._pending else None,
            "layouts": self._layouts(),
            "trajectory": ({"run": self._trajectory_run, "lines": self._trajectory_lines,
                            "keys": self._trajectory_keys}
                           if self._trajectory_run and not self._trajectory_foreign else None),
        }
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        mezo = state_dict.pop("mezo", None)
        if mezo is None:
            raise ValueError("not a fastzo.MeZO state dict (no 'mezo' entry)")
        saved, now = mezo.get("layouts", "unrecorded"), self._layouts()
        if saved != "unrecorded" and saved != now:  # None: every parameter row-major
            raise ValueError(_layout_message("the checkpoint", saved, now))
        self._pending = None  # whatever the current weights held is replaced by the loaded ones
        super().load_state_dict(state_dict)
        self.step_count = int(mezo["step"])
        self.base_seed = int(mezo["base_seed"])
        for name in _SAVED_OPTIONS:
            setattr(self, name, mezo[name])
        last = mezo.get("last_step")
        self.last_step = StepRecord(**last) if last else None
        pending = mezo.get("pending")
        # The loaded weights are the ones saved with this state: with a pending +εz they hold it.
        self._pending = _Pending(**pending) if pending else None
        if self._trajectory_path is not None:
            self._resume_trajectory(mezo.get("trajectory"))

    # ------------------------------------------------------------------- copy and pickle
    _COPIED = ("base_seed", "backend", "distribution", "num_directions", "estimator", "sign",
               "fused_steps", "on_nonfinite", "stochastic_rounding", "exact_perturbation",
               "step_count", "last_step", "_pending", "_forced_keys")

    def __getstate__(self):
        if self._dist is not None:
            raise TypeError("a MeZO optimizer with a process group or split_directions cannot be "
                            "copied or pickled; save opt.state_dict() instead")
        state = super().__getstate__()
        state["mezo"] = {name: getattr(self, name) for name in self._COPIED}
        state["mezo"]["trajectory"] = self._trajectory_path
        return state

    def __setstate__(self, state):
        state = dict(state)
        mezo = state.pop("mezo", None)
        super().__setstate__(state)
        if mezo is None:  # Optimizer.load_state_dict sets the groups and state this way
            return
        for name in self._COPIED:
            setattr(self, name, mezo[name])
        self._on_weights, self._journal = {}, []
        self._dist = None
        # A copy does not write to the original's trajectory file (two writers would interleave).
        self._trajectory_path = self._trajectory_run = self._trajectory_keys = None
        self._trajectory_lines, self._trajectory_foreign = 0, False
        if mezo["trajectory"] is not None:
            warnings.warn(f"the copy of this MeZO optimizer does not write to the trajectory "
                          f"{mezo['trajectory']!r}; the original keeps writing it", UserWarning,
                          stacklevel=2)

    # --------------------------------------------------------------------- trajectory
    def _layouts(self):
        layouts = [layout_of(p) for g in self.param_groups for p in g["params"]]
        return layouts if any(x is not None for x in layouts) else None

    def _resolved_backend(self):
        if self.backend is not None:
            return self.backend
        from .backends import pick_backend

        devices = {distributed.local_view(p)[0].device for _, p, _ in self._all_keys()}
        names = sorted({pick_backend(d) for d in devices})
        return names[0] if len(names) == 1 else (names or None)

    def _trajectory_header(self):
        return {
            "format": TRAJECTORY_FORMAT,
            "run": self._trajectory_run,
            "base_seed": self.base_seed,
            "backend": self._resolved_backend(),
            **{name: getattr(self, name) for name in _SAVED_OPTIONS},
            "params_per_group": [len(g["params"]) for g in self.param_groups],
            "layouts": self._layouts(),
        }

    def _open_trajectory(self):
        path = self._trajectory_path
        if os.path.exists(path) and os.path.getsize(path) > 0:
            # Another run's file (or this run's, before load_state_dict resumes it): steps refuse
            # to append to it until a checkpoint of that run is loaded.
            self._trajectory_foreign = True
            return
        self._trajectory_run = uuid.uuid4().hex
        with open(path, "w") as f:
            f.write(json.dumps(self._trajectory_header()) + "\n")
        self._trajectory_lines = 1
        self._trajectory_keys = None
        self._header_keys = [key for _, _, key in self._all_keys()]

    def _foreign_message(self):
        try:
            header = _read_header(self._trajectory_path)
            what = f"a run with base seed {header.get('base_seed')}"
        except (OSError, ValueError):
            what = "something that is not a fastzo trajectory"
        return (f"the trajectory file {self._trajectory_path} already holds {what} (written "
                "earlier); MeZO never appends to another run's file. Pass a new path or delete "
                "the file; to continue that run, load its checkpoint with opt.load_state_dict(...) "
                "before the first step (the file is then trimmed to the checkpoint's step)")

    def _resume_trajectory(self, info):
        """After load_state_dict: continue the checkpoint's run in the trajectory file, trimmed to
        the lines it had at the checkpoint; or start this file afresh at the checkpoint's step."""
        path = self._trajectory_path
        if self._trajectory_foreign:
            try:
                header = _read_header(path)
            except (OSError, ValueError):
                return  # not a trajectory: steps keep refusing with the message
            if info is not None and header.get("run") == info["run"]:
                trim_trajectory(path, lines=info["lines"])
                self._trajectory_lines = info["lines"]
                self._trajectory_keys = info.get("keys")
                self._header_keys = _header_keys(self, header)
            elif info is None and header.get("run") is None and header.get("base_seed") == self.base_seed:
                trim_trajectory(path, self.step_count)  # a checkpoint from before run ids
                with open(path) as f:
                    self._trajectory_lines = sum(1 for line in f if line.strip())
                self._trajectory_keys = None
                self._header_keys = _header_keys(self, header)
            else:
                return
            self._trajectory_run = header.get("run")
            self._trajectory_foreign = False
            return
        if self._trajectory_lines == 1 and self.step_count > 0:
            # A fresh file for a run resumed from a checkpoint: replay starts from its weights.
            header = self._trajectory_header()
            header["first_step"] = self.step_count
            header["pending"] = asdict(self._pending) if self._pending else None
            with open(path, "w") as f:
                f.write(json.dumps(header) + "\n")

    def _groups_record(self):
        return [[float(g["lr"]), float(g["eps"]), float(g["weight_decay"])] for g in self.param_groups]

    def _append_record(self, line, step):
        if self._trajectory_path is None:
            return
        lines = []
        keys = None if step.keys == self._header_keys else step.keys
        if keys != self._trajectory_keys:
            lines.append({"trainable": keys})
        lines.append(line)
        with open(self._trajectory_path, "a") as f:
            f.write("".join(json.dumps(x) + "\n" for x in lines))
        self._trajectory_lines += len(lines)
        self._trajectory_keys = keys

    def _log_materialize(self):
        if self._trajectory_path is not None and not self._trajectory_foreign:
            with open(self._trajectory_path, "a") as f:
                f.write(json.dumps({"materialize": self.step_count}) + "\n")
            self._trajectory_lines += 1


TRAJECTORY_FORMAT = "fastzo-trajectory-2"


class _StepState:
    """What a step works on, fixed at its start: the trainable parameters and each group's eps."""

    def __init__(self, opt):
        self.entries = opt._entries()
        self.keys = [key for _, _, key in self.entries]
        self.eps = opt._eps_list()
        self.pending_consumed = False


def _check_group(group):
    for name in ("lr", "weight_decay"):
        _check_number(f"param group {name}", group[name], minimum=0.0)
    _check_number("param group eps", group["eps"], strictly_positive=True)
    for p in group["params"]:
        check_parameter(p)


def _header_keys(opt, header):
    """The keys of every parameter in the trajectory header's groups (the run's first groups)."""
    count = sum(header["params_per_group"])
    return [key for _, _, key in opt._all_keys() if key < count]


def _layout_message(where, saved, now):
    diffs = [i for i, (a, b) in enumerate(zip(saved or [], now or [])) if a != b]
    i = diffs[0] if diffs else 0
    return (f"parameter {i} lies in memory in another memory format than in {where} (dimension "
            f"order {saved[i] if saved else None} there, {now[i] if now else None} here): z is drawn "
            "in memory order, so the result would differ. Convert the model to the same memory "
            "format (e.g. model.to(memory_format=torch.channels_last)) first")


def _read_header(path):
    with open(path) as f:
        first = f.readline()
    try:
        header = json.loads(first)
    except json.JSONDecodeError:
        raise ValueError(f"{path} is not a fastzo trajectory") from None
    if not isinstance(header, dict) or not str(header.get("format", "")).startswith("fastzo-trajectory-"):
        raise ValueError(f"{path} is not a fastzo trajectory")
    return header


def trim_trajectory(path, step: int | None = None, *, lines: int | None = None) -> None:
    """Cut a trajectory file back to a checkpoint, so that it describes exactly the weights saved.

    ``MeZO.load_state_dict`` does this by itself when the optimizer was built with the same
    ``trajectory=`` file (it keeps the lines written up to the checkpoint). Call it yourself for a
    file you resume by other means: ``trim_trajectory(path, step)`` drops every record of step
    ``step`` and later.
    """
    with open(path) as f:
        all_lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
    _read_header(path)
    if lines is not None:
        kept = all_lines[:lines]
    else:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        kept = all_lines[:1]
        for line in all_lines[1:]:
            record = json.loads(line)
            at = record.get("step", record.get("abort", record.get("materialize")))
            if at is not None and (at > step or (at == step and "materialize" not in record)):
                break
            kept.append(line)
    if len(kept) != len(all_lines):
        with open(path, "w") as f:
            f.writelines(kept)


def replay(params, trajectory, backend: str | None = None):
    """Rebuild fine-tuned weights from the starting weights and a trajectory file, in place.

    ``params`` must be the same parameters (or param groups, in the same order, including groups
    added during the run) the run started from — for a file started at a checkpoint
    (``first_step`` in its header), the checkpoint's weights. With ``backend=None`` the backend
    the run used (recorded in the file); on that backend the result is bit-identical to the run.
    Another backend is used with a warning: its z agrees to a few ulp, not bit for bit.
    """
    with open(trajectory) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or not isinstance(lines[0], dict) or lines[0].get("format") not in (
            "fastzo-trajectory-1", TRAJECTORY_FORMAT):
        raise ValueError(f"{trajectory} is not a fastzo trajectory")
    header, records = lines[0], lines[1:]
    if header["format"] == "fastzo-trajectory-1" and header["num_directions"] > 1:
        raise ValueError(f"{trajectory} was written by an older fastzo whose q directions were "
                         "evaluated one after another's update; this version evaluates all at θ "
                         "and cannot replay it")
    recorded = header.get("backend")
    if backend is None and isinstance(recorded, str):
        from .backends import available_backends

        backend = recorded if recorded in available_backends() else None
        if backend is None:
            warnings.warn(f"the trajectory was recorded on backend {recorded!r}, not available here; "
                          "replaying on the default backend: z agrees to a few ulp, the weights are "
                          "not bit-identical", UserWarning, stacklevel=2)
    opt = MeZO(params, lr=0.0, seed=header["base_seed"], backend=backend,
               distribution=header["distribution"], num_directions=header["num_directions"],
               estimator=header["estimator"], sign=header["sign"], fused_steps=header["fused_steps"],
               stochastic_rounding=header["stochastic_rounding"],
               exact_perturbation=header.get("exact_perturbation", False))
    if isinstance(recorded, str) and backend is not None and backend != recorded:
        warnings.warn(f"the trajectory was recorded on backend {recorded!r} and is replayed on "
                      f"{backend!r}: z agrees to a few ulp, the weights are not bit-identical",
                      UserWarning, stacklevel=2)
    counts = [len(g["params"]) for g in opt.param_groups]
    if counts[:len(header["params_per_group"])] != header["params_per_group"]:
        raise ValueError(f"the parameter groups do not match the trajectory's: {counts} parameters "
                         f"per group here, {header['params_per_group']} in the file")
    if header.get("layouts") != opt._layouts():
        raise ValueError(_layout_message("the trajectory", header.get("layouts"), opt._layouts()))
    if header.get("pending"):
        opt._pending = _Pending(**header["pending"])
    everything = set(_header_keys(opt, header))
    opt._forced_keys = everything
    for record in records:
        if "materialize" in record:
            opt.materialize()
            continue
        if "trainable" in record:
            opt._forced_keys = everything if record["trainable"] is None else set(record["trainable"])
            continue
        for group, (lr, eps, wd) in zip(opt.param_groups, record["groups"]):
            group.update(lr=lr, eps=eps, weight_decay=wd)
        opt.step_count = record.get("step", record.get("abort"))
        if "abort" in record:
            step = _StepState(opt)
            opt._prepare_exact(step.entries)
            if record["pending"]:
                opt._pending = None
            for seed, multiple in record["passes"]:
                opt._pass(seed, multiple, step)
            opt._on_weights, opt._journal = {}, []
            continue
        values = iter(_replayed_losses(record["losses"], header["estimator"]))
        opt.step(lambda: next(values))
    opt.materialize()
    opt._forced_keys = None
    return opt


def _integer_multiple(scales, eps_list) -> int:
    """The integer m with scales[g] == m·eps_list[g] for every group (exact mode)."""
    ratios = {s / e for s, e in zip(scales, eps_list)}
    if len(ratios) != 1 or not float(next(iter(ratios))).is_integer():
        raise RuntimeError(
            f"exact_perturbation moves weights by integer multiples of each group's eps; got "
            f"scales {scales} for eps {eps_list}"
        )
    return int(ratios.pop())


def _exact_quantum(p, eps: float) -> float:
    """ops.exact_quantum of a parameter; for a sharded DTensor from the rms of the whole tensor."""
    if not (distributed.is_dtensor(p) and distributed.is_sharded(p)):
        tensor, _ = distributed.local_view(p)
        return ops.exact_quantum(tensor, eps)
    tensor, _ = distributed.local_view(p)
    total, count = ops.sum_of_squares(tensor)
    stats = torch.tensor([total, count], dtype=torch.float64, device=tensor.device)
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            torch.distributed.all_reduce(stats, group=p.device_mesh.get_group(dim))
    total, count = stats.tolist()
    return ops.quantum_of(tensor.dtype, total, int(count), eps)


def _replayed_losses(losses, estimator):
    if estimator == "central":
        return [v for pair in losses for v in pair]
    return [losses[0][1]] + [pair[0] for pair in losses]
