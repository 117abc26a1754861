"""Data parallelism and sharded weights for ``fastzo.MeZO`` (docs/distributed.md).

MeZO's update is θ ← θ − lr·g·z with a scalar g and a z that every rank regenerates from the
step seed, so data parallelism needs no gradient all-reduce: the ranks only agree on the
losses. Each exchange is one small ``all_gather`` of a fixed-size float64 row per rank:

    [status, step, seed fingerprint, config fingerprint, exchange index, value 0, value 1]

- the values are the rank's (L+, L−) (or (L+, L0) for the forward estimator); every rank
  averages the gathered rows in rank order, so all ranks hold bit-identical averages and apply
  bit-identical updates: replicas stay identical without broadcasting weights;
- ``status`` carries a failure flag: a rank whose closure raised evaluates nothing more in that
  step but runs the same weight passes as its peers, joins the exchange with status 1 and then
  re-raises; its peers learn of the failure in the same collective and raise
  ``PeerFailureError``. Every rank then restores its weights from the same state, so replicas
  stay bit-identical and nobody is left perturbed or waiting;
- step, fingerprints and exchange index detect ranks whose seed state disagrees (e.g. resumed
  from different checkpoints) at the first exchange, with ``DistributedStateError``.

An all-gather rather than an all-reduce: the same single collective, 56 bytes per rank, and
every rank sees every rank's row, so the reduction order is fixed (identical on every rank
whatever algorithm the backend uses) and an error message can name the ranks that differ.

Sharded weights (DTensor, FSDP2's ``fully_shard``): the optimizer perturbs and updates each
rank's local shard in place (``to_local()``) with its global element offset, so a shard's z is
exactly the slice of the unsharded tensor's z (docs/noise.md) and a sharded run equals the
unsharded run. Supported placements: ``Shard(0)`` (possibly uneven, possibly empty shards) and
``Replicate()``, on any number of mesh dimensions; others are refused.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
import weakref

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
STATUS_OK = 0.0
STATUS_FAILED = 1.0
STATUS_IDLE = 2.0  # split directions: this rank had no direction in this round
ROW = 7  # float64 values per rank per exchange
_STATUS, _STEP, _SEED, _CONFIG, _INDEX, _V0, _V1 = range(ROW)


class DistributedStateError(RuntimeError):
    """Ranks disagree about the optimizer's seed state or hyperparameters (weights restored)."""


class PeerFailureError(RuntimeError):
    """Another rank's closure raised during this step; the weights here were restored."""


class ShardingError(ValueError):
    """A parameter's DTensor placement is not one fastzo can perturb shard by shard."""


# ------------------------------------------------------------------------------- sharding
def _dtensor_type():
    # No DTensor can exist before its package is imported, so nothing is imported here.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(p) -> bool:
    if type(p) in _PLAIN:
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(p, cls)


def is_sharded(p) -> bool:
    """A DTensor with at least one Shard placement on a mesh dimension of size > 1."""
    if not is_dtensor(p):
        return False
    mesh = p.device_mesh
    return any(not pl.is_replicate() and mesh.size(i) > 1 for i, pl in enumerate(p.placements))


def check_placements(p) -> None:
    """Raise ``ShardingError`` unless every placement is Shard(0) or Replicate()."""
    for i, pl in enumerate(p.placements):
        if pl.is_replicate() or pl.is_shard(0):
            continue
        raise ShardingError(
            f"parameter of global shape {tuple(p.shape)} has placement {pl} on mesh dimension {i} "
            f"(placements {tuple(p.placements)}); fastzo perturbs shards in place only for "
            "Shard(0) (a contiguous block of rows) and Replicate(). Redistribute the parameter, "
            "e.g. with FSDP2's default shard placement"
        )


