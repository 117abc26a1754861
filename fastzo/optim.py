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
import os
import warnings
from dataclasses import asdict, dataclass, field

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


def _check_number(name, value, *, minimum=None, strictly_positive=False):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar (a loss, or a float such as -accuracy); got a "
                f"tensor of shape {tuple(value.shape)}"
            )
        return float(value.detach().float().item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"the closure must return a scalar (a loss tensor or a float), got {type(value).__name__}"
        )
    return float(value)


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
        super().__init__(params, defaults)
        for group in self.param_groups:
            for name in ("lr", "weight_decay"):
                _check_number(f"param group {name}", group[name], minimum=0.0)
            _check_number("param group eps", group["eps"], strictly_positive=True)
            for p in group["params"]:
                if p.dtype not in ops.SUPPORTED_DTYPES:
                    raise TypeError(f"MeZO perturbs float32/bfloat16/float16 parameters, got {p.dtype}")
                if not p.is_contiguous():
                    raise ValueError(f"parameter of shape {tuple(p.shape)} is not contiguous")
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
        self._trajectory_path = os.fspath(trajectory) if trajectory is not None else None
        distributed.check_params(self, process_group)
        self._dist = None
        if process_group is not None or split_directions:
            self._dist = distributed.Coordinator(self, process_group, split_directions)
        if self._trajectory_path is not None:
            self._write_trajectory_header()

    # ---------------------------------------------------------------- parameter bookkeeping
    def _tensor_keys(self):
        """(group index, param, key) for trainable params; key = position among all params.

        A tensor listed twice (tied weights) is perturbed once, under its first key.
        """
        seen = set()
        key = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                ident = id(p)
                if ident not in seen and p.requires_grad and p.numel():
                    seen.add(ident)
                    yield gi, p, key
                key += 1

    def _buckets(self, per_group):
        """Group (param, key) by device and by the per-group values, one kernel call each.

        Each bucket holds (tensors, keys, offsets, quanta); quanta is None outside exact mode,
        else the per-tensor quantum from the state (None for float32 tensors).
        """
        buckets: dict[tuple, tuple[list, list, list, list | None]] = {}
        exact = self._exact_active()
        for gi, p, key in self._tensor_keys():
            tensor, offset = distributed.local_view(p)  # a shard: its global element offset
            tensors, keys, offsets, quanta = buckets.setdefault(
                (tensor.device, per_group(gi)), ([], [], [], [] if exact else None))
            tensors.append(tensor)
            keys.append(key)
            offsets.append(offset)
            if exact:
                quanta.append(self.state[p].get("exact_quantum"))
        return buckets

    def _exact_active(self) -> bool:
        """Exact mode is on and some trainable tensor is 16-bit (has a quantum)."""
        return self.exact_perturbation and any(
            p.dtype != torch.float32 for _, p, _ in self._tensor_keys())

    def _prepare_exact(self):
        """Give every 16-bit trainable tensor without one its quantum, and snap it onto its grid.

        Runs at the start of each step (a no-op after the first): the quanta come from the clean
        weights and then stay fixed, in the optimizer state, so checkpoints resume bit-identically.
        """
        if not self.exact_perturbation:
            return
        for gi, p, _ in self._tensor_keys():
            state = self.state[p]
            if p.dtype == torch.float32 or state.get("exact_quantum") is not None:
                continue
            q = _exact_quantum(p, float(self.param_groups[gi]["eps"]))
            tensor, _ = distributed.local_view(p)
            ops.snap_to_grid_([tensor], [q])
            state["exact_quantum"] = q

    def _perturb(self, seed: int, scales: list[float], *, eps_list=None, multiple=None):
        """θ += scale·z per group. In exact mode the scales must be an integer multiple of the
        groups' eps (inferred unless given): 16-bit tensors then move by multiple·k integer steps.
        """
        exact = self._exact_active()
        if exact:
            if multiple is None:
                eps_list = self._eps_list()
                multiple = _integer_multiple(scales, eps_list)
            values = eps_list
        else:
            values = scales
        for (_, value), (tensors, keys, offsets, quanta) in self._buckets(lambda gi: values[gi]).items():
            common = dict(keys=keys, offsets=offsets, distribution=self.distribution,
                          backend=self.backend)
            if exact:
                ops.exact_perturb_(tensors, seed, value, multiple, quanta, **common)
            else:
                ops.perturb_(tensors, seed, value, **common)
        if self._dist is not None:
            self._dist.after_pass()

    def _restore_and_update(self, seed, eps_list, grads, next_seed=None, next_scales=None):
        def per_group(gi):
            group = self.param_groups[gi]
            nxt = next_scales[gi] if next_scales is not None else None
            return eps_list[gi], float(group["lr"]), grads[gi], float(group["weight_decay"]), nxt

        for (_, (eps, lr, g, wd, nxt)), (tensors, keys, offsets, quanta) in self._buckets(per_group).items():
            common = dict(keys=keys, offsets=offsets, distribution=self.distribution,
                          stochastic_rounding=self.stochastic_rounding, backend=self.backend,
                          exact_quanta=quanta)
            if next_seed is None:
                ops.restore_and_update_(tensors, seed, eps, lr, g, wd, **common)
            else:
                ops.restore_update_and_perturb_(tensors, seed, eps, lr, g, wd, next_seed, nxt, **common)
        if self._dist is not None:
            self._dist.after_pass()

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
        On an exception or (with on_nonfinite="raise") a NaN/inf loss the weights are restored
        before the error propagates, and the step is not counted.
        """
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss; it does no backward")
        with self._restore_on_error():
            record = self._step(closure)
        if record is None:
            return None
        self.last_step = record
        self.step_count += 1
        if self._trajectory_path is not None:
            self._append_trajectory(record)
        return record.loss

    def _step(self, closure):
        self._prepare_exact()
        if self._dist is not None:
            self._dist.begin_step()
            if self._dist.split:
                return self._dist.split_step(self, closure)
        t = self.step_count
        eps_list = self._eps_list()
        q = self.num_directions
        seeds, losses, grads0 = [], [], []
        if self.estimator == "forward":
            base = self._evaluate(closure)
            [base] = self._reduce_losses([base])
            self._check_finite([base])
        for d in range(q):
            seed = self.seed_for(t, d)
            seeds.append(seed)
            if self._pending is not None and self._pending.seed != seed:
                self.materialize()  # step count was changed under us (e.g. a load)
            if self._pending is not None:
                self._pending = None
                self._applied = (seed, 1.0)
            else:
                self._applied = (seed, 0.0)
                self._perturb(seed, eps_list)
                self._applied = (seed, 1.0)
            plus = self._evaluate(closure)
            if self.estimator == "central":
                self._perturb(seed, [-2 * e for e in eps_list])
                self._applied = (seed, -1.0)
                minus = self._evaluate(closure)
                plus, minus = self._reduce_losses([plus, minus])
                if not self._check_finite([plus, minus]):
                    self._restore_applied()
                    return None
                diff, restore_eps = (plus - minus) / 2.0, eps_list
            else:
                [plus] = self._reduce_losses([plus])
                minus = base
                if not self._check_finite([plus]):
                    self._restore_applied()
                    return None
                diff, restore_eps = plus - minus, [-e for e in eps_list]
            grads = [diff / e for e in eps_list]
            if self.sign:
                grads = [math.copysign(1.0, g) if g != 0 else 0.0 for g in grads]
            grads = [g / q for g in grads]
            grads0.append(grads[0] * q)
            losses.append((plus, minus))
            if self.fused_steps:
                next_seed = self.seed_for(t + 1, 0)
                self._restore_and_update(seed, restore_eps, grads, next_seed, eps_list)
                self._pending = _Pending(next_seed, list(eps_list))
            else:
                self._restore_and_update(seed, restore_eps, grads)
            self._applied = None
        if self.estimator == "central":
            loss = sum((p + m) / 2 for p, m in losses) / q
        else:
            loss = base
        return StepRecord(step=t, seeds=seeds, losses=losses, projected_grads=grads0, loss=loss)

    def _check_finite(self, values) -> bool:
        if all(math.isfinite(v) for v in values):
            return True
        message = f"MeZO step {self.step_count}: the closure returned a non-finite loss {values}"
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(message + "; the weights were restored")
        warnings.warn(message + "; step skipped, weights restored", RuntimeWarning, stacklevel=4)
        return False

    def _restore_applied(self):
        """Undo the perturbation currently on the weights (state in ``self._applied``)."""
        applied = getattr(self, "_applied", None)
        self._applied = None
        if applied is None:
            return
        seed, multiple = applied
        if multiple != 0.0:
            self._perturb(seed, [-multiple * e for e in self._eps_list()])

    @contextlib.contextmanager
    def _restore_on_error(self):
        self._applied = None
        try:
            yield
        except BaseException:  # KeyboardInterrupt too: never leave the weights perturbed
            self._restore_applied()
            raise

    # ----------------------------------------------------------------- fused-steps mode
    def materialize(self):
        """Remove a pending +εz (fused-steps mode) so the weights are the clean θ."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._perturb(pending.seed, [-s for s in pending.scales], eps_list=pending.scales,
                          multiple=-1)
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
        }
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        mezo = state_dict.pop("mezo", None)
        if mezo is None:
            raise ValueError("not a fastzo.MeZO state dict (no 'mezo' entry)")
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

    # --------------------------------------------------------------------- trajectory
    def _trajectory_header(self):
        return {
            "format": "fastzo-trajectory-1",
            "base_seed": self.base_seed,
            **{name: getattr(self, name) for name in _SAVED_OPTIONS},
            "params_per_group": [len(g["params"]) for g in self.param_groups],
        }

    def _write_trajectory_header(self):
        exists = os.path.exists(self._trajectory_path) and os.path.getsize(self._trajectory_path) > 0
        if not exists:
            with open(self._trajectory_path, "w") as f:
                f.write(json.dumps(self._trajectory_header()) + "\n")

    def _append_trajectory(self, record: StepRecord):
        groups = [[float(g["lr"]), float(g["eps"]), float(g["weight_decay"])] for g in self.param_groups]
        line = {"step": record.step, "losses": record.losses, "groups": groups}
        with open(self._trajectory_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def _log_materialize(self):
        if self._trajectory_path is not None:
            with open(self._trajectory_path, "a") as f:
                f.write(json.dumps({"materialize": self.step_count}) + "\n")


def replay(params, trajectory, backend: str | None = None):
    """Rebuild fine-tuned weights from the starting weights and a trajectory file, in place.

    ``params`` must be the same parameters (or param groups, in the same order) the run started
    from. On the backend the run used, the result is bit-identical to the run.
    """
    with open(trajectory) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or lines[0].get("format") != "fastzo-trajectory-1":
        raise ValueError(f"{trajectory} is not a fastzo trajectory")
    header, records = lines[0], lines[1:]
    opt = MeZO(params, lr=0.0, seed=header["base_seed"], backend=backend,
               distribution=header["distribution"], num_directions=header["num_directions"],
               estimator=header["estimator"], sign=header["sign"], fused_steps=header["fused_steps"],
               stochastic_rounding=header["stochastic_rounding"],
               exact_perturbation=header.get("exact_perturbation", False))
    if [len(g["params"]) for g in opt.param_groups] != header["params_per_group"]:
        raise ValueError("the parameter groups do not match the trajectory's")
    for record in records:
        if "materialize" in record:
            opt.materialize()
            continue
        opt.step_count = record["step"]
        for group, (lr, eps, wd) in zip(opt.param_groups, record["groups"]):
            group.update(lr=lr, eps=eps, weight_decay=wd)
        values = iter(_replayed_losses(record["losses"], header["estimator"]))
        opt.step(lambda: next(values))
    opt.materialize()
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
