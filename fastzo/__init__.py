"""fastzo: fused kernels for memory-efficient zeroth-order (MeZO) fine-tuning."""

from .backends import available_backends
from .noise import philox4x32_10, zo_noise
from .ops import perturb_, restore_and_update_, restore_update_and_perturb_
from .optim import MeZO, NonFiniteLossError, replay

__version__ = "0.1.0"

__all__ = [
    "MeZO",
    "NonFiniteLossError",
    "replay",
    "restore_update_and_perturb_",
    "available_backends",
    "perturb_",
    "philox4x32_10",
    "restore_and_update_",
    "zo_noise",
]