def _row_range(p) -> tuple[int, int]:
    """Global [first row, number of rows) of this rank's Shard(0) block (torch.chunk split)."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - fallback: nested torch.chunk in mesh order
        compute_local_shape_and_global_offset = None
    if compute_local_shape_and_global_offset is not None:
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return int(offset[0]), int(shape[0])
    start, length = 0, p.shape[0]  # pragma: no cover
    coord = p.device_mesh.get_coordinate()  # pragma: no cover
    for i, pl in enumerate(p.placements):  # pragma: no cover
        if pl.is_shard(0):
            n = p.device_mesh.size(i)
            size = -(-length // n)
            first = min(coord[i] * size, length)
            start, length = start + first, min(first + size, length) - first
    return start, length  # pragma: no cover


def local_view(p) -> tuple[torch.Tensor, int]:
    """(the tensor to update in place, its global element offset) for a parameter.

    A plain tensor is its own view at offset 0. A DTensor's local shard (``to_local()``) starts
    at global row r, so its offset is r × (elements per row); a replicated one at 0.
    """
    if not is_dtensor(p):
        return p.detach(), 0  # shares the version counter, unlike .data
    check_placements(p)
    with torch.no_grad():
        local = p.to_local()
    if all(pl.is_replicate() for pl in p.placements):
        return local, 0
    first_row, rows = _row_range(p)
    expected = (rows, *p.shape[1:]) if p.dim() else ()
    if tuple(local.shape) != tuple(expected):
        raise ShardingError(
            f"the local shard of a parameter of global shape {tuple(p.shape)} has shape "
            f"{tuple(local.shape)}, expected {tuple(expected)} for placements {tuple(p.placements)}"
        )
    if not local.is_contiguous():
        raise ShardingError(f"the local shard of shape {tuple(local.shape)} is not contiguous")
    return local, first_row * math.prod(p.shape[1:])


def check_params(opt, process_group) -> None:
    """Validate the optimizer's parameters for the chosen mode (called once, at construction)."""
    for _, p, _ in opt._tensor_keys():
        if not is_dtensor(p):
            continue
        check_placements(p)
        if process_group is None and is_sharded(p):
            raise ValueError(
                "the parameters include sharded DTensors (FSDP2 / distribute_tensor): pass "
                "process_group= (the data-parallel group, e.g. torch.distributed.group.WORLD) "
                "so that every shard applies the same projected gradient"
            )


def _fsdp_modules(params) -> list:
    """Weak references to the FSDP2 modules that manage any of ``params``.

    FSDP2 keeps a module's parameters unsharded after its forward when it is the root (and when
    reshard_after_forward=False); those unsharded copies would not see an in-place change of the
    sharded data. The optimizer reshards these modules after each pass so the next forward
    all-gathers the perturbed shards.
    """
    if not torch.distributed.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - no FSDP2 in this torch
        return []
    try:  # private: FSDP2 keeps no public link from a parameter to its module
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover
        warnings.warn("fastzo cannot find the FSDP2 modules of the parameters in this torch "
                      "version: call model.set_reshard_after_forward(True) on the root module so "
                      "that forwards see the perturbed shards", RuntimeWarning, stacklevel=3)
        return []
    ids = {id(p) for p in params}
    found = []
    for module, state_ref in list(_module_state_mapping.items()):
        if not isinstance(module, FSDPModule):
            continue
        state = state_ref()
        groups = getattr(state, "_fsdp_param_groups", None) or []
        if any(id(fp.sharded_param) in ids for g in groups for fp in g.fsdp_params):
            found.append(weakref.ref(module))
    return found


