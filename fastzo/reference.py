"""A faithful re-implementation of the reference MeZO step (princeton-nlp/MeZO, trainer.py).

Used as the baseline in benchmarks: per step, ``torch.manual_seed(seed)`` and then, per
trainable tensor, a fresh ``torch.normal`` draw of z and out-of-place updates, in four passes
(+εz, −2εz, +εz, update). It allocates z and temporaries the size of each tensor.
"""

from __future__ import annotations

import numpy as np
import torch


class ReferenceMeZO:
    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay

    def _perturb(self, seed: int, scaling: float):
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scaling * z * self.eps

    @torch.no_grad()
    def step(self, closure):
        seed = int(np.random.randint(1_000_000_000))
        self._perturb(seed, 1)
        loss_plus = float(closure())
        self._perturb(seed, -2)
        loss_minus = float(closure())
        projected_grad = (loss_plus - loss_minus) / (2 * self.eps)
        self._perturb(seed, 1)
        torch.manual_seed(seed)
        for p in self.params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            # The reference skips decay for biases and norms; with weight_decay=0 both agree.
            p.data = p.data - self.lr * (projected_grad * z + self.weight_decay * p.data)
        return loss_plus
