"""Adam for the registration's small optimisations (affine, refinement), without ``torch.optim``.

``torch.optim.Optimizer`` imports ``torch._dynamo`` on its first use (its ``add_param_group`` is
wrapped to disable the compiler): ~0.7 s of a 2-core CPU, more than the whole affine stage. The
update here is ``torch.optim.Adam``'s default (no weight decay, no amsgrad) to the rounding;
training keeps ``torch.optim``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class Adam:
    """Adam (Kingma & Ba) on a few tensors: ``zero_grad()`` then ``step()`` after ``backward()``."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.steps = 0
        self._m = [torch.zeros_like(p) for p in self.params]
        self._v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        step_size = self.lr / (1 - beta1 ** self.steps)
        root_correction = math.sqrt(1 - beta2 ** self.steps)
        for p, m, v in zip(self.params, self._m, self._v, strict=True):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            p.addcdiv_(m, (v.sqrt() / root_correction).add_(self.eps), value=-step_size)
