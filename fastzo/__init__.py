"""fastzo: fused kernels for memory-efficient zeroth-order (MeZO) fine-tuning."""

from .backends import available_backends
from .noise import philox4x32_10, zo_noise
from .ops import (exact_perturb_, exact_quantum, perturb_, restore_and_update_,
                  restore_update_and_perturb_, snap_to_grid_)
from .optim import MeZO, NonFiniteLossError, replay, trim_trajectory

__version__ = "0.1.0"

__all__ = [
    "MeZO",
    "NonFiniteLossError",
    "replay",
    "trim_trajectory",
    "restore_update_and_perturb_",
    "available_backends",
    "exact_perturb_",
    "exact_quantum",
    "snap_to_grid_",
    "perturb_",
    "philox4x32_10",
    "restore_and_update_",
    "zo_noise",
]
