"""Public functional ops: validation, float32 constants, dispatch to a backend.

Everything is checked before any tensor is touched, so bad input never leaves weights
half-perturbed.
"""

from __future__ import annotations

import math
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


def _check_tensors(tensors: list[torch.Tensor]) -> torch.device | None:
    devices = set()
    seen = set()
    for idx, t in enumerate(tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"tensor {idx} has dtype {t.dtype}; fastzo perturbs float32, bfloat16 or "
                "float16 tensors only"
            )
        if not t.is_contiguous():
            raise ValueError(
                f"tensor {idx} (shape {tuple(t.shape)}) is not contiguous; element indices of "
                "the noise contract are row-major offsets, so pass a contiguous tensor"
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


def restore_and_update_(tensors, seed: int, eps: float, lr: float, projected_grad: float,
                        weight_decay: float = 0.0, *, keys=None, offsets=None,
                        distribution: str = "gaussian", stochastic_rounding: bool | None = None,
                        backend: str | None = None):
    """In place, from θ − eps·z: θ ← (θ + eps·z)(1 − lr·wd) − lr·g·z in one pass.

    With ``eps=0.0`` it is a pure update. ``stochastic_rounding`` (default: on for 16-bit
    tensors) rounds the stored result stochastically so tiny updates survive on average.
    """
    eps = as_float32(eps, "eps")
    lr = float(as_float32(lr, "lr"))
    g = as_float32(projected_grad, "projected_grad")
    wd = as_float32(weight_decay, "weight_decay")
    decay = as_float32(1.0 - lr * wd, "1 - lr * weight_decay")
    step = as_float32(lr * g, "lr * projected_grad")
    if stochastic_rounding is None:
        stochastic_rounding = True
    module, tensors, keys, offsets = _prepare(tensors, seed, keys, offsets, distribution, backend)
    if tensors:
        with torch.no_grad():
            module.restore_and_update_(tensors, keys, offsets, seed, eps, decay, step,
                                       distribution, bool(stochastic_rounding))


def restore_update_and_perturb_(tensors, seed: int, eps: float, lr: float, projected_grad: float,
                                weight_decay: float, next_seed: int, next_scale: float, *,
                                keys=None, offsets=None, distribution: str = "gaussian",
                                stochastic_rounding: bool | None = None, backend: str | None = None):
    """Fused steps: restore-and-update of step t and the +scale·z' of step t+1 in one pass.

    θ ← (θ + eps·z)(1 − lr·wd) − lr·g·z + next_scale·z(next_seed), rounded once. Backends
    without a fused kernel run the two passes (rounding twice).
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
