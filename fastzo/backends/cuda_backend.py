"""Backend "cuda": the CUDA kernels of the extension fastzo._C on CUDA tensors.

One launch per storage dtype covers every tensor of a call (a device-side table of pointers,
sizes, keys and offsets), with 16-byte loads and stores where alignment allows. Built only when
torch has CUDA and nvcc was found at install time (docs/native.md).
"""

from __future__ import annotations

import torch

from . import cpp_backend, fast_math_from_environment

NAME = "cuda"
# Fast math for the Gaussian passes (hardware sine, cosine and square root; docs/noise.md,
# "Fast math"), as in backend "triton": FASTZO_FAST_MATH=0 turns it off (read at import; this
# attribute may be changed at run time).
FAST_MATH = fast_math_from_environment()


def _extension():
    ext = cpp_backend.load_extension()
    if not getattr(ext, "HAS_CUDA", False):
        raise RuntimeError(
            "fastzo._C was built without its CUDA kernels (torch without CUDA, or nvcc not found "
            "at build time); see docs/native.md"
        )
    return ext


def check_available() -> None:
    _extension()
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available")


def supports_device(device: torch.device) -> bool:
    return device.type == "cuda"


def perturb_(tensors, keys, offsets, seed, scale, distribution):
    _extension().cuda_perturb_(tensors, keys, offsets, seed, scale, distribution, FAST_MATH)


def restore_and_update_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                        stochastic_rounding):
    _extension().cuda_restore_and_update_(tensors, keys, offsets, seed, eps, decay, step,
                                          distribution, stochastic_rounding, FAST_MATH)


def restore_update_and_perturb_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                                stochastic_rounding, next_seed, next_scale):
    """The fused step: restore-and-update, then + next_scale * z(next_seed), rounded once."""
    _extension().cuda_restore_update_and_perturb_(
        tensors, keys, offsets, seed, eps, decay, step, distribution, stochastic_rounding,
        next_seed, next_scale, FAST_MATH)


def exact_perturb_(tensors, keys, offsets, seed, eps, multiple, exponents, distribution):
    """Exact mode (16-bit tensors): multiple * k integer steps on each tensor's grid."""
    _extension().cuda_exact_perturb_(tensors, keys, offsets, seed, eps, multiple, exponents,
                                     distribution)


def exact_restore_and_update_(tensors, keys, offsets, seed, eps, decay, step, distribution,
                              stochastic_rounding, exponents, next_seed=None, next_eps=0.0):
    """Exact mode: restore by +k, update, store on the grid (then + k' of the next seed)."""
    _extension().cuda_exact_restore_and_update_(
        tensors, keys, offsets, seed, eps, decay, step, distribution, stochastic_rounding,
        exponents, next_seed is not None, next_seed or 0, next_eps)