# ------------------------------------------------------------------------ coordination
def _fingerprint(*parts) -> float:
    """48-bit hash of ``parts`` as an exactly representable float64."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=6).digest()
    return float(int.from_bytes(digest, "little"))


def _mean(values: list[float]) -> float:
    """Average in rank order; identical inputs give that input back exactly."""
    if all(v == values[0] for v in values) and math.isfinite(values[0]):
        return values[0]
    return math.fsum(values) / len(values)


class Coordinator:
    """The per-optimizer state of data-parallel / split-direction MeZO.

    ``process_group=None`` means a world of one (used by ``split_directions`` without a group).
    ``stats`` counts exchanges and the bytes this rank hands to / receives from collectives.
    """

    def __init__(self, opt, process_group, split_directions: bool):
        self.group = process_group
        self.split = bool(split_directions)
        if process_group is not None:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("process_group= needs torch.distributed to be initialized")
            self.world = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
            if self.rank < 0:
                raise ValueError("this process is not a member of process_group")
            backend = str(dist.get_backend(process_group)).lower()
            self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend \
                else torch.device("cpu")
        else:
            self.world, self.rank, self.device = 1, 0, torch.device("cpu")
        params = [p for _, p, _ in opt._tensor_keys()]
        self._fsdp = _fsdp_modules(params) if any(is_dtensor(p) for p in params) else []
        self._index = 0
        self._failure: BaseException | None = None  # this rank's closure raised in this step
        self.stats = {"exchanges": 0, "bytes_sent": 0, "bytes_received": 0}

    # ------------------------------------------------------------------- the exchange
    def _row(self, opt, status, values):
        groups = tuple((float(g["lr"]), float(g["eps"]), float(g["weight_decay"]))
                       for g in opt.param_groups)
        config = _fingerprint(opt.distribution, opt.estimator, opt.num_directions, bool(opt.sign),
                              bool(opt.fused_steps), self.split, opt.on_nonfinite, groups,
                              sum(1 for _ in opt._tensor_keys()))
        values = list(values) + [math.nan] * (2 - len(values))
        return [status, float(opt.step_count), _fingerprint(opt.base_seed), config,
                float(self._index), values[0], values[1]]

    def _all_gather(self, row) -> list[list[float]]:
        self._index += 1
        self.stats["exchanges"] += 1
        if self.group is None:  # a world of one: no collective, nothing sent
            return [row]
        import torch.distributed as dist

        mine = torch.tensor(row, dtype=torch.float64, device=self.device)
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        self.stats["bytes_sent"] += mine.nbytes  # the tensors handed to the collective
        self.stats["bytes_received"] += sum(r.nbytes for r in rows)
        try:
            dist.all_gather(rows, mine, group=self.group)
        except Exception as exc:  # a dead rank, a timeout, a broken group
            raise PeerFailureError(
                f"MeZO step {int(row[_STEP])}: the loss exchange with the other ranks failed "
                f"({type(exc).__name__}: {exc}); the weights on this rank were restored"
            ) from exc
        return torch.stack(rows).cpu().tolist()

    def exchange(self, opt, values, status=STATUS_OK) -> list[list[float]]:
        """Gather every rank's row; raise on any rank's failure or a state mismatch."""
        own, self._failure = self._failure, None
        if own is not None:
            status = STATUS_FAILED
        try:
            rows = self._all_gather(self._row(opt, status, values))
        except PeerFailureError as comm_exc:
            if own is None:
                raise
            own.add_note(f"fastzo: telling the other ranks failed too: {comm_exc}")
            raise own
        failed = [r for r, row in enumerate(rows) if row[_STATUS] == STATUS_FAILED]
        if failed:
            self._index = 0
            if own is not None:
                own.add_note(
                    f"fastzo: rank {self.rank} finished the step's weight passes and told the other "
                    f"{self.world - 1} rank(s); every rank restored its weights")
                raise own
            raise PeerFailureError(
                f"MeZO step {opt.step_count}: the closure raised on rank(s) {failed} of "
                f"{self.world}; every rank restored its weights and the step was not counted"
            )
        keys = [tuple(row[_STEP:_INDEX + 1]) for row in rows]
        if any(k != keys[0] for k in keys):
            self._index = 0
            table = "; ".join(
                f"rank {r}: step {int(k[0])}, base-seed fingerprint {int(k[1]):012x}, config "
                f"fingerprint {int(k[2]):012x}, exchange {int(k[3])}" for r, k in enumerate(keys))
            raise DistributedStateError(
                "MeZO ranks disagree about the step seed state or hyperparameters (resumed from "
                "different checkpoints, a different seed=, or different lr/eps/options?): "
                f"{table}. The weights were restored; load the same checkpoint on every rank"
            )
        return rows

    def begin_step(self):
        self._index = 0
        self._failure = None

    def reduce(self, opt, values: list[float]) -> list[float]:
        """Data parallel: every rank's (L+, L−) averaged over the ranks."""
        rows = self.exchange(opt, values)
        return [_mean([row[_V0 + i] for row in rows]) for i in range(len(values))]

    def evaluate(self, opt, closure) -> float:
        """Run the closure. If it raises, keep the error for the next exchange and return NaN.

        The step then evaluates nothing more on this rank but runs the same weight passes as the
        other ranks up to the exchange, which reports the failure to all and re-raises the error
        here: every rank restores from the same state, and no rank waits for a missing peer.
        """
        from .optim import _as_scalar

        if self._failure is not None:
            return math.nan
        try:
            return _as_scalar(closure())
        except BaseException as exc:  # KeyboardInterrupt too: re-raised at the exchange
            self._failure = exc
            return math.nan

    # -------------------------------------------------------------- sharded weights
    def after_pass(self):
        """Drop FSDP2's unsharded copies: they are stale once the shards changed."""
        for ref in self._fsdp:
            module = ref()
            if module is not None:
                module.reshard()

    # ------------------------------------------------------------- split directions
    def split_step(self, opt, closure, step):
        """q-SPSA with the q directions dealt round-robin to the ranks.

        Round j covers directions jW … jW+W−1; rank r evaluates direction jW+r (two forwards,
        central) while every rank applies the same +εz, −2εz, +εz passes for every direction of
        the round, so all ranks round identically and hold bit-identical weights. One
        all-gather per round shares the losses; after the last round every rank applies all q
        updates (lr·g_d/q each, in direction order), evaluated at the same point θ.
        """
        from .optim import StepRecord

        t, q, world = opt.step_count, opt.num_directions, self.world
        eps_list = step.eps
        seeds = [opt.seed_for(t, d) for d in range(q)]
        pairs: list[tuple[float, float] | None] = [None] * q
        central = opt.estimator == "central"
        if opt._pending is not None:
            opt.materialize()
        base = None if central else opt._evaluate(closure)
        for first in range(0, q, world):
            mine = first + self.rank
            values = []
            for d in range(first, min(first + world, q)):
                own = d == mine
                opt._pass(seeds[d], 1, step)
                if own:
                    values.append(opt._evaluate(closure))
                if central:
                    opt._pass(seeds[d], -2, step)
                    if own:
                        values.append(opt._evaluate(closure))
                    opt._pass(seeds[d], 1, step)
                else:
                    if own:
                        values.append(base)
                    opt._pass(seeds[d], -1, step)
            rows = self.exchange(opt, values, STATUS_OK if values else STATUS_IDLE)
            for d in range(first, min(first + world, q)):
                row = rows[d - first]
                pairs[d] = (row[_V0], row[_V1])
        flat = [v for pair in pairs for v in pair]
        if not opt._check_finite(flat):
            return None
        all_grads = []
        for plus, minus in pairs:
            diff = (plus - minus) / 2.0 if central else plus - minus
            grads = [diff / e for e in eps_list]
            if opt.sign:
                grads = [math.copysign(1.0, g) if g != 0 else 0.0 for g in grads]
            all_grads.append([g / q for g in grads])
        if central:
            loss = sum((p + m) / 2 for p, m in pairs) / q
        else:
            loss = _mean([m for _, m in pairs])
        record = StepRecord(step=t, seeds=seeds, losses=[tuple(p) for p in pairs],
                            projected_grads=[g[0] * q for g in all_grads], loss=loss)
        opt._commit(step, record, seeds, all_grads, None)
        return record


