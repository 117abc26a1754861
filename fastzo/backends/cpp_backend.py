"""Backend "cpp": the C++ kernels of the extension fastzo._C on CPU tensors.

Multi-threaded (at::parallel_for, so ``torch.set_num_threads`` applies) and vectorised; the
result does not depend on the thread count. The extension is optional: when it was not built
(see docs/native.md) this backend reports why, and dispatch falls back to the others.
"""

from __future__ import annotations

import torch

NAME = "cpp"

# Must match contract::kAbiVersion in csrc/noise_contract.h: a stale build is refused.
ABI_VERSION = 7

_extension = None
_load_error: BaseException | None = None


def load_extension():
    """The module fastzo._C, or raise the reason it cannot be used (cached)."""
    global _extension, _load_error
    if _extension is not None:
        return _extension
    if _load_error is None:
        try:
            from .. import _C  # torch is imported first: _C links against libtorch
        except Exception as exc:
            _load_error = ImportError(
                f"the C++/CUDA extension fastzo._C is not available ({type(exc).__name__}: {exc}); "
                "build it with `pip install --no-build-isolation -e .` (FASTZO_STRICT_BUILD=1 "
                "turns a failed build into an error), see docs/native.md"
            )
            _load_error.__cause__ = exc
        else:
            found = getattr(_C, "ABI_VERSION", None)
            if found != ABI_VERSION:
                _load_error = ImportError(
                    f"fastzo._C at {getattr(_C, '__file__', '?')} is a stale build (ABI version "
                    f"{found}, expected {ABI_VERSION}); rebuild it with "
                    "`pip install --no-build-isolation -e .`"
                )
            else:
                _extension = _C
                return _extension
    raise _load_error


def check_available() -> None:
    load_extension()


def kernel_variant() -> str:
    """The CPU kernel variant the passes use: "avx512", "avx2", "neon" or "scalar" (the widest
    this CPU runs, or the one FASTZO_CPU_ISA forced when the extension was loaded)."""
    return load_extension().cpu_kernel_isa()


def describe() -> str:
    """e.g. "avx512 (this CPU runs avx512, avx2, scalar)", or why the extension is unusable."""
    try:
        ext = load_extension()
        return f"{ext.cpu_kernel_isa()} (this CPU runs {', '.join(ext.cpu_kernel_variants())})"
    except Exception as exc:  # a stale build, or an invalid FASTZO_CPU_ISA
        return f"unavailable: {exc}"


def supports_device(device: torch.device) -> bool:
    return device.type == "cpu"


def perturb_(tensors, keys, offsets, seed, scale, distribution):
    load_extension().cpu_perturb_(tensors, keys, offsets, seed, scale, distribution)


def restore_and_update_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                        stochastic_rounding):
    load_extension().cpu_restore_and_update_(tensors, keys, offsets, seed, eps, decay, step,
                                             distribution, stochastic_rounding)


def restore_update_and_perturb_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                                stochastic_rounding, next_seed, next_scale):
    """The fused step: restore-and-update, then + next_scale * z(next_seed), rounded once."""
    load_extension().cpu_restore_update_and_perturb_(
        tensors, keys, offsets, seed, eps, decay, step, distribution, stochastic_rounding,
        next_seed, next_scale)


def exact_perturb_(tensors, keys, offsets, seed, eps, multiple, exponents, distribution):
    """Exact mode (16-bit tensors): multiple * k integer steps on each tensor's grid."""
    load_extension().cpu_exact_perturb_(tensors, keys, offsets, seed, eps, multiple, exponents,
                                        distribution)


def exact_restore_and_update_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                              stochastic_rounding, exponents, next_seed=None, next_eps=0.0):
    """Exact mode: restore by +k, update, store on the grid (then + k' of the next seed)."""
    load_extension().cpu_exact_restore_and_update_(
        tensors, keys, offsets, seed, eps, decay, step, distribution, stochastic_rounding,
        exponents, next_seed is not None, next_seed or 0, next_eps)
