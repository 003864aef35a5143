"""The registration's own Adam follows torch.optim.Adam step for step."""

from __future__ import annotations

import subprocess
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eoir_cli.optim import Adam


def _run(opt_factory, seed: int, lr: float, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(2, 4, 5, generator=gen).requires_grad_(True)
    target = torch.randn(2, 4, 5, generator=gen)
    opt = opt_factory([a, b], lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = (a.sin() ** 2).sum() + ((b - target) ** 4).mean() * a.sum()
        loss.backward()
        opt.step()
    return [a.detach(), b.detach()]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), lr=st.floats(1e-3, 0.5), steps=st.integers(1, 30))
def test_matches_torch_adam(seed, lr, steps):
    ours = _run(lambda p, lr: Adam(p, lr=lr), seed, lr, steps)
    ref = _run(lambda p, lr: torch.optim.Adam(p, lr=lr), seed, lr, steps)
    for x, y in zip(ours, ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 if x.dtype == torch.float32 else 1e-12)


def test_a_parameter_without_gradient_is_left_alone():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = Adam([a, b], lr=0.1)
    (a * 2).sum().backward()
    opt.step()
    assert torch.all(a < 1) and torch.equal(b.detach(), torch.ones(3))


def test_registration_does_not_import_the_compiler(tmp_path):
    """torch.optim pulls in torch._dynamo (~0.7 s at start-up); affine + refine must not."""
    code = (
        "import sys, numpy as np\n"
        "from eoir_cli.affine import affine_align\n"
        "from eoir_cli.refine import refine\n"
        "import torch\n"
        "x = np.zeros((24, 24, 24), np.float32); x[6:18, 8:16, 5:19] = 1\n"
        "affine_align(x, np.eye(4), np.roll(x, 2, 0), np.eye(4), iterations=(3, 3))\n"
        "t = torch.from_numpy(x)[None, None]\n"
        "refine(t, t.roll(1, 2), None, 2, scale=1.0)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
