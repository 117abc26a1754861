"""Shared test utilities: devices, backends under test, ulp arithmetic."""

import os

import torch

import fastzo
from fastzo.backends import supports

DEVICE = torch.device("cuda" if os.environ.get("FASTZO_TEST_GPU") and torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 3, 4097, 278011]
DISTRIBUTIONS = ["gaussian", "rademacher"]
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
# Contract tolerance of a fast backend's Gaussian z against the oracle (docs/noise.md).
Z_TOL = 2e-5


def fast_backends(device=DEVICE) -> list[str]:
    """Every non-oracle backend that runs on ``device`` here."""
    return [b for b in fastzo.available_backends() if b != "torch" and supports(b, torch.device(device))]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at magnitude |x| (normal range; subnormal floor)."""
    x = x.double().abs()
    finfo = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(torch.clamp(x, min=finfo.tiny)))
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def weights(n: int, dtype: torch.dtype, gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(n, generator=gen) * std).to(dtype).to(DEVICE)