# ------------------------------------------------------------------------------ utilities
class CollectiveMeter:
    """Measure what goes through torch.distributed: ``with CollectiveMeter() as m: ...`` wraps
    the collectives (all_gather, all_gather_into_tensor, all_reduce, broadcast, reduce_scatter_tensor,
    all_gather_object) for the block and records, per collective, the calls and the bytes of the
    tensors handed in (``bytes_in``) and filled (``bytes_out``)."""

    NAMES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast",
             "reduce_scatter_tensor")

    def __init__(self):
        self.calls: dict[str, dict[str, int]] = {}
        self._saved = {}

    @staticmethod
    def _nbytes(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.nbytes
        if isinstance(x, (list, tuple)):
            return sum(CollectiveMeter._nbytes(v) for v in x)
        return 0

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            entry = self.calls.setdefault(name, dict(calls=0, bytes_in=0, bytes_out=0))
            entry["calls"] += 1
            if name in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
                out, inp = args[0], args[1] if len(args) > 1 else kwargs.get("tensor", kwargs.get("input"))
                entry["bytes_in"] += self._nbytes(inp)
                entry["bytes_out"] += self._nbytes(out)
            else:  # in place: the tensor is sent and overwritten
                size = self._nbytes(args[0] if args else kwargs.get("tensor"))
                entry["bytes_in"] += size
                entry["bytes_out"] += size
            return fn(*args, **kwargs)
        return wrapped

    def __enter__(self):
        import torch.distributed as dist

        for name in self.NAMES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved = {}
        return False

    def totals(self) -> dict[str, dict[str, int]]:
        return {name: dict(entry) for name, entry in self.calls.items()}


def weights_fingerprint(params) -> int:
    """48-bit hash of the exact bytes of ``params`` (plain tensors or replicated DTensors)."""
    h = hashlib.blake2b(digest_size=6)
    for p in params:
        if is_sharded(p):
            raise ValueError("weights_fingerprint compares replicas; a sharded DTensor differs per rank")
        tensor, _ = local_view(p)
        h.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        h.update(tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def check_replicas(params, process_group=None) -> None:
    """Raise ``DistributedStateError`` unless every rank holds bit-identical ``params``.

    One all-gather of a 48-bit fingerprint per rank: a check to run now and then (e.g. at a
    checkpoint), not every step. ``process_group=None`` uses the default group.
    """
    import torch.distributed as dist

    params = list(params)
    mine = torch.tensor([float(weights_fingerprint(params))], dtype=torch.float64)
    if dist.get_backend(process_group) == "nccl":
        mine = mine.cuda()
    world = dist.get_world_size(process_group)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=process_group)
    prints = [int(r.item()) for r in rows]
    if any(f != prints[0] for f in prints):
        table = ", ".join(f"rank {r}: {f:012x}" for r, f in enumerate(prints))
        raise DistributedStateError(f"the replicas differ: weight fingerprints {table}")
