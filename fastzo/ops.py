"""Public functional ops: validation, float32 constants, dispatch to a backend.

Everything is checked before any tensor is touched, so bad input never leaves weights
half-perturbed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from . import noise
from .backends import get_backend, pick_backend

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def as_float32(value: float, name: str) -> float:
    """Round a host constant once to float32 (the contract's arithmetic precision)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    rounded = float(torch.tensor(value, dtype=torch.float32))
    if not math.isfinite(rounded):
        raise ValueError(f"{name}={value} overflows float32")
    return rounded


def _as_list(tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if not isinstance(tensors, Sequence) and not hasattr(tensors, "__iter__"):
        raise TypeError("tensors must be a tensor or a sequence of tensors")
    out = list(tensors)
    for t in out:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors must hold torch.Tensor objects, got {type(t).__name__}")
    return out


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The dimension order in which a dense, non-overlapping tensor lies in memory (outermost
    first), so that ``t.permute(order)`` is contiguous; None if ``t`` overlaps or has gaps.

    Row-major tensors give (0, 1, …); a channels_last NCHW tensor gives (0, 2, 3, 1).
    """
    if t.is_contiguous():
        return tuple(range(t.dim()))
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    return order if t.permute(order).is_contiguous() else None


def _dense_views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous views in memory order: the element index of the noise contract is an element's
    position in memory (docs/noise.md), the row-major index for a contiguous tensor."""
    return [t if t.is_contiguous() else t.permute(memory_order(t)) for t in tensors]


def _check_tensors(tensors: list[torch.Tensor]) -> torch.device | None:
    devices = set()
    seen = set()
    for idx, t in enumerate(tensors):
        if t.device.type == "meta":
            raise ValueError(
                f"tensor {idx} (shape {tuple(t.shape)}) is on the meta device and has no data to "
                "perturb; create the real tensor first (e.g. module.to_empty(device=...))"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"tensor {idx} has dtype {t.dtype}; fastzo perturbs float32, bfloat16 or "
                "float16 tensors only"
            )
        if t.numel() and memory_order(t) is None:
            raise ValueError(
                f"tensor {idx} (shape {tuple(t.shape)}, strides {tuple(t.stride())}) is not "
                "contiguous and not a dense permutation of its dimensions (such as channels_last): "
                "it overlaps or has gaps, so it has no memory-order element index. Pass "
                "t.contiguous() (and copy the result back) or the tensor it is a view of"
            )
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and ptr in seen:
            raise ValueError(f"tensor {idx} appears twice in the list; it would be perturbed twice")
        seen.add(ptr)
        devices.add(t.device)
    if len(devices) > 1:
        raise ValueError(
            f"all tensors of one call must be on one device, got {sorted(map(str, devices))}; "
            "call once per device"
        )
    return devices.pop() if devices else None


def _written(tensors) -> None:
    """Bump the autograd version counter of tensors a backend wrote through a raw pointer, as
    any in-place op does: a graph that saved them before now refuses to backpropagate."""
    for t in tensors:
        if not t.is_inference():
            torch.autograd.graph.increment_version(t)


def _check_keys(keys, n: int) -> list[int]:
    if keys is None:
        return list(range(n))
    keys = list(keys)
    if len(keys) != n:
        raise ValueError(f"got {len(keys)} keys for {n} tensors")
    for k in keys:
        noise.check_key(k)
    if len(set(keys)) != n:
        raise ValueError(f"keys must be distinct, got {keys}")
    return keys


def _check_offsets(offsets, tensors) -> list[int]:
    if offsets is None:
        return [0] * len(tensors)
    offsets = list(offsets)
    if len(offsets) != len(tensors):
        raise ValueError(f"got {len(offsets)} offsets for {len(tensors)} tensors")
    for off, t in zip(offsets, tensors):
        if isinstance(off, bool) or not isinstance(off, int) or off < 0 or off + t.numel() > noise.MAX_INDEX:
            raise ValueError(f"offsets must be ints with 0 <= offset, offset + numel <= 2**62; got {off!r}")
    return offsets


def _prepare(tensors, seed, keys, offsets, distribution, backend):
    tensors = _as_list(tensors)
    noise.check_seed(seed)
    noise.check_distribution(distribution)
    device = _check_tensors(tensors)
    keys = _check_keys(keys, len(tensors))
    offsets = _check_offsets(offsets, tensors)
    if device is None:
        return None, [], [], []
    module = get_backend(backend) if backend is not None else get_backend(pick_backend(device))
    if not module.supports_device(device):
        raise ValueError(f"backend {module.NAME!r} does not run on device {device}")
    tensors = _dense_views(tensors)
    live = [(t, k, o) for t, k, o in zip(tensors, keys, offsets) if t.numel()]
    return module, [t for t, _, _ in live], [k for _, k, _ in live], [o for _, _, o in live]


def perturb_(tensors, seed: int, scale: float, *, keys=None, offsets=None,
             distribution: str = "gaussian", backend: str | None = None):
    """In place, for each tensor k: θ_k ← θ_k + scale · z(seed, key_k).

    ``keys`` default to 0..n−1 in list order; ``offsets`` (default 0) give each tensor's first
    global element index, so a shard of a larger tensor gets that tensor's noise.
    """
    scale = as_float32(scale, "scale")
    module, tensors, keys, offsets = _prepare(tensors, seed, keys, offsets, distribution, backend)
    if tensors:
        with torch.no_grad():
            module.perturb_(tensors, keys, offsets, seed, scale, distribution)
        _written(tensors)


def restore_and_update_(tensors, seed: int, eps: float, lr: float, projected_grad: float,
                        weight_decay: float = 0.0, *, keys=None, offsets=None,
                        distribution: str = "gaussian", stochastic_rounding: bool | None = None,
                        backend: str | None = None, exact_quanta=None):
    """In place, from θ − eps·z: θ ← (θ + eps·z)(1 − lr·wd) − lr·g·z in one pass.

    With ``eps=0.0`` it is a pure update. ``stochastic_rounding`` (default: on for 16-bit
    tensors) rounds the stored result stochastically so tiny updates survive on average.
    ``exact_quanta`` (one quantum or None per tensor, see ``exact_perturb_``): the restore is
    the exact integer inverse of ``exact_perturb_(…, eps, multiple=−1, …)`` and the result is
    stored on the tensor's grid.
    """
    eps = as_float32(eps, "eps")
    lr = float(as_float32(lr, "lr"))
    g = as_float32(projected_grad, "projected_grad")
    wd = as_float32(weight_decay, "weight_decay")
    decay = as_float32(1.0 - lr * wd, "1 - lr * weight_decay")
    step = as_float32(lr * g, "lr * projected_grad")
    if stochastic_rounding is None:
        stochastic_rounding = True
    if exact_quanta is not None:
        _exact_restore(tensors, seed, eps, decay, step, keys, offsets, distribution,
                       bool(stochastic_rounding), backend, exact_quanta)
        return
    module, tensors, keys, offsets = _prepare(tensors, seed, keys, offsets, distribution, backend)
    if tensors:
        with torch.no_grad():
            module.restore_and_update_(tensors, keys, offsets, seed, eps, decay, step,
                                       distribution, bool(stochastic_rounding))
        _written(tensors)


def restore_update_and_perturb_(tensors, seed: int, eps: float, lr: float, projected_grad: float,
                                weight_decay: float, next_seed: int, next_scale: float, *,
                                keys=None, offsets=None, distribution: str = "gaussian",
                                stochastic_rounding: bool | None = None, backend: str | None = None,
                                exact_quanta=None):
    """Fused steps: restore-and-update of step t and the +scale·z' of step t+1 in one pass.

    θ ← (θ + eps·z)(1 − lr·wd) − lr·g·z + next_scale·z(next_seed), rounded once. Backends
    without a fused kernel run the two passes (rounding twice). With ``exact_quanta`` the
    updated weights are stored on the grid and then moved by the exact integer steps of
    ``next_scale`` (``exact_perturb_(…, next_scale, multiple=1, …)``): still one rounding.
    """
    eps = as_float32(eps, "eps")
    lr = float(as_float32(lr, "lr"))
    g = as_float32(projected_grad, "projected_grad")
    wd = as_float32(weight_decay, "weight_decay")
    decay = as_float32(1.0 - lr * wd, "1 - lr * weight_decay")
    step = as_float32(lr * g, "lr * projected_grad")
    next_scale = as_float32(next_scale, "next_scale")
    noise.check_seed(next_seed)
    if stochastic_rounding is None:
        stochastic_rounding = True
    if exact_quanta is not None:
        _exact_restore(tensors, seed, eps, decay, step, keys, offsets, distribution,
                       bool(stochastic_rounding), backend, exact_quanta, next_seed, next_scale)
        return
    module, tensors, keys, offsets = _prepare(tensors, seed, keys, offsets, distribution, backend)
    if not tensors:
        return
    with torch.no_grad():
        fused = getattr(module, "restore_update_and_perturb_", None)
        if fused is not None:
            fused(tensors, keys, offsets, seed, eps, decay, step, distribution,
                  bool(stochastic_rounding), next_seed, next_scale)
        else:
            module.restore_and_update_(tensors, keys, offsets, seed, eps, decay, step,
                                       distribution, bool(stochastic_rounding))
            module.perturb_(tensors, keys, offsets, next_seed, next_scale, distribution)
    _written(tensors)


# ------------------------------------------------------------------------------------------
# Exact (bit-reversible) perturbation of 16-bit weights: docs/lowprec.md, docs/noise.md.

def _check_quanta(quanta, tensors: list[torch.Tensor]) -> list[int | None]:
    """Per tensor the exponent e of q = 2**e, or None (plain perturbation for that tensor)."""
    if isinstance(quanta, (int, float, torch.Tensor)) and not isinstance(quanta, bool):
        quanta = [quanta]
    try:
        quanta = list(quanta)
    except TypeError:
        raise TypeError("exact quanta must be a sequence with one quantum (or None) per tensor") from None
    if len(quanta) != len(tensors):
        raise ValueError(f"got {len(quanta)} exact quanta for {len(tensors)} tensors")
    exponents = []
    for idx, (q, t) in enumerate(zip(quanta, tensors)):
        if q is None:
            exponents.append(None)
            continue
        if t.dtype not in noise.FORMATS16:
            raise ValueError(
                f"tensor {idx} is {t.dtype}: exact mode is for bfloat16/float16 tensors; float32 "
                "tensors use the plain perturbation, pass None as their quantum"
            )
        if isinstance(q, torch.Tensor):
            if q.numel() != 1:
                raise ValueError(f"quantum {idx} must be a scalar")
            q = q.item()
        if isinstance(q, bool) or not isinstance(q, (int, float)):
            raise TypeError(f"quantum {idx} must be a float power of two or None, got {type(q).__name__}")
        q = float(q)
        if not (math.isfinite(q) and q > 0 and math.frexp(q)[0] == 0.5):
            raise ValueError(f"quantum {idx} must be a positive power of two, got {q!r}")
        exponent = math.frexp(q)[1] - 1
        fmt = noise.FORMATS16[t.dtype]
        if not fmt.min_exponent <= exponent <= fmt.max_exponent:
            raise ValueError(
                f"quantum {idx} = 2**{exponent} is outside [2**{fmt.min_exponent}, "
                f"2**{fmt.max_exponent}], the range for {fmt.name} tensors"
            )
        exponents.append(exponent)
    return exponents


def _check_steps(eps_values, exponents, tensors, multiple: int = 1):
    """|multiple|·(6·|eps|/q + 1) ≤ 2·Nmax + 1 per exact tensor: every |step| is then below the
    size of the index ring (|z| < 5.9), so one wrap keeps an index in [−Nmax, Nmax]."""
    for eps in eps_values:
        for idx, (e, t) in enumerate(zip(exponents, tensors)):
            if e is None:
                continue
            ring = 2 * noise.FORMATS16[t.dtype].max_index(e) + 1
            if abs(multiple) * (6.0 * abs(eps) * 2.0**-e + 1.0) > ring:
                raise ValueError(
                    f"eps={eps} (multiple {multiple}) is too many quanta q=2**{e} for tensor {idx}: "
                    f"|multiple|·(6·eps/q + 1) must be at most {ring}; choose a larger quantum "
                    "(fastzo.exact_quantum)"
                )


def _check_multiple(multiple) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, int):
        raise TypeError(f"multiple must be an int (+1, -2, -1, ...), got {type(multiple).__name__}")
    if abs(multiple) > noise.MAX_MULTIPLE:
        raise ValueError(f"multiple must be in [-{noise.MAX_MULTIPLE}, {noise.MAX_MULTIPLE}], got {multiple}")
    return multiple


_warned_no_exact: set[str] = set()


def _exact_module(module, device: torch.device):
    """``module`` if it implements exact mode, else the fastest backend on ``device`` that does.

    Every backend stores the same bits in exact mode, so this changes speed, not results.
    """
    if hasattr(module, "exact_perturb_"):
        return module
    from .backends import auto_order

    for name in auto_order(device):
        if hasattr(get_backend(name), "exact_perturb_"):
            if module.NAME not in _warned_no_exact:
                _warned_no_exact.add(module.NAME)
                warnings.warn(f"backend {module.NAME!r} has no exact mode (a stale build?); its "
                              f"exact passes run on backend {name!r}", RuntimeWarning, stacklevel=4)
            return get_backend(name)
    raise ValueError(f"no available backend implements exact mode on device {device}")


def _prepare_exact(tensors, seed, keys, offsets, distribution, backend, quanta, eps_values,
                   multiple=1):
    """Validate everything; split the live tensors into (exact, plain) lists of (t, key, offset[, e])."""
    tensors = _as_list(tensors)
    noise.check_seed(seed)
    noise.check_distribution(distribution)
    device = _check_tensors(tensors)
    keys = _check_keys(keys, len(tensors))
    offsets = _check_offsets(offsets, tensors)
    exponents = _check_quanta(quanta, tensors)
    _check_steps(eps_values, exponents, tensors, multiple)
    if device is None:
        return None, None, [], []
    module = get_backend(backend) if backend is not None else get_backend(pick_backend(device))
    if not module.supports_device(device):
        raise ValueError(f"backend {module.NAME!r} does not run on device {device}")
    exact_module = module
    if any(e is not None for e in exponents):
        exact_module = _exact_module(module, device)
    tensors = _dense_views(tensors)
    exact, plain = [], []
    for t, k, o, e in zip(tensors, keys, offsets, exponents):
        if t.numel():
            (plain if e is None else exact).append((t, k, o, e))
    return module, exact_module, exact, plain


def _columns(rows):
    return [list(col) for col in zip(*rows)] if rows else [[], [], [], []]


def exact_perturb_(tensors, seed: int, eps: float, multiple: int, quanta, *, keys=None,
                   offsets=None, distribution: str = "gaussian", backend: str | None = None):
    """Exactly reversible perturbation of 16-bit tensors, in place (docs/lowprec.md).

    For each tensor with quantum q = ``quanta[i]`` (a power of two, ``fastzo.exact_quantum``):
    θ ← N⁻¹(wrap(N(θ) + multiple·k)), k = round_half_even(eps·z/q), where N is the integer
    index of θ on the tensor's grid (multiples of q below T = q·2**mantissa_bits, every storage
    value above). Steps are integers, so ``multiple`` = +1, −2, +1 returns every weight bit for
    bit, after any number of cycles. Weights must lie on the grid (``snap_to_grid_``).
    Tensors whose quantum is None (float32 tensors must pass None) get the plain
    ``perturb_(…, multiple·eps)``.
    """
    eps = as_float32(eps, "eps")
    multiple = _check_multiple(multiple)
    scale = as_float32(multiple * eps, "multiple * eps")
    module, exact_module, exact, plain = _prepare_exact(tensors, seed, keys, offsets, distribution,
                                                        backend, quanta, [eps], multiple)
    with torch.no_grad():
        if plain:
            ts, ks, os_, _ = _columns(plain)
            module.perturb_(ts, ks, os_, seed, scale, distribution)
        if exact:
            ts, ks, os_, es = _columns(exact)
            exact_module.exact_perturb_(ts, ks, os_, seed, eps, multiple, es, distribution)
    _written([row[0] for row in plain + exact])


def _exact_restore(tensors, seed, eps, decay, step, keys, offsets, distribution, stochastic_rounding,
                   backend, quanta, next_seed=None, next_scale=0.0):
    eps_values = [eps] if next_seed is None else [eps, next_scale]
    module, exact_module, exact, plain = _prepare_exact(tensors, seed, keys, offsets, distribution,
                                                        backend, quanta, eps_values)
    with torch.no_grad():
        if plain:
            ts, ks, os_, _ = _columns(plain)
            fused = getattr(module, "restore_update_and_perturb_", None)
            if next_seed is None:
                module.restore_and_update_(ts, ks, os_, seed, eps, decay, step, distribution,
                                           stochastic_rounding)
            elif fused is not None:
                fused(ts, ks, os_, seed, eps, decay, step, distribution, stochastic_rounding,
                      next_seed, next_scale)
            else:
                module.restore_and_update_(ts, ks, os_, seed, eps, decay, step, distribution,
                                           stochastic_rounding)
                module.perturb_(ts, ks, os_, next_seed, next_scale, distribution)
        if exact:
            ts, ks, os_, es = _columns(exact)
            exact_module.exact_restore_and_update_(ts, ks, os_, seed, eps, decay, step, distribution,
                                                   stochastic_rounding, es, next_seed, next_scale)
    _written([row[0] for row in plain + exact])


def sum_of_squares(tensor: torch.Tensor) -> tuple[float, int]:
    """(Σ θ², count) over the finite entries, in float64, chunk by chunk."""
    flat = tensor.detach().reshape(-1)
    total, count = 0.0, 0
    for start in range(0, flat.numel(), noise.CHUNK):
        part = flat[start:start + noise.CHUNK].double()
        part = part[torch.isfinite(part)]
        total += float((part * part).sum())
        count += part.numel()
    return total, count


def quantum_of(dtype: torch.dtype, total: float, count: int, eps: float) -> float:
    """q = ulp(max(rms, 16·|eps|)) in ``dtype``, rms = sqrt(total / count), clamped to the
    format's valid range [2**min_exponent, 2**max_exponent]."""
    fmt = noise.FORMATS16[dtype]
    rms = math.sqrt(total / count) if count else 0.0
    magnitude = max(rms, 16.0 * abs(eps))
    if magnitude == 0.0:
        exponent = fmt.min_exponent
    elif not math.isfinite(magnitude):
        exponent = fmt.max_exponent
    else:
        exponent = math.frexp(magnitude)[1] - 1 - fmt.mbits  # ulp: 2**(floor(log2 x) - mbits)
    return 2.0 ** min(max(exponent, fmt.min_exponent), fmt.max_exponent)


def exact_quantum(tensor: torch.Tensor, eps: float) -> float | None:
    """The quantum q of a 16-bit tensor for exact mode; None for float32 (plain perturbation).

    q = ulp(max(rms(θ), 16·eps)) in the tensor's storage format (rms over finite entries; an
    all-zero tensor such as LoRA's B gets ulp(16·eps)), clamped to the format's valid range.
    Compute it once from the clean weights and keep it fixed for the whole run.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    eps = as_float32(eps, "eps")
    if tensor.dtype == torch.float32:
        return None
    if tensor.dtype not in noise.FORMATS16:
        raise TypeError(f"exact mode is for bfloat16/float16 tensors, got {tensor.dtype}")
    total, count = sum_of_squares(tensor)
    return quantum_of(tensor.dtype, total, count, eps)


def snap_to_grid_(tensors, quanta) -> None:
    """Round each 16-bit tensor in place onto its grid S_q (once, when exact mode starts).

    Below T = q·2**mantissa_bits: to the nearest multiple of q (ties to even; −0 becomes +0),
    a change of at most q/2. At or above T, and inf/NaN: unchanged. None quanta are skipped.
    """
    tensors = _as_list(tensors)
    _check_tensors(tensors)
    exponents = _check_quanta(quanta, tensors)
    tensors = _dense_views(tensors)
    from .backends import torch_backend

    with torch.no_grad():
        for t, e in zip(tensors, exponents):
            if e is None or not t.numel():
                continue
            flat = t.view(-1)
            for start in range(0, flat.numel(), noise.CHUNK):
                part = flat[start:start + noise.CHUNK]
                bits = torch_backend.round_to_grid(part.float(), None, t.dtype, e)
                torch_backend._store_bits(part, bits)
        _written(tensors)
